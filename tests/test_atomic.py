"""Atomic writes leave the old file, or nothing, when writing fails."""

import os

import pytest

from saecircuits.atomic import atomic_write, atomic_write_text


def test_writes_and_replaces(tmp_path):
    p = atomic_write_text(tmp_path / "sub" / "a.txt", "one")
    assert p.read_text() == "one"
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert os.listdir(p.parent) == ["a.txt"]


def test_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    p = atomic_write_text(tmp_path / "a.txt", "old")

    def half_then_fail(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(p, half_then_fail)
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_written_files_get_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o644
