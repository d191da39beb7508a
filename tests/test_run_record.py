"""`kdaug.data.run_record`: resume records, atomic writes and path guards."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os

import pytest
import torch

from kdaug.data.run_record import (
    atomic_write,
    check_input_paths,
    check_output_not_input,
    check_resume,
    make_output_dir,
    option_differences,
    read_json,
    sha256_of,
    to_json,
    write_json,
)
from kdaug.errors import KdaugError


@dataclasses.dataclass(frozen=True)
class Options:
    seed: int = 0
    paths: tuple[str, ...] = ("a", "b")


def test_to_json_reads_back_as_stored():
    assert to_json(Options()) == {"seed": 0, "paths": ["a", "b"]}
    assert to_json({"x": (1, 2)}) == {"x": [1, 2]}


def test_differences_list_stored_and_now_outside_the_options_that_may_change():
    stored, now = {"seed": 0, "lr": 0.1, "device": "cpu"}, {"seed": 1, "device": "cuda", "new": 3}
    assert option_differences(stored, now, {"device"}) == ["lr 0.1 -> '<unset>'", "new '<unset>' -> 3",
                                                          "seed 0 -> 1"]
    check_resume("--out x", stored, {**stored, "device": "cuda"}, {"device"})
    with pytest.raises(KdaugError, match=r"^--out x was started with other options: seed 0 -> 1; rerun"):
        check_resume("--out x", {"seed": 0}, {"seed": 1})


def test_atomic_write_keeps_the_old_file_when_a_write_fails(tmp_path):
    path = tmp_path / "state.pt"
    atomic_write(path, lambda handle: torch.save({"step": 1}, handle))
    assert torch.load(path)["step"] == 1

    def full(handle):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(KdaugError, match=f"^no space left on device writing {path}$"):
        atomic_write(path, full)
    assert torch.load(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_atomic_write_into_a_read_only_folder_is_one_line(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere; a missing folder fails the same way
        target = tmp_path / "missing" / "x.json"
    else:
        tmp_path.chmod(0o500)
        target = tmp_path / "x.json"
    with pytest.raises(KdaugError, match="^cannot write .*x.json"):
        write_json(target, {"a": 1})


def test_json_round_trip_and_damage_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "config.json"
    write_json(path, {"a": [1, 2]})
    assert read_json(path, advice="x") == {"a": [1, 2]}
    for damage in (b'{"a": [1', b"\xff\xfe\x00", b""):
        path.write_bytes(damage)
        with pytest.raises(KdaugError, match=f"^{path}: damaged .*; move it away$"):
            read_json(path, advice="move it away")


def test_sha256_of_a_file(tmp_path):
    (tmp_path / "f").write_bytes(b"kdaug")
    assert sha256_of(tmp_path / "f") == hashlib.sha256(b"kdaug").hexdigest()


def test_empty_and_repeated_paths_are_refused_naming_the_flags(tmp_path):
    check_input_paths([("--train", tmp_path / "a"), ("--synthetic", tmp_path / "b")])
    with pytest.raises(KdaugError, match=r"^--val '': empty path"):
        check_input_paths([("--train", "a"), ("--val", "")])
    with pytest.raises(KdaugError, match=r"^--train .*a: given twice; name each input once$"):
        check_input_paths([("--train", str(tmp_path / "a")), ("--train", str(tmp_path / "x" / ".." / "a"))])
    with pytest.raises(KdaugError, match=r"given twice \(also as --train\)"):
        check_input_paths([("--train", str(tmp_path / "a")), ("--synthetic", str(tmp_path / "a"))])


@pytest.mark.parametrize("out", ["data", "data/run", "."])
def test_output_equal_to_inside_or_holding_an_input_is_refused(tmp_path, out):
    with pytest.raises(KdaugError, match=r"^--out .*: must not be \(inside\) the input --train .*data; nothing is"):
        check_output_not_input(tmp_path / "data", tmp_path / out, input_flag="--train")
    check_output_not_input(tmp_path / "data", tmp_path / "data-run")


def test_output_dir_is_made_and_a_file_or_read_only_place_is_one_line(tmp_path):
    assert make_output_dir(tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(KdaugError, match="^--out .*file: is an existing file; expected a folder$"):
        make_output_dir(tmp_path / "file")
    with pytest.raises(KdaugError, match="^--out .*file/sub: cannot write there"):
        make_output_dir(tmp_path / "file" / "sub")
