"""Checks on the files and folders that users name on the command line, made before any work starts.

A wrong path should cost one line naming the flag and the fix, not a traceback, nor a finished sampling or
evaluation thrown away because its output could not be written.
"""
import os

# How a Git LFS pointer starts: what a clone made without `git lfs pull` holds in place of a large file.
GIT_LFS_POINTER = b"version https://git-lfs"
GIT_LFS_FIX = "a Git LFS pointer, not the file itself: fetch the real file with git lfs pull"


def require_file(path, what: str, fix: str) -> str:
    """`path` as a string when it is a file; otherwise the one-line error, which tells a folder from a typo."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{what} '{path}' is a folder: pass the file inside it")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} '{path}' does not exist: {fix}")
    return path


def check_output(path, flag: str, folder: bool = False) -> str:
    """Fail now, naming `flag`, when output file `path` (with `folder`, output folder `path`) cannot be written
    once the work is done: a folder where the file goes, a file where a folder goes, a folder not writable.
    Nothing is created; missing folders are made when the output is written."""
    path = os.fspath(path)
    if not folder and os.path.isdir(path):
        raise ValueError(f"{flag} '{path}' is a folder: pass a file path, e.g. one inside it")
    target = os.path.abspath(path if folder else os.path.dirname(os.path.abspath(path)))
    existing = target
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "it" if existing == os.path.abspath(path) else f"its folder '{existing}'"
        raise ValueError(f"{flag} '{path}': {where} is a file, not a folder: choose another path")
    if not os.access(existing, os.W_OK):
        raise ValueError(f"{flag} '{path}': the folder '{existing}' is not writable")
    return path


def is_git_lfs_pointer(path) -> bool:
    """Whether the file at `path` is a Git LFS pointer (a small text file) instead of the large file it names."""
    with open(path, "rb") as handle:
        return handle.read(len(GIT_LFS_POINTER)) == GIT_LFS_POINTER
