"""Config loading: defaults <- YAML files <- flags, strict types, one-line errors, the generated CLI."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from kdaug.cli.main import main
from kdaug.cli.options import add_config_arguments, config_from_args
from kdaug.config import load_config, option
from kdaug.errors import KdaugError

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Optim:
    lr: float = option(1e-3, help="learning rate")
    clip: float | None = option(None, help="gradient-norm clip", unit="eV/A")
    kind: Literal["adam", "sgd"] = option("adam", help="optimizer")


@dataclass(frozen=True)
class Run:
    out: str = option(help="output directory")
    steps: int = option(10, help="steps")
    names: tuple[str, ...] = option(("a",), help="dataset names")
    ids: tuple[int, ...] | None = option(None, help="ids")
    shuffle: bool = option(True, help="shuffle")
    optim: Optim = option(default_factory=Optim, help="optimizer section")


def write(path, text):
    path.write_text(text)
    return path


def test_defaults_then_files_then_overrides(tmp_path):
    first = write(tmp_path / "a.yaml", "out: runs/a\nsteps: 5\noptim: {lr: 1, kind: sgd}\nnames: [x, y]\n")
    second = write(tmp_path / "b.yaml", "steps: 7\noptim:\n  clip: 10\n")
    config = load_config(Run, [first, second], {"optim.lr": 0.5, "ids": [3, 4]})
    assert config == Run(out="runs/a", steps=7, names=("x", "y"), ids=(3, 4), shuffle=True,
                         optim=Optim(lr=0.5, clip=10.0, kind="sgd"))
    assert isinstance(config.optim.clip, float)  # YAML int widened to the float field
    assert load_config(Run, [], {"out": "o"}) == Run(out="o")
    assert load_config(Run, [], {"out": "o", "steps": np.int64(3)}).steps == 3


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("out: 5", "out: expected a string, got 5"),
        ("steps: 3.5", "steps: expected an integer, got 3.5"),
        ('steps: "7"', "steps: expected an integer, got '7'"),
        ("steps: true", "steps: expected an integer, got True"),
        ("ids: 5", "ids: expected a list of integers or null, got 5"),
        ("names: [1, 2]", "names: expected a list of strings, got \\[1, 2\\]"),
        ("shuffle: 1", "shuffle: expected true or false, got 1"),
        ("optim: {kind: rmsprop}", "optim.kind: expected one of adam, sgd, got 'rmsprop'"),
        ("optim: 3", "optim: expected a mapping \\(section\\), got 3"),
        ("optim: {lrr: 1}", "optim: unknown key\\(s\\) lrr; expected some of clip, kind, lr"),
        ("stepz: 1", "unknown key\\(s\\) stepz"),
        ("steps: [1", "cfg.yaml:4: invalid YAML .*while parsing a flow sequence at line 3"),
        ("- 1", "cfg.yaml:3: invalid YAML \\(expected <block end>, but found '-'"),
    ],
)
def test_wrong_file_values_name_file_and_key(tmp_path, body, expected):
    path = write(tmp_path / "cfg.yaml", f"out: o\n# comment\n{body}\n")
    with pytest.raises(KdaugError) as err:
        load_config(Run, [path])
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path)) and re.search(expected, message), message


def test_missing_file_and_required_option_and_bad_override(tmp_path):
    with pytest.raises(KdaugError, match="config file .*none.yaml: no such file"):
        load_config(Run, [tmp_path / "none.yaml"])
    with pytest.raises(KdaugError, match="list.yaml: expected a mapping of option names to values, got list"):
        load_config(Run, [write(tmp_path / "list.yaml", "- 1\n")])
    with pytest.raises(KdaugError, match="missing required option\\(s\\): --out"):
        load_config(Run, [])
    with pytest.raises(KdaugError, match="--optim.lr 'fast': expected a number"):
        load_config(Run, [], {"out": "o", "optim.lr": "fast"})
    with pytest.raises(KdaugError, match="unknown option optim.lrr"):
        load_config(Run, [], {"out": "o", "optim.lrr": 1.0})


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Run)
    return config_from_args(Run, parser.parse_args(argv))


def test_generated_flags_override_files(tmp_path):
    path = write(tmp_path / "cfg.yaml", "out: o\nsteps: 5\noptim: {lr: 1.0, clip: 2}\n")
    config = parse(["--config", str(path), "--steps", "6", "--names", "p", "q", "--ids", "1", "2",
                    "--no-shuffle", "--optim.lr", "3e-4", "--optim.kind", "sgd", "--optim.clip", "none"])
    assert config == Run(out="o", steps=6, names=("p", "q"), ids=(1, 2), shuffle=False,
                         optim=Optim(lr=3e-4, clip=None, kind="sgd"))
    assert parse(["--config", str(path)]).optim == Optim(lr=1.0, clip=2.0)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--out", "o", "--steps", "3.5"], "--steps 3.5: expected an integer"),
        (["--out", "o", "--ids", "1", "x"], "--ids 1 x: expected a list of integers"),
        (["--out", "o", "--optim.kind", "rmsprop"], "--optim.kind rmsprop: expected one of adam, sgd"),
        (["--steps", "3"], "missing required option\\(s\\): --out"),
    ],
)
def test_wrong_flag_values_name_the_flag(argv, expected):
    with pytest.raises(KdaugError, match=expected):
        parse(argv)


def test_help_comes_from_the_fields():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Run)
    text = " ".join(parser.format_help().split())
    assert "--optim.clip FLOAT gradient-norm clip [eV/A] --" in text  # optional, default None: no suffix
    assert "--ids INT [INT ...] ids --" in text
    assert "--optim.kind {adam,sgd} optimizer (default: adam)" in text
    assert "--out TEXT output directory (required)" in text


def cli(*args):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(list(args))
    return code, stderr.getvalue().strip().splitlines()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("adsorbate_ids: 5", "adsorbate_ids: expected a list of integers or null, got 5"),
        ("out: 5", "out: expected a string, got 5"),
        ("n_systems: 3.5", "n_systems: expected an integer, got 3.5"),
        ('seed: "7"', "seed: expected an integer, got '7'"),
        ("teacher: [emt", "recipe.yaml:4: invalid YAML .* at line 3"),
    ],
)
def test_generate_recipe_type_errors_are_one_line_and_write_nothing(tmp_path, body, expected):
    recipe = write(tmp_path / "recipe.yaml", f"n_systems: 2\nteacher: emt\n{body}\n")
    code, lines = cli("generate", "--config", str(recipe), "--out", str(tmp_path / "out"))
    assert code == 2 and len(lines) == 1, lines
    assert str(recipe) in lines[0] and re.search(expected, lines[0]), lines
    assert not (tmp_path / "out").exists() and not (tmp_path / "5").exists()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["generate", "--n-systems", "2", "--teacher", "emt", "--max-miller", "0"], "--max-miller 0: expected at"),
        (["generate", "--n-systems", "2", "--teacher", "emt", "--max-atoms-per-batch", "0"],
         "--max-atoms-per-batch 0: expected at least 1"),
        (["generate", "--n-systems", "3.5", "--teacher", "emt"], "--n-systems 3.5: expected an integer"),
        (["rattle", "--input", "IN", "--teacher", "emt", "--batch-size", "0"], "--batch-size 0: expected at least"),
        (["rattle", "--input", "IN", "--teacher", "emt", "--fraction", "0"], "--fraction 0.0: expected a value in"),
        (["adversarial", "--input", "IN", "--student", "s.pt", "--batch-size", "0"], "--batch-size 0: expected"),
        (["adversarial", "--input", "IN", "--student", "s.pt", "--force-weight", "-1"], "--force-weight -1.0"),
    ],
)
def test_bad_option_values_are_one_line_before_anything_is_written(tmp_path, argv, expected):
    (tmp_path / "IN").mkdir()
    argv = [a.replace("IN", str(tmp_path / "IN")) for a in argv]
    code, lines = cli(*argv, "--out", str(tmp_path / "out"))
    assert code == 2 and len(lines) == 1 and re.search(expected, lines[0]), lines
    assert not (tmp_path / "out").exists()


def test_recipe_type_error_in_a_real_process(tmp_path):
    recipe = write(tmp_path / "recipe.yaml", "n_systems: 3.5\nteacher: emt\n")
    result = subprocess.run([sys.executable, "-m", "kdaug", "generate", "--config", str(recipe), "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, check=False, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [f"kdaug generate: error: {recipe}: n_systems: expected an integer, got 3.5"]
    assert not (tmp_path / "out").exists()
