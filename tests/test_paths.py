"""Command-line paths are checked before any work: one line naming the flag, nothing created."""
import os

import pytest

from ldm.paths import check_output, is_git_lfs_pointer, require_file


def test_output_paths_are_checked_before_any_work_and_nothing_is_created(tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    assert check_output(tmp_path / "a" / "b" / "out.json", "--out") == str(tmp_path / "a" / "b" / "out.json")
    assert check_output(tmp_path / "samples", "--outdir", folder=True) and check_output("rel.json", "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    for path, folder, expected in [
        (tmp_path, False, "--x '.*' is a folder"),
        (blocker / "out.json", False, "its folder '.*notes.txt' is a file"),
        (blocker, True, "it is a file, not a folder"),
        (blocker / "sub", True, "its folder '.*notes.txt' is a file"),
    ]:
        with pytest.raises(ValueError, match=expected):
            check_output(path, "--x", folder=folder)


def test_an_output_folder_that_is_not_writable_is_named(tmp_path, monkeypatch):
    """(Tests may run as root, whom os.access lets write anywhere: the answer is what the check asks.)"""
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(tmp_path))
    with pytest.raises(ValueError, match=f"--out '.*out.json': the folder '{tmp_path}' is not writable"):
        check_output(tmp_path / "new" / "out.json", "--out")


def test_require_file_tells_a_folder_from_a_typo(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"x")
    assert require_file(tmp_path / "model.ckpt", "--ckpt", "check the path") == str(tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match="--ckpt '.*' is a folder: pass the file inside it"):
        require_file(tmp_path, "--ckpt", "check the path")
    with pytest.raises(FileNotFoundError, match="--ckpt '.*typo.ckpt' does not exist: check the path"):
        require_file(tmp_path / "typo.ckpt", "--ckpt", "check the path")


def test_git_lfs_pointers_are_recognised(tmp_path):
    pointer, real = tmp_path / "pointer.ckpt", tmp_path / "real.ckpt"
    pointer.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 4\n")
    real.write_bytes(b"PK\x03\x04")
    assert is_git_lfs_pointer(pointer) and not is_git_lfs_pointer(real)
