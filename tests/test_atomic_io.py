"""latentembed.atomic_io: all-or-nothing file and directory writes, refusal to delete foreign
files, clean-up after killed saves, and SIGKILL trials of both swap paths (the atomic exchange
and the two-rename fallback)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from latentembed import atomic_io
from latentembed.atomic_io import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    check_replaceable,
    interrupted_save,
    read_json,
    recover,
)

LINUX = sys.platform.startswith("linux")


def _names(path: Path) -> list:
    return sorted(p.name for p in path.iterdir())


def _random_bytes(n: int) -> bytes:
    return bytes(torch.randint(0, 256, (n,), dtype=torch.uint8).tolist())


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


@pytest.fixture(params=["exchange", "fallback"])
def swap_path(request, monkeypatch):
    """Run a test with renameat2's exchange and with the two-rename fallback."""
    if request.param == "exchange" and not LINUX:
        pytest.skip("renameat2(RENAME_EXCHANGE) is Linux-only")
    if request.param == "fallback":
        monkeypatch.setattr(atomic_io, "_exchange", lambda a, b: False)
    return request.param


# -- files ------------------------------------------------------------------------------------------


def test_atomic_write_replaces_a_file_and_leaves_no_temporary(tmp_path):
    data = _random_bytes(3001)
    atomic_write_bytes(tmp_path / "f.bin", data)
    assert (tmp_path / "f.bin").read_bytes() == data
    obj = {"x": torch.rand(()).item(), "names": ["é", "b"]}
    atomic_write_json(tmp_path / "f.bin", obj)
    assert json.loads((tmp_path / "f.bin").read_text(encoding="utf-8")) == obj
    assert _names(tmp_path) == ["f.bin"]


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    old = _random_bytes(100)
    atomic_write_bytes(tmp_path / "f", old)
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "f", {"x": object()})
    monkeypatch.setattr(atomic_io.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(tmp_path / "f", _random_bytes(100))
    assert (tmp_path / "f").read_bytes() == old and _names(tmp_path) == ["f"]


def test_read_json_names_the_file(tmp_path):
    (tmp_path / "a.json").write_text('{"a": 1,\n "b": }')
    with pytest.raises(ValueError, match=r"a\.json is not valid JSON: .* line 2 column 7"):
        read_json(tmp_path / "a.json")
    (tmp_path / "b.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"b\.json must hold a JSON object, got list"):
        read_json(tmp_path / "b.json")
    (tmp_path / "c.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match=r"c\.json is not UTF-8"):
        read_json(tmp_path / "c.json")


# -- directories ------------------------------------------------------------------------------------


def test_atomic_directory_replaces_the_whole_directory(tmp_path, swap_path):
    target = tmp_path / "d"
    with atomic_directory(target, owned=("*.bin", "sub")) as tmp:
        (tmp / "stale.bin").write_bytes(_random_bytes(10))
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.bin").write_bytes(_random_bytes(10))
    data = _random_bytes(50)
    with atomic_directory(target, owned=("*.bin", "sub")) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".d.tmp-")
        (tmp / "new.bin").write_bytes(data)
    assert _names(target) == ["new.bin"] and (target / "new.bin").read_bytes() == data
    assert _names(tmp_path) == ["d"]


def test_an_exception_in_the_block_leaves_the_target_untouched(tmp_path, swap_path):
    target = tmp_path / "d"
    data = _random_bytes(40)
    with atomic_directory(target, owned=("*",)) as tmp:
        (tmp / "a").write_bytes(data)
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target, owned=("*",)) as tmp:
            (tmp / "b").write_bytes(_random_bytes(40))
            raise RuntimeError("boom")
    assert _names(target) == ["a"] and (target / "a").read_bytes() == data
    assert _names(tmp_path) == ["d"]


def test_a_directory_with_foreign_entries_is_refused_and_kept(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "model.bin").write_bytes(_random_bytes(8))
    (target / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"d holds entries a save there does not write \(mine\.txt\)"):
        with atomic_directory(target, owned=("*.bin",)) as tmp:
            (tmp / "model.bin").write_bytes(b"new")
    assert _names(target) == ["mine.txt", "model.bin"] and _names(tmp_path) == ["d"]
    (tmp_path / "f").write_text("a file")
    with pytest.raises(FileExistsError, match="not a directory"):
        check_replaceable(tmp_path / "f", owned=("*",))


def test_entries_added_during_the_block_are_not_deleted(tmp_path, swap_path):
    target = tmp_path / "d"
    with atomic_directory(target, owned=("*.bin",)) as tmp:
        (tmp / "a.bin").write_bytes(b"1")
    with pytest.raises(FileExistsError, match="late.txt"):
        with atomic_directory(target, owned=("*.bin",)) as tmp:
            (tmp / "a.bin").write_bytes(b"2")
            (target / "late.txt").write_text("written by a user meanwhile")
    assert _names(target) == ["a.bin", "late.txt"] and (target / "a.bin").read_bytes() == b"1"
    assert _names(tmp_path) == ["d"]


def test_a_symlinked_target_is_replaced_where_it_lives(tmp_path, swap_path):
    real = tmp_path / "disk" / "model"
    with atomic_directory(real, owned=("*",)) as tmp:
        (tmp / "old").write_text("old")
    (tmp_path / "link").symlink_to(real)
    with atomic_directory(tmp_path / "link", owned=("*",)) as tmp:
        (tmp / "new").write_text("new")
    assert (tmp_path / "link").is_symlink() and _names(real) == ["new"]
    assert _names(tmp_path / "disk") == ["model"]


@pytest.mark.skipif(not LINUX, reason="renameat2(RENAME_EXCHANGE) is Linux-only")
def test_the_exchange_swaps_two_directories(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b" / "y").write_text("b")
    assert atomic_io._exchange(tmp_path / "a", tmp_path / "b")
    assert _names(tmp_path / "a") == ["y"] and _names(tmp_path / "b") == ["x"]


# -- recovery ---------------------------------------------------------------------------------------


def test_recover_restores_and_removes_what_dead_saves_left(tmp_path):
    host, dead = atomic_io._HOST, _dead_pid()
    target = tmp_path / "d"
    old = tmp_path / f".d.old-{host}-{dead}-0000abcd"
    old.mkdir()
    (old / "w").write_text("previous version")
    (tmp_path / f".d.tmp-{host}-{dead}-0000abcd").mkdir()  # the new version, never renamed in
    live = tmp_path / f".d.tmp-{host}-{os.getpid()}-1111abcd"  # a save still running
    other_host = tmp_path / f".d.tmp-otherhost-{dead}-2222abcd"  # maybe live, on another machine
    live.mkdir()
    other_host.mkdir()
    (tmp_path / f".d.json.tmp-{host}-{dead}-3333abcd").write_text("another target's")
    assert interrupted_save(target) == old
    recover(target)
    assert (target / "w").read_text() == "previous version" and interrupted_save(target) is None
    assert _names(tmp_path) == sorted(["d", live.name, other_host.name, f".d.json.tmp-{host}-{dead}-3333abcd"])


def test_the_next_save_removes_a_killed_saves_temporary(tmp_path, swap_path):
    target = tmp_path / "d"
    with atomic_directory(target, owned=("*",)) as tmp:
        (tmp / "a").write_text("a")
    stale = tmp_path / f".d.tmp-{atomic_io._HOST}-{_dead_pid()}-0000abcd"
    stale.mkdir()
    (stale / "big").write_bytes(_random_bytes(1000))
    with atomic_directory(target, owned=("*",)) as tmp:
        (tmp / "b").write_text("b")
    assert _names(tmp_path) == ["d"] and _names(target) == ["b"]


# -- SIGKILL trials of both swap paths -----------------------------------------------------------------

# A child that loads atomic_io alone (no torch: it starts in milliseconds) and saves two
# versions of a directory in turn, forever: version v holds files 0..(9 - 4v), each all "v".
_CHILD = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("atomic_io", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
if sys.argv[3] == "fallback":
    m._exchange = lambda a, b: False
print("ready", flush=True)
i = 0
while True:
    v = i % 2
    with m.atomic_directory(sys.argv[2], owned=("*",)) as tmp:
        for j in range(10 - 4 * v):
            (tmp / f"{j}.txt").write_text(str(v) * 20000)
    i += 1
"""


def _version(target: Path):
    """0 or 1 if ``target`` holds exactly that version, else None."""
    for v in (0, 1):
        names = sorted(f"{j}.txt" for j in range(10 - 4 * v))
        if _names(target) == names and all((target / n).read_text() == str(v) * 20000 for n in names):
            return v
    return None


@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_killed_directory_saves_leave_one_whole_version(tmp_path, mode):
    if mode == "exchange" and not LINUX:
        pytest.skip("renameat2(RENAME_EXCHANGE) is Linux-only")
    target = tmp_path / "d"
    with atomic_directory(target, owned=("*",)) as tmp:
        for j in range(6):
            (tmp / f"{j}.txt").write_text("1" * 20000)
    rng = random.Random(int(torch.randint(0, 2**31 - 1, ()).item()))
    seen_leftovers = 0
    for trial in range(12):
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, atomic_io.__file__, str(target), mode], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.002, 0.05))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
        leftovers = [n for n in os.listdir(tmp_path) if n != "d"]
        seen_leftovers += bool(leftovers)
        if mode == "fallback" and not target.exists():  # killed between the two renames
            assert interrupted_save(target) is not None
        recover(target)
        assert os.listdir(tmp_path) == ["d"], f"trial {trial}: recover left {os.listdir(tmp_path)}"
        assert _version(target) is not None, f"trial {trial}: a killed save left {_names(target)}"
    assert seen_leftovers, "no kill landed inside a save"
