"""The --mezo-* options (``sglang_mezo.options``): parsed from SGLang's command line, validated at launch, and
documented in the README with their defaults."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields
from pathlib import Path

import pytest

from sglang_mezo.core.params import ParamSelection
from sglang_mezo.core.recipe import Knobs
from sglang_mezo.options import Limits, add_cli_args, from_namespace


def parse(*argv: str):
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    return from_namespace(parser.parse_args(["--enable-mezo", *argv]))


def test_flags_reach_the_options_and_folders_resolve(tmp_path):
    (tmp_path / "data").mkdir()
    options = parse("--mezo-max-queued-jobs", "3", "--mezo-max-body-mb", "0.5e1", "--mezo-data-dir",
                    str(tmp_path / "data" / ".." / "data"), "--mezo-output-dir", str(tmp_path / "out"))
    assert options.limits.max_queued_jobs == 3 and options.limits.max_body_mb == 5.0
    assert options.folders.data_dirs == (str(tmp_path / "data"),)
    assert options.folders.output_dir == str(tmp_path / "out")
    assert parse().folders.data_dirs == () and parse().folders.output_dir is None  # file access off
    method = parse("--mezo-estimator", "fzoo", "--mezo-n-probes", "4", "--mezo-adaptive", "scalar_rms")
    assert (method.estimator, method.n_probes, method.adaptive) == ("fzoo", 4, "scalar_rms")
    assert parse().knobs() == Knobs()  # no flag given: every knob is the recipe's
    assert parse("--mezo-estimator", "fzoo").knobs().n_probes is None  # the recipe's 8
    assert parse("--mezo-max-probes", "4", "--mezo-n-probes", "1").limits.max_probes == 4
    assert parse("--mezo-last-layers", "2").knobs() == Knobs(selection=ParamSelection(last_layers=2))


@pytest.mark.parametrize("argv, message", [
    (["--mezo-max-probes", "0"], "--mezo-max-probes must be >= 1"),
    (["--mezo-n-probes", "9", "--mezo-max-probes", "8"], "--mezo-max-probes (8)"),
    (["--mezo-data-dir", "/nonexistent/folder"], "not a folder"),
    (["--mezo-estimator", "fzoo", "--mezo-n-probes", "1"], "--mezo-estimator fzoo needs --mezo-n-probes >= 2"),
    (["--mezo-max-probes", "4"], "below the recipe's 8 probes a step: give --mezo-n-probes too"),
])
def test_bad_values_stop_the_launch(argv, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse(*argv)


def test_the_readme_documents_every_limit_with_its_default():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(--mezo-max-[\w-]+)` \| ([\d.]+) \|", readme, flags=re.M))
    documented = {flag: float(value) for flag, value in rows.items()}
    assert documented == {Limits.flag(f.name): f.default for f in fields(Limits)}
