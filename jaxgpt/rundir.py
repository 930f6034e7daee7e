"""What protects a directory a script writes: one owner at a time, whole or nothing, and a full
or read-only disk reported as one line.

    with RunLock(out_dir):           # one training process owns an out_dir; a second one is refused
        ...
    with writing(path, "metrics"):   # an OSError (disk full, read-only, no permission) -> one UserError line
        ...
    with replace_dir(target, overwrite) as tmp:   # export: written into a temporary sibling, renamed when whole
        ...

The lock is `fcntl.flock` on out_dir/.lock: the kernel releases it when its process ends, however
it ends, so a killed trainer never leaves a directory locked. Where flock is not supported (some
network filesystems) the lock is a pid file created with O_EXCL; one left by a process that died
on this host is stale and taken over, one from another host must be removed by hand (its message
says so). Only this module knows the lock's format.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import time

from jaxgpt.errors import UserError

LOCK_NAME = ".lock"
# errors of the disk rather than of the program: what the user can fix by freeing space, choosing
# another directory or fixing permissions
DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied"}


def disk_errno(e: BaseException) -> int | None:
    """The errno of a disk problem behind `e`: an OSError, or one that TensorStore (Orbax's array
    writer) reports in its message as [os_error_code='28']; searched along the exception's causes."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return e.errno
        m = re.search(r"os_error_code='?(\d+)|\[Errno (\d+)\]", str(e))
        if m and int(m.group(1) or m.group(2)) in DISK_ERRNOS:
            return int(m.group(1) or m.group(2))
        e = e.__cause__ or e.__context__
    return None


def disk_error(what: str, path: str, code: int, hint: str = "") -> UserError:
    """The one line for a disk problem: what could not be written, where, why, and what to do."""
    todo = ("free some space or choose another --out_dir" if code in (errno.ENOSPC, errno.EDQUOT)
            else "choose a writable --out_dir or fix its permissions")
    return UserError(f"cannot write {what} to {path}: {DISK_ERRNOS[code]}; {todo}" + (f". {hint}" if hint else ""))


@contextlib.contextmanager
def writing(what: str, path: str, hint: str = ""):
    """Turns a disk problem while writing `path` into one line (other errors pass unchanged)."""
    try:
        yield
    except OSError as e:
        code = disk_errno(e)
        if code is None:
            raise
        raise disk_error(what, path, code, hint) from None


def _holder(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLock:
    """Exclusive ownership of an out_dir for one process (a context manager). Creates out_dir if
    needed; on release removes the lock file, and out_dir too if it made it and it is still empty
    (a run that failed before writing anything leaves nothing behind)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, LOCK_NAME)
        self.fd, self.made_dir, self.mode = None, False, None

    def __enter__(self) -> "RunLock":
        with writing("the lock file", self.path):
            self.made_dir = not os.path.isdir(self.out_dir)
            os.makedirs(self.out_dir, exist_ok=True)
            try:
                self._flock()
            except BaseException:
                self._remove_made_dir()
                raise
        return self

    def _refuse(self, holder: dict, extra: str = "") -> UserError:
        who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {holder.get('since', '?')}"
               if holder else "holder unknown")
        return UserError(f"{self.out_dir} is in use by another training process ({who}); wait for it to end or stop "
                         f"it, or choose another --out_dir{extra}")

    def _info(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()

    def _flock(self) -> None:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._refuse(_holder(self.path)) from None
                self._pidfile()  # flock is not supported here (ENOLCK, EOPNOTSUPP on some NFS)
                return
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file its previous holder removed while we opened it: ours
                os.ftruncate(fd, 0)
                os.write(fd, self._info())
                self.fd, self.mode = fd, "flock"
                return
            os.close(fd)

    def _pidfile(self) -> None:
        path = self.path + ".pid"
        for _ in range(3):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _holder(path)
                if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
                        and not _alive(holder["pid"]):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)  # stale: its process died on this host
                    continue
                raise self._refuse(holder, f" (if that process is gone, delete {path})") from None
            os.write(fd, self._info())
            os.close(fd)
            self.path, self.mode = path, "pidfile"
            return
        raise self._refuse(_holder(path))

    def release(self) -> None:
        if self.mode is None:
            return
        with contextlib.suppress(OSError):
            os.remove(self.path)  # while still locked, so no one locks a file that then vanishes
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
        self.fd, self.mode = None, None
        self._remove_made_dir()

    def _remove_made_dir(self) -> None:
        if self.made_dir:
            with contextlib.suppress(OSError):
                os.rmdir(self.out_dir)  # only if still empty

    def __exit__(self, *exc) -> None:
        self.release()


def check_output_dir(flag: str, path: str, overwrite: bool, protect: tuple[str, ...] = ()) -> None:
    """An output directory must be a directory (or not exist yet) under a writable parent, must
    not be or contain a directory in `protect` (the source), and if it holds files it is only
    replaced with overwrite=True."""
    if not path:
        return
    real = os.path.realpath(path)
    for p in protect:
        rp = os.path.realpath(p)
        if real == rp or rp.startswith(real.rstrip(os.sep) + os.sep):
            raise UserError(f"{path} already holds a run; export to a new directory (it holds the run being "
                            f"exported, which --overwrite=True never replaces)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--{flag}={path} is a file; pass a directory (it is created if missing)")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        what = "already holds a run" if os.path.isdir(os.path.join(path, "checkpoints")) else "is not empty"
        raise UserError(f"{path} {what}; export to a new directory, or pass --overwrite=True to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write --{flag}={path}: {parent} is not a writable directory; choose another place")


@contextlib.contextmanager
def replace_dir(target: str, what: str):
    """Yields a temporary sibling of `target` to write into; when the block ends without an error it
    takes target's place (an old target is moved aside first and deleted once the new one is in
    place). On an error or Ctrl-C the temporary directory is removed and target is untouched."""
    target = os.path.abspath(target)
    parent, name = os.path.dirname(target), os.path.basename(target)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    with writing(what, target):
        os.makedirs(parent, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    try:
        with writing(what, target):
            yield tmp
            old = None
            if os.path.exists(target):
                old = os.path.join(parent, f".{name}.old-{os.getpid()}")
                os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                if old:
                    os.replace(old, target)
                raise
    except KeyboardInterrupt:
        shutil.rmtree(tmp, ignore_errors=True)
        raise KeyboardInterrupt(f"{target} was not written (the partial copy was removed)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)
