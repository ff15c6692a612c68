"""The one way edgekv replaces a file or a folder on disk: whole or not at all, durably.

Every writer of a file another process (or the next run) reads goes through here:

* :func:`atomic_file` / :func:`write_file_atomic`: the bytes go to a temporary file in the
  target's own folder (``.NAME.tmp-PID-RANDOM``), which is flushed and ``fsync``-ed, renamed
  over the target (``os.replace``) and the folder ``fsync``-ed. After a crash at any point the
  target holds its old bytes or its new bytes, never a mix; on an error the temporary file is
  removed and the target is untouched.
* :func:`publish_file`: the rename + ``fsync`` part alone, for writers that build their
  temporary file themselves (the memory commit in :mod:`edgekv.format` copies the old file
  and patches it in place before publishing it).
* :func:`replace_dir_atomic` / :func:`atomic_dir`: a folder built beside the target (every
  file and the folder ``fsync``-ed) takes the target's place in one step: on Linux with
  ``renameat2(RENAME_EXCHANGE)``, so the path always names the whole old or the whole new
  folder; elsewhere (or on a file system without it) with two renames, the old folder moved
  aside first. The old copy is removed afterwards.

The file system's refusals (disk full, read-only, permissions) become one-line edgekv errors
(:class:`BudgetError`, :class:`InputError`, :class:`EdgeKVError`) that say the target is
unchanged. Standard library only: the device side uses it too.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import secrets
import shutil
from collections.abc import Iterator
from typing import IO

from edgekv.errors import BudgetError, EdgeKVError, InputError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_REFUSED = (errno.EACCES, errno.EPERM, errno.EROFS)
_counter = itertools.count()


def storage_error(e: OSError, target: str, what: str = "write it", unchanged: str = "it is unchanged") -> EdgeKVError:
    """The edgekv error (one line) for the file system refusing ``what`` on ``target``."""
    why = e.strerror or type(e).__name__
    name = os.path.basename(target)
    other = os.path.basename(os.fspath(e.filename)) if e.filename else name
    if other != name and not other.startswith(f".{name}."):  # not the target or its temporary copy
        why = f"{why}: {e.filename}"
    msg = f"{target}: cannot {what}: {why}; {unchanged}"
    if e.errno in _DISK_FULL:
        return BudgetError(msg + " (free some space)")
    if e.errno in _REFUSED:
        return InputError(msg + " (check the folder's permissions)")
    return EdgeKVError(msg)


@contextlib.contextmanager
def storage_errors(target: str, what: str = "write it", unchanged: str = "it is unchanged") -> Iterator[None]:
    """Turn an ``OSError`` raised inside the block into :func:`storage_error`'s edgekv error."""
    try:
        yield
    except OSError as e:
        raise storage_error(e, target, what, unchanged) from None


def fsync_dir(path: str | os.PathLike) -> None:
    """``fsync`` the folder ``path`` (its entries: a rename in it survives a power cut)."""
    fd = os.open(os.fspath(path) or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """``fsync`` the file at ``path`` (its data and size)."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parent(path: str) -> str:
    return os.path.dirname(os.path.abspath(path))


def temp_name(path: str | os.PathLike, tag: str = "tmp") -> str:
    """A fresh sibling of ``path`` for building its replacement: ``.NAME.TAG-PID-RANDOM``."""
    path = os.path.abspath(os.fspath(path))
    d, name = os.path.split(path)
    return os.path.join(d, f".{name}.{tag}-{os.getpid()}-{next(_counter)}{secrets.token_hex(3)}")


def _remove(path: str) -> None:
    """Remove a file or folder; missing is fine, other errors are ignored (best effort clean-up)."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass


def publish_file(tmp: str | os.PathLike, path: str | os.PathLike, synced: bool = False) -> None:
    """Rename the finished temporary file ``tmp`` over ``path`` and ``fsync`` the folder.

    ``tmp`` must be on ``path``'s file system (its folder, or a scratch folder inside it); it
    is ``fsync``-ed first unless ``synced`` (the caller did it on its open descriptor).
    Raises ``OSError``; the caller owns ``tmp``.
    """
    tmp, path = os.fspath(tmp), os.fspath(path)
    if not synced:
        fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(_parent(path))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None,
                newline: str | None = None) -> Iterator[IO]:
    """Write ``path`` whole or not at all: ``with atomic_file(p, "w") as f: f.write(...)``.

    ``mode`` is ``"w"`` (text, UTF-8 unless ``encoding``) or ``"wb"``. On leaving the block
    the file is flushed, ``fsync``-ed, renamed over ``path`` and the folder ``fsync``-ed; if
    the block raises, the temporary file is removed, ``path`` is untouched and the exception
    propagates (an ``OSError`` as an edgekv error).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    tmp = temp_name(path)
    f = None
    try:
        with storage_errors(path):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            f = os.fdopen(fd, mode, encoding=encoding, newline=newline)
            yield f
            f.flush()
            os.fsync(f.fileno())
            f.close()
            publish_file(tmp, path, synced=True)
    except BaseException:
        if f is not None and not f.closed:
            with contextlib.suppress(OSError):
                f.close()
        _remove(tmp)
        raise


def write_file_atomic(path: str | os.PathLike, data: bytes | str, encoding: str = "utf-8") -> int:
    """Replace ``path`` with ``data`` (``str``: encoded with ``encoding``) atomically and
    durably (see :func:`atomic_file`); returns the number of bytes written."""
    raw = data.encode(encoding) if isinstance(data, str) else bytes(data)
    with atomic_file(path, "wb") as f:
        f.write(raw)
    return len(raw)


# ---------------------------------------------------------------------------------
# folders
# ---------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2_exchange():
    """libc's ``renameat2`` (Linux, glibc >= 2.28), or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_exchange_fn = _renameat2_exchange()


def exchange_paths(a: str, b: str) -> bool:
    """Swap the two existing paths ``a`` and ``b`` in one step (``RENAME_EXCHANGE``).

    Returns False where the system or the file system cannot (then nothing changed);
    raises ``OSError`` for other failures.
    """
    if _exchange_fn is None:
        return False
    rc = _exchange_fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a)


def fsync_tree(folder: str) -> None:
    """``fsync`` every file and folder under ``folder`` (files first, then their folders)."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                fsync_file(p)
        fsync_dir(root)


def replace_dir_atomic(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the finished folder ``staging`` (a sibling of ``final``) in ``final``'s place.

    Every file in ``staging`` is ``fsync``-ed first. ``final`` then names the whole old or the
    whole new folder at every moment (``RENAME_EXCHANGE``; without it: the old folder is
    renamed aside, then ``staging`` into place, a crash in between leaves the old one beside it
    as ``.NAME.old-*``). The old copy is removed afterwards. On an error ``staging`` is
    removed, ``final`` is unchanged, and the error is an edgekv error.
    """
    staging, final = os.path.abspath(os.fspath(staging)), os.path.abspath(os.fspath(final))
    if _parent(staging) != _parent(final):
        raise ValueError(f"staging folder {staging} must be beside {final}")
    old = None  # where the old folder ends up once the new one is in place
    try:
        with storage_errors(final, "replace the folder"):
            fsync_tree(staging)
            if not os.path.lexists(final):
                try:
                    os.rename(staging, final)  # nothing to replace: one rename is atomic
                    old = ""
                except OSError as e:
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
                        raise
            if old is None and exchange_paths(staging, final):
                old = staging  # the old folder now sits at the staging path
            elif old is None:
                aside = temp_name(final, "old")
                os.rename(final, aside)
                try:
                    os.rename(staging, final)
                except BaseException:
                    os.rename(aside, final)
                    raise
                old = aside
            fsync_dir(_parent(final))
    except BaseException:
        if old is None:  # nothing changed: drop the new folder
            _remove(staging)
        elif old:
            _remove(old)
        raise
    if old:
        _remove(old)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[str]:
    """Build a folder that replaces ``final`` whole: ``with atomic_dir(out) as tmp: write into tmp``.

    The staging folder is a fresh sibling of ``final``; on leaving the block it replaces
    ``final`` (:func:`replace_dir_atomic`); if the block raises it is removed and ``final`` is
    untouched.
    """
    final = os.path.abspath(os.fspath(final))
    staging = temp_name(final)
    with storage_errors(final, "create a folder beside it"):
        os.makedirs(_parent(final), exist_ok=True)
        os.mkdir(staging)
    try:
        yield staging
    except BaseException:
        _remove(staging)
        raise
    replace_dir_atomic(staging, final)


def remove_stale(path: str | os.PathLike, tags: tuple[str, ...] = ("tmp", "old")) -> list[str]:
    """Remove leftovers of killed writers of ``path`` (``.NAME.tmp-*``, ``.NAME.old-*``) whose
    process is gone; returns what was removed."""
    path = os.path.abspath(os.fspath(path))
    d, name = os.path.split(path)
    removed = []
    try:
        names = os.listdir(d)
    except OSError:
        return removed
    for n in names:
        for tag in tags:
            prefix = f".{name}.{tag}-"
            if n.startswith(prefix):
                pid = n[len(prefix):].split("-", 1)[0]
                if pid.isdigit() and not _pid_alive(int(pid)):
                    _remove(os.path.join(d, n))
                    removed.append(n)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
