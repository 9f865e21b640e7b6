"""One trainer per run directory: an atomically created lock file that names its owner.

    with WorkdirLock(workdir):      # raises WorkdirBusy at once when another live trainer holds it
        train(...)

The lock is `workdir/LOCK`, created with O_CREAT|O_EXCL (atomic on local disks and NFS v3+), holding the owner's
host, pid and start time as JSON. A lock whose owner is on this host and no longer running is stale: it is taken
over, and the takeover is logged. A lock held from another host cannot be checked from here; the error says how to
remove it by hand once that trainer is known to be gone. Only process 0 of a multi-host run takes the lock.

In a gs:// workdir the lock is an object created with the precondition ifGenerationMatch=0 (gcsfs's
mode="create"): GCS creates it only if no object of that name exists, atomically, and answers 412 (FileExistsError)
otherwise. A store that ignores preconditions (gcp-storage-emulator as shipped does) gets a weaker rule: the create is
preceded by an existence check and followed by a read-back that must name this trainer, so only two trainers starting
within the same fraction of a second could both proceed.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time

from qcjax import paths

LOCK_FILE = "LOCK"
log = logging.getLogger("qcjax.train")


class WorkdirBusy(RuntimeError):
    """Another trainer holds the run directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class WorkdirLock:
    def __init__(self, workdir: str):
        self.path = paths.join(workdir, LOCK_FILE)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.held = False

    def acquire(self) -> "WorkdirLock":
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = self._create()
            except FileExistsError:
                owner = self._owner()
                if owner is not None and owner.get("host") == self.me["host"] and isinstance(owner.get("pid"), int) \
                        and not _alive(owner["pid"]):
                    log.warning("taking over the stale lock %s of pid %d (no longer running, since %s)", self.path,
                                owner["pid"], owner.get("since"))
                    try:
                        paths.remove(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                who = (f"pid {owner.get('pid')} on {owner.get('host')} since {owner.get('since')}" if owner
                       else "an unknown owner (unreadable lock file)")
                raise WorkdirBusy(f"{paths.dirname(self.path)} is in use by another trainer ({who}); wait for it "
                                  f"to finish, use another --workdir, or delete {self.path} if that trainer is gone")
            if fd is not None:
                self._write_owner(fd)
            elif self._owner() != self.me:  # an object store that ignored the precondition: someone else won
                continue
            self.held = True
            return self
        raise WorkdirBusy(f"could not take the lock {self.path}: another trainer took it at the same moment")

    def _write_owner(self, fd: int) -> None:
        """Write the owner into the new lock file; if that fails (a full disk), remove the file again, so that no
        lock is left that nobody holds (every later run would refuse an empty one), and raise in one line."""
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
        except OSError as e:
            try:
                os.remove(self.path)
            except OSError:
                pass
            if paths.is_disk_full(e):
                raise paths.DiskFull(self.path, "the run's lock file", "free some space or use another --workdir") \
                    from None
            raise

    def _create(self) -> int | None:
        """Create the lock file if absent (FileExistsError otherwise): a local file descriptor to write the owner
        into, or None for a URL, whose object is created holding the owner."""
        if not paths.is_url(self.path):
            return os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        if paths.exists(self.path):
            raise FileExistsError(self.path)
        fs, key = paths._fs(self.path)
        fs.pipe_file(key, json.dumps(self.me).encode(), mode="create")  # ifGenerationMatch=0 on GCS
        return None

    def _owner(self) -> dict | None:
        try:
            with paths.open_file(self.path) as f:
                owner = json.load(f)
            return owner if isinstance(owner, dict) else None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            self.held = False
            if (self._owner() or {}).get("pid") == self.me["pid"]:
                paths.remove(self.path)

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
