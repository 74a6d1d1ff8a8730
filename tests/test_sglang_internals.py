"""The ledger of SGLang internals (``sglang_mezo.plugin.internals``) against the pinned SGLang: every entry exists
there, and our code imports nothing from SGLang that the ledger does not name."""

from __future__ import annotations

import ast
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

from sglang_mezo.plugin.internals import CPU_LORA_HOOKS, HOOKS, INTERNALS, Internal, Use

ROOT = Path(__file__).parents[1]
OUR_CODE = [*(ROOT / "sglang_mezo").rglob("*.py"), *(ROOT / "server").rglob("*.py")]


def _has_on_instances(cls: type, attr: str) -> bool:
    """Whether the source of ``cls`` or of a base of it uses ``self.<attr>`` (SGLang sets such attributes in
    ``__init__`` and its helpers, in plain and in tuple assignments)."""
    pattern = re.compile(rf"\bself\.{re.escape(attr)}\b")
    for base in cls.__mro__:
        if not base.__module__.startswith("sglang"):
            continue
        try:
            if pattern.search(inspect.getsource(base)):
                return True
        except (OSError, TypeError):
            continue
    return False


@pytest.mark.parametrize("internal", INTERNALS, ids=lambda i: i.target)
def test_every_internal_exists_in_the_pinned_sglang(internal: Internal):
    owner = pkgutil.resolve_name(internal.owner)
    if internal.instance:
        assert inspect.isclass(owner), internal
        assert _has_on_instances(owner, internal.name) or hasattr(owner, internal.name), internal
    else:
        assert hasattr(owner, internal.name), internal
    if internal.use in (Use.HOOK, Use.CALL):
        assert callable(getattr(owner, internal.name)), internal


def test_what_we_append_to_is_a_list():
    from sglang.srt.managers import tokenizer_control_mixin

    assert isinstance(tokenizer_control_mixin._COMMUNICATOR_SPECS, list)


def test_hooks_are_the_ledgers_hooks():
    """Every hook the plugin registers is in the ledger: the ones --enable-mezo requires (HOOKS), and the CPU LoRA
    ones registered only where CUDA is absent."""
    every = set(HOOKS) | set(CPU_LORA_HOOKS)
    assert all(h.use is Use.HOOK for h in every) and {h for h in INTERNALS if h.use is Use.HOOK} == every


def _sglang_imports(path: Path) -> set[str]:
    """``module.name`` for every ``from sglang… import name`` in a file (``module`` for ``import sglang…``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sglang":
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "sglang")
    return found


def test_the_ledger_names_everything_our_code_imports_from_sglang():
    targets = {i.target for i in INTERNALS}
    owners = {i.owner for i in INTERNALS}
    unlisted = {}
    for path in OUR_CODE:
        for name in _sglang_imports(path):
            # importing a module whose members are listed (``from sglang.srt.managers import tokenizer_control_mixin``)
            if name not in targets and name not in owners and not any(t.startswith(name + ".") for t in targets):
                unlisted.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not unlisted, f"SGLang names our code imports but sglang_mezo.plugin.internals does not list: {unlisted}"


PRIVATE_ACCESS = re.compile(r"\b(\w+)\.(_[A-Za-z]\w*)\b")
OURS = {"_mezo", "_mezo_handler"}
"""Private names we set on SGLang's objects ourselves (``ServerArgs._mezo``, ``Scheduler._mezo_handler``)."""


def test_the_ledger_names_every_private_sglang_attribute_we_use():
    """Any ``x._name`` in our code where ``x`` is not ``self``/``cls`` reaches into someone else's object: SGLang's."""
    listed = {i.name for i in INTERNALS}
    used = {m.group(2) for path in OUR_CODE for m in PRIVATE_ACCESS.finditer(path.read_text())
            if m.group(1) not in ("self", "cls") and not m.group(2).startswith("__")}
    assert used, "the pattern finds nothing: it no longer matches how our code reaches SGLang"
    assert used - listed <= OURS, used - listed
