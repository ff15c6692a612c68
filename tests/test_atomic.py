"""edgekv.atomic: the one way a file or a folder is replaced. One test per rule.

* a file is replaced whole, or (an exception mid-write) left untouched;
* the temporary file is removed on an error;
* the file and its folder are fsync-ed (``os.fsync`` recorded);
* a folder swap leaves the old or the new folder, never a mix, and removes the old copy
  (also without ``RENAME_EXCHANGE``: the two-rename fallback);
* it works when the target does not exist yet;
* the file system's refusals (permissions, disk full) are edgekv errors, one line.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest

from edgekv import atomic
from edgekv.atomic import (
    atomic_dir,
    atomic_file,
    publish_file,
    replace_dir_atomic,
    write_file_atomic,
)
from edgekv.errors import BudgetError, EdgeKVError, InputError


class Boom(Exception):
    pass


def entries(folder) -> list[str]:
    return sorted(os.listdir(folder))


def tree(folder: str) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(folder):
        for n in files:
            p = os.path.join(root, n)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


@pytest.fixture()
def fsyncs(monkeypatch):
    """Every fsync-ed descriptor, as the path it names (``/proc/self/fd``)."""
    seen: list[str] = []
    real = os.fsync

    def record(fd):
        seen.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return seen


# --- files ---------------------------------------------------------------------------
def test_file_is_replaced_whole(tmp_path):
    p = tmp_path / "a.json"
    p.write_text("old")
    assert write_file_atomic(p, "new ☃") == len("new ☃".encode())
    assert p.read_text(encoding="utf-8") == "new ☃"
    assert write_file_atomic(p, b"\x00\x01") == 2 and p.read_bytes() == b"\x00\x01"
    assert entries(tmp_path) == ["a.json"]


def test_exception_mid_write_leaves_the_target_untouched_and_no_temp(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")
    with pytest.raises(Boom), atomic_file(p, "w") as f:
        f.write("half of the new")
        f.flush()
        assert any(n.startswith(".a.txt.tmp-") for n in entries(tmp_path))  # written beside it
        raise Boom()
    assert p.read_text() == "old"
    assert entries(tmp_path) == ["a.txt"]  # temp file removed


def test_temp_file_removed_when_the_rename_fails(tmp_path, monkeypatch):
    p = tmp_path / "a.txt"
    p.write_text("old")

    def fail(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(EdgeKVError, match="cannot write it: Input/output error; it is unchanged"):
        write_file_atomic(p, "new")
    assert p.read_text() == "old" and entries(tmp_path) == ["a.txt"]


def test_file_and_folder_are_fsynced(tmp_path, fsyncs):
    p = tmp_path / "m.json"
    write_file_atomic(p, "{}")
    # the data (the temporary file, renamed since: its descriptor was fsync-ed before the rename)
    assert any(os.path.basename(s).startswith(".m.json.tmp-") for s in fsyncs), fsyncs
    assert str(tmp_path) in fsyncs  # the folder, after the rename
    assert fsyncs.index(str(tmp_path)) > max(i for i, s in enumerate(fsyncs) if ".m.json.tmp-" in s)


def test_publish_file_fsyncs_the_file_then_the_folder(tmp_path, fsyncs):
    tmp, p = tmp_path / ".x.tmp", tmp_path / "x"
    tmp.write_bytes(b"data")
    publish_file(tmp, p)
    assert fsyncs == [str(tmp), str(tmp_path)] and p.read_bytes() == b"data"


def test_target_that_does_not_exist_yet(tmp_path):
    p = tmp_path / "new.bin"
    with atomic_file(p) as f:
        f.write(b"abc")
    assert p.read_bytes() == b"abc" and entries(tmp_path) == ["new.bin"]
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~_umask()  # the usual mode, not mkstemp's 0600


def _umask() -> int:
    u = os.umask(0)
    os.umask(u)
    return u


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_permission_error_is_an_edgekv_error_in_one_line(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "a.txt").write_text("old")
    folder.chmod(0o500)
    try:
        with pytest.raises(InputError) as e:
            write_file_atomic(folder / "a.txt", "new")
        assert "\n" not in str(e.value) and "Permission denied" in str(e.value) and "unchanged" in str(e.value)
        assert (folder / "a.txt").read_text() == "old"
    finally:
        folder.chmod(0o700)


def test_read_only_folder_is_an_input_error_in_one_line(tmp_path, monkeypatch):
    """The same refusal, simulated (root ignores folder permissions)."""
    p = tmp_path / "a.txt"
    p.write_text("old")
    real = os.open

    def refuse(path, *args, **kw):
        if ".a.txt.tmp-" in os.fspath(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path, *args, **kw)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(InputError) as e:
        write_file_atomic(p, "new")
    msg = str(e.value)
    assert msg.count("\n") == 0 and msg.startswith(f"{p}: cannot write it: Permission denied") and "unchanged" in msg
    assert p.read_text() == "old" and entries(tmp_path) == ["a.txt"]


def test_disk_full_is_a_budget_error_in_one_line(tmp_path, monkeypatch):
    p = tmp_path / "a.txt"
    p.write_text("old")
    real = os.fsync

    def full(fd):
        if ".a.txt.tmp-" in os.path.realpath(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(BudgetError) as e:
        write_file_atomic(p, "new")
    assert str(e.value).count("\n") == 0 and "No space left on device" in str(e.value)
    assert p.read_text() == "old" and entries(tmp_path) == ["a.txt"]


# --- folders -------------------------------------------------------------------------
def _make(folder, files: dict[str, str]) -> None:
    os.makedirs(folder, exist_ok=True)
    for name, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "two-renames"])
def test_folder_swap_leaves_the_new_folder_whole_and_removes_the_old(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "exchange_paths", lambda a, b: False)
    final, staging = tmp_path / "out", tmp_path / ".out.tmp-1"
    _make(final, {"a": "old a", "old-only": "x", "sub/c": "old c"})
    _make(staging, {"a": "new a", "b": "new b"})
    replace_dir_atomic(staging, final)
    assert tree(str(final)) == {"a": b"new a", "b": b"new b"}  # nothing of the old one mixed in
    assert entries(tmp_path) == ["out"]  # old copy and staging gone


def test_folder_swap_failure_leaves_the_old_folder(tmp_path, monkeypatch):
    final = tmp_path / "out"
    _make(final, {"a": "old a"})
    monkeypatch.setattr(atomic, "exchange_paths", lambda a, b: False)
    real_rename = os.rename

    def second_rename_fails(src, dst):
        if os.path.basename(str(src)).startswith(".out.tmp-"):
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", second_rename_fails)
    with pytest.raises(EdgeKVError, match="cannot replace the folder"):
        with atomic_dir(final) as tmp:
            _make(tmp, {"a": "new a", "b": "new b"})
    assert tree(str(final)) == {"a": b"old a"}  # the old one, put back
    assert entries(tmp_path) == ["out"]


def test_folder_swap_is_old_or_new_at_every_step(tmp_path, monkeypatch):
    """Look at ``final`` after each rename the swap makes (what a crash there would leave)."""
    final = tmp_path / "out"
    _make(final, {"a": "old", "b": "old"})
    old, new = {"a": b"old", "b": b"old"}, {"a": b"new", "c": b"new"}
    seen = []
    real_exchange = atomic.exchange_paths

    def watch(a, b):
        ok = real_exchange(a, b)
        seen.append(tree(str(final)))
        return ok

    monkeypatch.setattr(atomic, "exchange_paths", watch)
    with atomic_dir(final) as tmp:
        _make(tmp, {"a": "new", "c": "new"})
        seen.append(tree(str(final)))
    seen.append(tree(str(final)))
    assert seen[0] == old and seen[-1] == new
    assert all(s in (old, new) for s in seen)


def test_folder_that_does_not_exist_yet_and_error_inside_the_block(tmp_path, fsyncs):
    final = tmp_path / "deep" / "out"
    with atomic_dir(final) as tmp:
        _make(tmp, {"f": "1", "sub/g": "2"})
    assert tree(str(final)) == {"f": b"1", "sub/g": b"2"}
    # every file and folder of the new tree, and the parent after the rename, were fsync-ed
    for rel in ("f", "sub/g", "sub"):
        assert any(".out.tmp-" in s and s.endswith("/" + rel) for s in fsyncs), (rel, fsyncs)
    assert any(os.path.basename(s).startswith(".out.tmp-") for s in fsyncs)  # the staging folder itself
    assert fsyncs[-1] == str(tmp_path / "deep")  # the parent, after the rename
    with pytest.raises(Boom):
        with atomic_dir(final) as tmp:
            _make(tmp, {"f": "changed"})
            raise Boom()
    assert tree(str(final)) == {"f": b"1", "sub/g": b"2"}
    assert entries(tmp_path / "deep") == ["out"]


def test_stale_leftovers_of_dead_writers_are_removed(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("x")
    dead = 2 ** 22 + 12345  # above pid_max's default: no such process
    (tmp_path / f".a.txt.tmp-{dead}-0abc").write_text("stale")
    (tmp_path / f".a.txt.tmp-{os.getpid()}-0abc").write_text("a live writer's")
    assert atomic.remove_stale(p) == [f".a.txt.tmp-{dead}-0abc"]
    assert entries(tmp_path) == [f".a.txt.tmp-{os.getpid()}-0abc", "a.txt"]
