"""Every SGLang target the plugin hooks (or calls directly) exists in the pinned SGLang, and the registry patches them."""

from __future__ import annotations

import pkgutil

import pytest

from sglang_mezo.plugin import HOOK_TARGETS, SGLANG_METHODS_CALLED


@pytest.mark.parametrize("target", HOOK_TARGETS + SGLANG_METHODS_CALLED)
def test_hook_targets_resolve_in_the_pinned_sglang(target):
    owner, attr = target.rsplit(".", 1)
    assert callable(getattr(pkgutil.resolve_name(owner), attr))


def test_communicator_specs_list_exists():
    from sglang.srt.managers import tokenizer_control_mixin

    assert isinstance(tokenizer_control_mixin._COMMUNICATOR_SPECS, list)
