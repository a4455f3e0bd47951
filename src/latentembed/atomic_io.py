"""All-or-nothing writes of files and directories: a crash leaves the old version or the new one.

Every save of latentembed (models, decoders, adapters, a training run's output) goes through
this module, as sqlite and git do it: write a temporary sibling, fsync, rename.

* :func:`atomic_write_bytes` / :func:`atomic_write_text` / :func:`atomic_write_json`: one file.
* :func:`atomic_directory`: a whole directory, built in a sibling temporary directory and then
  swapped into place. On Linux the swap is ``renameat2(RENAME_EXCHANGE)``, one atomic step: at
  every instant the target is the complete old or the complete new directory. Where that call
  is missing (other systems, file systems that answer EINVAL) the old directory is first renamed
  to ``.<name>.old-...`` and the new one renamed into place: a crash between the two renames
  leaves no target, and the complete old version in ``.<name>.old-...``; the next save restores
  it (:func:`recover`) and loaders name it in their error (:func:`interrupted_save`).
* Leftovers of a killed save (``.<name>.tmp-<host>-<pid>-<rand>`` / ``.<name>.old-...``, hidden
  siblings of the target) are removed by the next save to the same target once their process is
  gone. Loading never needs them and never has to clean anything.

A directory save replaces the whole target: nothing of the old version survives (an old
shard index, an old ``tokenizer.json``, the adapters of an earlier run). So that no file of a
user's is deleted, the caller says which entries a save of its kind owns (``owned``: glob
patterns or a predicate); a target holding anything else is refused with
:class:`FileExistsError` before anything is written.

Limits: a leftover is known dead by its pid, so one whose pid a new process took waits for that
process to end, and one made on another machine sharing the file system is never removed
here. Concurrent saves to one target are not coordinated: with the exchange the last one wins
whole; without it one of them may fail. Durability assumes a file system where fsync of the
directory persists a rename (ext4, xfs, btrfs; Windows: NTFS journals renames, directories are
not fsynced).

Example::

    >>> with atomic_directory("out/model", owned=("config.json", "*.safetensors")) as tmp:  # doctest: +SKIP
    ...     (tmp / "config.json").write_text("{}")
    ...     save_file(tensors, str(tmp / "model.safetensors"))
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import json
import os
import re
import secrets
import shutil
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_directory",
    "check_replaceable",
    "recover",
    "interrupted_save",
    "missing_directory_message",
    "read_json",
    "Owned",
]

PathLike = Union[str, os.PathLike]
#: Which top-level entries of a target directory a save owns: glob patterns matched against the
#: entry's name, or a predicate on the entry's path.
Owned = Union[Sequence[str], Callable[[Path], bool]]

_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32]
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# Answers meaning "this file system or kernel cannot exchange": use the two-rename fallback.
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, getattr(errno, "EOPNOTSUPP", -1), getattr(errno, "ENOTSUP", -1)}


# -- names of temporary siblings ----------------------------------------------------------------


def _sibling(target: Path, kind: str, tag: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{tag}"


def _new_tag() -> str:
    return f"{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def _siblings(target: Path) -> list[tuple[Path, str, str, int]]:
    """(path, kind, host, pid) of every temporary sibling of ``target`` (kind: tmp or old)."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-([A-Za-z0-9_]*)-(\d+)-[0-9a-f]{{8}}$")
    try:
        names = os.listdir(target.parent)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        m = pattern.match(name)
        if m:
            found.append((target.parent / name, m[1], m[2], int(m[3])))
    return found


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there; never guess a Windows pid dead
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _abandoned(host: str, pid: int) -> bool:
    # A sibling of another machine (a shared file system) may belong to a live save there.
    return host == _HOST and not _pid_alive(pid)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# -- durability -------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync there; NTFS journals renames
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (bottom-up, ``root`` last)."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _make_parent(path: Path) -> None:
    """Create ``path``'s parent directories, each one durably (fsync of the directory holding it)."""
    missing = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        _fsync_dir(directory.parent)


# -- files ------------------------------------------------------------------------------------------


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to file ``path`` all-or-nothing: a temporary sibling
    (``.<name>.tmp-<host>-<pid>-<rand>``) is written, fsynced and renamed over ``path``, and the
    directory is fsynced. The parent directory is created if needed. Returns the path.

    Example:
        >>> atomic_write_bytes("out/vocab.bin", b"...")  # doctest: +SKIP
    """
    path = Path(os.path.abspath(path))
    _make_parent(path)
    recover(path)
    tmp = _sibling(path, "tmp", _new_tag())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded with ``encoding``."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: PathLike, obj: Any, *, indent: Optional[int] = 2) -> Path:
    """:func:`atomic_write_text` of ``obj`` as JSON (``indent`` 2, a final newline). The object
    is serialised before anything is written, so an unserialisable one leaves ``path`` as it was."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def read_json(path: PathLike, *, expect: type = dict) -> Any:
    """The JSON value in file ``path``, which must be an ``expect`` (default: an object).
    ValueError naming the file (and the line and column) for invalid JSON, text that is not
    UTF-8, or a value of another type; FileNotFoundError when it is missing.

    Example:
        >>> read_json("model/latentembed.json")["embedding"]  # doctest: +SKIP
    """
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}): not a JSON file") from None
    if expect is not None and not isinstance(value, expect):
        names = {dict: "a JSON object", list: "a JSON array"}
        raise ValueError(f"{path} must hold {names.get(expect, expect.__name__)}, got {type(value).__name__}")
    return value


# -- directories ------------------------------------------------------------------------------------


def _is_owned(entry: Path, owned: Owned) -> bool:
    if callable(owned):
        return bool(owned(entry))
    return any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in owned)


def check_replaceable(target: PathLike, owned: Owned) -> None:
    """Raise :class:`FileExistsError` unless a save may replace ``target``: it does not exist, is
    an empty directory, or is a directory whose every entry is ``owned`` by saves of this kind.
    Callers with a long job before the save (training) call it first to fail early."""
    target = Path(os.path.realpath(target))
    if not os.path.lexists(target):
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; a save writes a directory there")
    foreign = sorted(e.name for e in target.iterdir() if not _is_owned(e, owned))
    if foreign:
        listed = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
        raise FileExistsError(
            f"{target} holds entries a save there does not write ({listed}); a save replaces the whole "
            "directory and would delete them: save to another directory, or move them away"
        )


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names ``a`` and ``b`` (Linux renameat2); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) failed: {os.strerror(err)}", str(a), None, str(b))


def _swap_into_place(new: Path, target: Path, tag: str) -> Optional[Path]:
    """Put directory ``new`` at ``target``; returns where the old version now is (or None)."""
    if not os.path.lexists(target):
        os.rename(new, target)
        _fsync_dir(target.parent)
        return None
    if _exchange(new, target):
        _fsync_dir(target.parent)
        return new
    # No atomic exchange: between these two renames there is no target, only the complete old
    # version at .<name>.old-<tag> (restored by recover(), named by interrupted_save()).
    old = _sibling(target, "old", tag)
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    _fsync_dir(target.parent)
    return old


@contextlib.contextmanager
def atomic_directory(target: PathLike, *, owned: Owned) -> Iterator[Path]:
    """Build a directory in a temporary sibling and swap it in as ``target``, all-or-nothing.

    Yields a fresh empty directory ``.<name>.tmp-<host>-<pid>-<rand>`` next to ``target`` to be
    filled. On normal exit every file in it is fsynced and it replaces ``target`` (module
    docstring: atomic exchange on Linux, else two renames); the old contents are deleted. On an
    exception the temporary directory is removed and ``target`` is untouched.

    Args:
        target: the directory to (re)place; symlinks are resolved, so a linked directory is
            replaced where it lives. Parent directories are created.
        owned: the top-level entries a save of this kind writes (glob patterns, or a predicate on
            the entry's path). An existing target holding other entries is refused
            (:class:`FileExistsError`, checked before the block runs and again before the swap),
            so a user's files are never deleted; stale owned entries are.

    Leftovers of earlier killed saves to ``target`` are cleaned up first (:func:`recover`).

    Example:
        >>> with atomic_directory("run/adapters", owned=lambda p: p.is_dir()) as tmp:  # doctest: +SKIP
        ...     save_peft_adapter(model, "query", tmp / "query")
    """
    target = Path(os.path.realpath(target))
    _make_parent(target)
    recover(target)
    check_replaceable(target, owned)
    tag = _new_tag()
    tmp = _sibling(target, "tmp", tag)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        check_replaceable(target, owned)  # files a user added while the block ran
        old = _swap_into_place(tmp, target, tag)
    except BaseException:
        _remove(tmp)
        raise
    if old is not None:
        # The save is complete: failing to delete the old version (files still open on Windows)
        # must not fail it; a later save removes the leftover.
        shutil.rmtree(old, ignore_errors=True)


# -- recovery ---------------------------------------------------------------------------------------


def recover(target: PathLike) -> list[Path]:
    """Clean up after saves to ``target`` that were killed: if ``target`` is missing and a dead
    process left its previous version at ``.<name>.old-...``, rename that back; then delete the
    dead processes' ``.<name>.tmp-...`` / ``.<name>.old-...`` siblings. Siblings of live processes
    (and, on a shared file system, of other machines) are left alone. Every save calls it first;
    loaders do not need it. Returns the paths restored or deleted.
    """
    target = Path(os.path.abspath(target))
    dead = [(path, kind) for path, kind, host, pid in _siblings(target) if _abandoned(host, pid)]
    done = []
    if not os.path.lexists(target):
        olds = sorted((p for p, kind in dead if kind == "old"), key=lambda p: p.stat().st_mtime)
        if olds:
            os.rename(olds[-1], target)
            _fsync_dir(target.parent)
            done.append(olds[-1])
            dead = [(p, k) for p, k in dead if p != olds[-1]]
    for path, _ in dead:
        _remove(path)
        done.append(path)
    return done


def interrupted_save(target: PathLike) -> Optional[Path]:
    """The previous version of a missing ``target`` that a killed save left at
    ``.<name>.old-...`` (only possible without an atomic exchange), or None. For loaders'
    error messages; nothing is changed."""
    target = Path(os.path.abspath(target))
    if os.path.lexists(target):
        return None
    olds = [p for p, kind, _, _ in _siblings(target) if kind == "old"]
    return max(olds, key=lambda p: p.stat().st_mtime) if olds else None


def missing_directory_message(target: PathLike, what: str = "directory") -> str:
    """``"<what> <target> does not exist"``, plus where an interrupted save left its previous
    version, if it did."""
    message = f"{what} {target} does not exist"
    old = interrupted_save(target)
    if old is not None:
        message += (
            f"; a save to it was interrupted and left the previous version at {old}: rename it to "
            f"{Path(target).name} (the next save there does it too)"
        )
    return message
