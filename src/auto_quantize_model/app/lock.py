"""One owner per run folder: an OS file lock that dies with its process.

A run (or a sweep) holds ``fcntl.flock`` on ``<folder>/.aqm.lock`` for as long as it works in the
folder. The kernel drops the lock when the process ends, however it ends (``kill -9`` included),
so a folder is never left locked by a dead run and nobody has to clean up stale locks by hand.
The file's content names the holder (pid, host, process start, command) for the refusal
message; the lock itself, not the content, decides who owns the folder.

The holder removes the file when it lets go. A second process may have opened the file just
before that and then win the lock on the removed file, so after locking we check that the path
still names the file we locked, and start again if it does not.

Process identity: a pid alone can be reused; the pid together with the process's start time (from
``/proc``) names one process for the lifetime of a machine. :func:`is_alive` uses both, so that
``run.json`` can say which process owned a run and whether it is still there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

import attrs
import cattrs

from auto_quantize_model.app.logs import PACKAGE_LOGGER
from auto_quantize_model.errors import InputError
from auto_quantize_model.io.atomic import LinkRefused

log = logging.getLogger(PACKAGE_LOGGER)

LOCK_NAME = ".aqm.lock"
_ATTEMPTS = 5
_NO_LOCKS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS})
"""What ``flock`` says on a file system that has no locks (some network mounts)."""


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def process_started_at(pid: int) -> str | None:
    """When process ``pid`` started (UTC, seconds), from ``/proc``; None where there is no ``/proc``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
        boot = next(
            line
            for line in Path("/proc/stat").read_text(encoding="ascii").splitlines()
            if line[:6] == "btime "
        )
    except (OSError, StopIteration, UnicodeDecodeError):
        return None
    # the command name (field 2) is in parentheses and may hold spaces: count fields after it
    fields = stat.rpartition(")")[2].split()
    ticks = int(fields[19])  # field 22 of proc(5): start time in clock ticks after boot
    return _iso(int(boot.split()[1]) + ticks / os.sysconf("SC_CLK_TCK"))


_STARTED = process_started_at(os.getpid()) or _iso(time.time())


@attrs.frozen
class Owner:
    """The process that owns (or owned) a run folder."""

    pid: int
    host: str
    started_at: str
    """When the process started (UTC), which tells it apart from a later process with its pid."""

    @classmethod
    def me(cls) -> Owner:
        return cls(pid=os.getpid(), host=socket.gethostname(), started_at=_STARTED)

    def describe(self) -> str:
        return f"process {self.pid} on {self.host} (started {self.started_at})"


def is_alive(owner: Owner) -> bool | None:
    """Whether ``owner`` still runs: None when it ran on another host (only the lock can tell).

    This process counts as gone: a run it started earlier has ended, since runs never overlap
    within one process.
    """
    if owner.host != socket.gethostname():
        return None
    if owner.pid == os.getpid():
        return False
    started = process_started_at(owner.pid)
    if started is not None:
        return started == owner.started_at
    if Path("/proc/self/stat").exists():
        return False  # /proc works here, and has no entry for that pid
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@attrs.frozen
class Holder:
    """What the lock file says about the process holding it."""

    owner: Owner
    command: tuple[str, ...] = ()

    def describe(self) -> str:
        said = f": {' '.join(self.command)}" if self.command else ""
        return f"aqm {self.owner.describe()}{said}"


_CONVERTER = cattrs.Converter(forbid_extra_keys=False)


def read_holder(text: str) -> Holder | None:
    """The holder named in a lock file; None for an empty or unreadable one (it is being written)."""
    try:
        return _CONVERTER.structure(json.loads(text), Holder)
    except (ValueError, TypeError, cattrs.BaseValidationError):
        return None


class FolderBusy(InputError):
    """Another live process holds the folder's lock; the message names it."""

    def __init__(self, folder: Path, holder: Holder | None) -> None:
        self.folder = folder
        self.holder = holder
        who = holder.describe() if holder is not None else "another aqm process (it has not said which yet)"
        super().__init__(
            f"{folder} is in use by {who}; wait for it to finish or stop it, or choose another --output"
        )


class FolderLock:
    """A held lock on one folder; :meth:`release` (or leaving the ``with`` block) lets go."""

    def __init__(self, folder: Path, fd: int | None) -> None:
        self.folder = folder
        self.path = folder / LOCK_NAME
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, folder: Path, command: tuple[str, ...] = ()) -> FolderLock:
        """Lock ``folder`` (which must exist) or raise :class:`FolderBusy` at once; never waits.

        OS errors (a read-only folder, a full disk) propagate for the caller to word.
        """
        path = folder / LOCK_NAME
        for _ in range(_ATTEMPTS):
            try:  # never through a planted link: truncating its target would destroy a user's file
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as err:
                if err.errno != errno.ELOOP:
                    raise
                raise LinkRefused(
                    f"{path} is a symbolic link; aqm opens no lock file through a link: remove the link "
                    "(aqm makes its own lock file), then run again"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 1 << 16, 0).decode("utf-8", errors="replace")
                os.close(fd)
                raise FolderBusy(folder, read_holder(text)) from None
            except OSError as err:
                os.close(fd)
                if err.errno not in _NO_LOCKS:
                    raise
                path.unlink(missing_ok=True)
                log.warning(
                    "%s offers no file locks (%s): only run.json's owner record guards this folder",
                    folder,
                    os.strerror(err.errno),
                )
                return cls(folder, None)
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.path.samestat(os.fstat(fd), path.stat())
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file between our open and our lock
                os.close(fd)
                continue
            lock = cls(folder, fd)
            try:
                lock._write(Holder(Owner.me(), command))
            except BaseException:
                lock.release()
                raise
            return lock
        raise FolderBusy(folder, None)

    def _write(self, holder: Holder) -> None:
        assert self._fd is not None
        data = (json.dumps(_CONVERTER.unstructure(holder)) + "\n").encode("utf-8")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file, then let go (removing first means no one can lock a dead file)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        fd, self._fd = self._fd, None
        os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
