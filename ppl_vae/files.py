"""Crash-safe files: every file of a run folder is replaced atomically, or not at all.

A file is written to a temporary name in its own folder (``.<stem>.<pid>.tmp<suffix>``, so that
writers that read the format off the suffix still do), flushed and fsynced, renamed over the
old one, and the folder is fsynced so that the rename itself survives a power cut. A
:class:`Staged` set of files is renamed into place only once every one of them is written, so a
command that fails half way leaves the folder as it found it. Temporary files whose process is
gone are removed by :func:`remove_stale_temps` at the next start.

Operating-system failures a user can fix (permissions, a read-only or full disk, a path that is
a file) become one-line :class:`~ppl_vae.errors.UserError`s naming the path (:func:`os_error`).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from ppl_vae.errors import UserError

TEMP = re.compile(r"^\.(?P<stem>.+)\.(?P<pid>\d+)\.tmp(?P<suffix>\.[^.]*)?$")

# errno values that describe the user's filesystem, not a bug of ours
USER_ERRNOS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only filesystem",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOTDIR: "a path component is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.ENOENT: "no such file or folder",
    errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "name too long",
    errno.EFBIG: "file too large",
    errno.EIO: "input/output error",
}


def os_error(err: OSError, path: str | Path, what: str = "") -> UserError:
    """A one-line user error for ``err`` on ``path``; re-raise ``err`` itself when it is not
    one a user can fix. ``what`` says what was being done and how to go on."""
    if err.errno not in USER_ERRNOS:
        raise err
    reason = USER_ERRNOS[err.errno]
    return UserError(f"{path}: {reason}" + (f"; {what}" if what else ""))


def temp_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a rename in it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Staged:
    """Files written under temporary names and renamed into place together by :meth:`commit`.

    ``with Staged(folder, hint) as stage:`` → ``stage.path("eval.json")`` is the temporary path
    to write; leaving the block normally commits, an exception removes every temporary file.
    ``hint`` is added to the message of a disk error (what the user can do).
    """

    def __init__(self, folder: Path, hint: str = "", keep: bool = True):
        self.folder = Path(folder)
        self.hint = hint
        self.keep = keep  # False: written aside and dropped (the other ranks of a distributed job)
        self.files: dict[str, Path] = {}
        self._aside = None if keep else tempfile.TemporaryDirectory(prefix="ppl_vae-rank-")

    def path(self, name: str) -> Path:
        if name not in self.files:
            folder = self.folder if self._aside is None else Path(self._aside.name)
            self.files[name] = temp_path(folder / name)
        return self.files[name]

    def location(self, name: str) -> Path:
        """Where ``name`` can be read now: its staged version if there is one."""
        return self.files.get(name, self.folder / name)

    def write_bytes(self, name: str, payload: bytes) -> None:
        self._guard(name, lambda p: p.write_bytes(payload))

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def write_with(self, name: str, writer: Callable[[Path], object]) -> Path:
        """Let ``writer(temp_path)`` write ``name`` (a figure, a NetCDF file)."""
        self._guard(name, writer)
        return self.files[name]

    def _guard(self, name: str, writer: Callable[[Path], object]) -> None:
        tmp = self.path(name)
        try:
            writer(tmp)
        except OSError as err:
            raise os_error(err, self.folder / name, self.hint) from None

    def commit(self) -> None:
        if not self.keep:
            return
        where = self.folder  # named by the error: the file being synced or renamed
        try:
            for name, tmp in self.files.items():
                where = self.folder / name
                fsync(tmp)
            for name, tmp in self.files.items():
                where = self.folder / name
                os.replace(tmp, where)
            where = self.folder
            fsync(self.folder)
        except OSError as err:
            raise os_error(err, where, self.hint) from None
        self.files.clear()

    def discard(self) -> None:
        for tmp in self.files.values():
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        self.files.clear()
        if self._aside is not None:
            self._aside.cleanup()

    def __enter__(self) -> Staged:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            try:
                self.commit()
            finally:
                self.discard()
        else:
            self.discard()


def write_atomic(path: Path, payload: bytes | str, hint: str = "") -> None:
    """Replace ``path`` by ``payload`` atomically (temporary file, fsync, rename, folder fsync)."""
    path = Path(path)
    with Staged(path.parent, hint) as stage:
        if isinstance(payload, str):
            stage.write_text(path.name, payload)
        else:
            stage.write_bytes(path.name, payload)


def torch_bytes(obj: object) -> bytes:
    """``torch.save`` into memory: the file itself is then written by Python's own I/O, whose
    disk errors are plain ``OSError``s (torch's writer turns them into long ``RuntimeError``s)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporary files in ``folder`` left by processes that no longer run."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = TEMP.match(entry.name)
        if match is None or _alive(int(match["pid"])) or not entry.is_file():
            continue
        with contextlib.suppress(OSError):
            entry.unlink()
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except OverflowError:
        return False
    return True


def folder_problem(path: Path) -> str:
    """Why ``path``, which is not a folder, cannot be used as one, for a one-line error."""
    return "is a file, not a folder" if Path(path).exists() else "no such directory"


def check_writable(folder: Path, what: str) -> None:
    """Fail with one line now, before any work, when nothing can be written into ``folder``
    (permissions, a read-only filesystem); ``what`` says what the user can do."""
    probe = temp_path(Path(folder) / "write-probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise os_error(err, folder, what) from None


def remove_created(path: Path, top: Path) -> None:
    """Remove the folder ``path``, then its parents up to ``top`` while they are empty (another
    process may have put something there meanwhile)."""
    remove_tree(path)
    folder, top = Path(path).absolute().parent, Path(top).absolute()
    while folder == top or top in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            break
        folder = folder.parent


def remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
