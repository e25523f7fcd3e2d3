"""Which process owns a file or folder: process identity, liveness, and lock files.

Two runs writing into one place must not mix their files: a training run folder belongs to one
run at a time (`run_folder_lock`), and a table several runs update (a folder's modal
mineralogy CSV) is rewritten by one run at a time (`file_lock`). A lock is a small file made
with an exclusive create, naming the host, the process id and the start time of its owner, so
a refusal can say who holds it. A lock whose owner died (kill -9, out of memory, power cut) is
stale: a process on the owner's host sees that the pid is gone and takes the lock over. Locks
of another host are never broken (its processes cannot be checked from here).

Temporary files carry the same identity in their names (`thinseg.io.atomic.temporary_name`), so
that the next run can tell an interrupted run's leftovers from a running one's files.
No `fcntl`/`msvcrt` locking: exclusive creates and hard links work on Linux, macOS and Windows
and on network shares where byte-range locks are unreliable.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import re
import secrets
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from thinseg.errors import ThinSegError

#: Name of the lock file in a training run folder.
RUN_LOCK = ".thinseg-run.lock"
#: A lock file that cannot be read (written by a process killed while writing it) is stale after this long.
UNREADABLE_STALE_S = 60.0
#: How long a lock is waited for by `file_lock` (a table update takes well under a second).
WAIT_S = 120.0


def _sanitised_host() -> str:
    name = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname()).strip("-")
    return name[:40] or "host"


#: This machine's name as it appears in lock files and temporary names (letters, digits, '-').
HOST = _sanitised_host()

#: Lock files this process holds now (its own pid in a lock it does not hold is a previous
#: process's: containers reuse small pids after a restart).
_held: set[str] = set()


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (Windows: without signalling it, since
    `os.kill(pid, 0)` there terminates the process)."""
    if pid <= 0:
        return False
    if sys.platform == "win32":
        return _pid_alive_windows(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OSError:
        return True  # cannot tell: assume it runs, never break a live lock
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """Whether `pid` has ended but was not reaped yet. A killed training rank whose launcher died
    too is handed to the machine's init, and some container inits never reap: its pid answers
    `kill(pid, 0)` for ever, though nothing runs. Linux only (/proc); False where it cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    # "pid (command) state ...": the command may hold spaces and parentheses
    fields = stat[stat.rfind(")") + 1 :].split()
    return bool(fields) and fields[0] in ("Z", "X")


def _pid_alive_windows(pid: int) -> bool:
    # deferred: ctypes is needed only on Windows
    import ctypes

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined,unused-ignore]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return bool(kernel32.GetLastError() == 5)  # access denied: it exists
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return bool(code.value == 259)  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def owner_is_gone(host: str, pid: int) -> bool:
    """Whether a file made by `pid` on `host` is an interrupted run's: its host is this one and
    the process is dead. Never true for this process or for another host."""
    return host == HOST and pid != os.getpid() and not pid_alive(pid)


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock: host, process id, start time (ISO 8601, local time)."""

    host: str
    pid: int
    since: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since}"

    def is_stale(self, lock: Path) -> bool:
        """Its process is dead (on this host), or it is this process's pid in a lock this process
        does not hold (a reused pid after a restart)."""
        if self.host != HOST:
            return False
        if self.pid == os.getpid():
            return str(lock) not in _held
        return not pid_alive(self.pid)


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def read_owner(lock: Path) -> LockOwner | None:
    """The owner written in `lock`; None when it cannot be read (missing, or half-written)."""
    try:
        data = json.loads(lock.read_text(encoding="utf-8"))
        return LockOwner(str(data["host"]), int(data["pid"]), str(data["since"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _create(lock: Path, owner: LockOwner) -> None:
    """Create `lock` holding `owner`, failing with FileExistsError if it exists. The content is
    written first under a private name and linked into place, so no reader sees an empty lock
    (file systems without hard links: exclusive create, then the content)."""
    text = json.dumps({"host": owner.host, "pid": owner.pid, "since": owner.since}) + "\n"
    staging = lock.with_name(f"{lock.name}.{HOST}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    staging.write_text(text, encoding="utf-8")
    try:
        try:
            os.link(staging, lock)
            return
        except FileExistsError:
            raise
        except (OSError, AttributeError) as error:
            if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EROFS, errno.ENOENT, errno.EACCES):
                raise
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
    finally:
        with contextlib.suppress(OSError):
            staging.unlink()


def _unreadable_and_old(lock: Path) -> bool:
    try:
        return time.time() - lock.stat().st_mtime > UNREADABLE_STALE_S
    except OSError:
        return False


@contextlib.contextmanager
def _breaking(lock: Path) -> Iterator[bool]:
    """A short exclusive section for removing a stale `lock`, so that two processes that both
    found it stale cannot remove each other's new lock. Yields False if another process is
    breaking it right now."""
    breaker = lock.with_name(lock.name + ".break")
    try:
        fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        if _unreadable_and_old(breaker):  # a breaker killed in these few lines
            with contextlib.suppress(OSError):
                breaker.unlink()
        yield False
        return
    os.close(fd)
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):
            breaker.unlink()


def try_lock(lock: Path) -> tuple[bool, LockOwner | None, LockOwner | None]:
    """One attempt at `lock`: (taken, owner now, stale owner taken over). `owner now` is the
    live holder when not taken."""
    owner = LockOwner(HOST, os.getpid(), _now())
    stale: LockOwner | None = None
    for _ in range(3):
        try:
            _create(lock, owner)
        except FileExistsError:
            pass
        else:
            _held.add(str(lock))
            return True, owner, stale
        holder = read_owner(lock)
        if holder is None:
            if not _unreadable_and_old(lock):
                return False, None, None
        elif not holder.is_stale(lock):
            return False, holder, None
        with _breaking(lock) as breaking:
            if not breaking:
                return False, holder, None
            if read_owner(lock) == holder and (holder is not None or _unreadable_and_old(lock)):
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                stale = holder
    return False, read_owner(lock), None


def release(lock: Path) -> None:
    """Remove `lock` if this process holds it (never another's)."""
    if str(lock) not in _held:
        return
    _held.discard(str(lock))
    holder = read_owner(lock)
    if holder is not None and holder.host == HOST and holder.pid == os.getpid():
        with contextlib.suppress(OSError):
            lock.unlink()


def _in_use(folder: Path, holder: LockOwner | None) -> str:
    who = holder.describe() if holder is not None else "a process that is starting"
    return f"in use by {who}"


@contextlib.contextmanager
def run_folder_lock(folder: str | os.PathLike[str], log: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Own the run folder `folder` (made if needed) for the block: a second run is refused at
    once, naming the owner; a dead owner's lock is taken over with a note to `log`. Released on
    exit, Ctrl-C and errors included."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ThinSegError.from_os_error(error, "cannot create the run folder", folder) from None
    lock = folder / RUN_LOCK
    try:
        taken, holder, stale = try_lock(lock)
    except OSError as error:
        raise ThinSegError.from_os_error(error, "cannot lock the run folder", folder) from None
    if not taken:
        raise ThinSegError(
            f"run folder {_in_use(folder, holder)}: wait for that run to end or choose another --output", folder
        )
    if stale is not None and log is not None:
        log(f"took over the run folder from an interrupted run ({stale.describe()})")
    try:
        yield lock
    finally:
        release(lock)


@contextlib.contextmanager
def file_lock(target: str | os.PathLike[str], wait_s: float = WAIT_S) -> Iterator[Path]:
    """Hold the lock of file `target` (`.NAME.lock` beside it) for the block, waiting up to
    `wait_s` for another run to finish its update; a dead owner's lock is taken over."""
    target = Path(target)
    lock = target.with_name(f".{target.name}.lock")
    deadline = time.monotonic() + wait_s
    delay = 0.01
    while True:
        try:
            taken, holder, _ = try_lock(lock)
        except OSError as error:
            raise ThinSegError.from_os_error(error, "cannot lock the file for an update", target) from None
        if taken:
            break
        if time.monotonic() > deadline:
            raise ThinSegError(f"cannot update: {_in_use(target, holder)} for over {wait_s:g} s", target)
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    try:
        yield lock
    finally:
        release(lock)
