"""Run untrusted programs (model-written code plus its tests) one process each, contained.

    iso = detect_isolation()                      # once per process: which isolation this machine allows
    r = run_program("assert 1 + 1 == 2\\n", Limits(timeout_s=3.0), iso)
    r.passed, r.reason                            # True, "passed"
    results = run_programs([src1, src2, ...], Limits(), iso, workers=8)

Every program runs in a fresh `python -I -S` process (`site=True` keeps site-packages) started with an empty
environment, through a small trusted bootstrap (`_boot.py`) that:
- with isolation "namespaces" (the `unshare` binary: new mount, network, pid, ipc and uts namespaces, plus a user
  namespace when not root): makes every mount read-only, mounts a size-capped tmpfs as the working directory and
  HOME (the only writable place, gone with the namespace), leaves the program only a loopback interface that is
  down (no network), and a private /proc (the evaluator's processes and their environments are invisible);
- forks; the child sets resource limits (CPU seconds, address space, processes, file size, open files, no core
  files), drops to an unprivileged uid of its own (one per worker slot, when the evaluator runs as root), clears
  the environment but HOME/TMPDIR (the temp dir) and PATH, and runs the program; the parent waits and exits with
  the child's status, so a program's leftover processes die with the pid namespace when it ends.
The evaluator kills the whole tree (the namespace's init, the process group, every descendant found in /proc) at
the wall-clock timeout or when stdout+stderr pass the output cap, and reads the result from a pipe of its own:
a program passes only when the bootstrap reports, with a per-run random nonce, that the program ran to its end
without an exception (`os._exit(0)` or `sys.exit(0)` before the tests finish is a failure).

Without namespaces (isolation "rlimits") the same runs happen with the limits, uid drop and process-group kill
only: the program can then read and write what that uid may and use the network; `require=True` refuses that.

Known limit: a program that inspects the interpreter it runs in (frames, gc) can find the nonce and forge a pass;
the sandbox contains what programs do to the machine, it does not make reward hacking impossible.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import queue
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

_BOOT = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_boot.py"), encoding="utf-8").read()
# mount_setattr(2) is 442 on every architecture that has it (the unified syscall table since Linux 5.12).
SYS_MOUNT_SETATTR = 442
BASE_UID = 1_990_000  # worker slot k runs programs as uid BASE_UID + k (root only; an otherwise unused range)
KEEP_BYTES = 4096  # how much of stdout / stderr a result keeps


class SandboxError(RuntimeError):
    """The sandbox itself could not run (not a property of the program)."""


@dataclasses.dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, whole process tree
    cpu_s: int | None = None  # CPU seconds (default: ceil(timeout) + 1)
    memory_bytes: int | None = 4 << 30  # address space of the program's process
    nproc: int | None = 64  # processes of the program's uid (root runs: one uid per worker slot)
    fsize_bytes: int | None = 16 << 20  # largest file the program may write
    nofile: int | None = 64  # open file descriptors
    output_bytes: int = 1 << 20  # stdout + stderr beyond this: killed, reason "output limit"
    tmpfs_bytes: int = 64 << 20  # size of the working directory (isolated runs)

    def boot(self) -> dict:
        cpu = self.cpu_s if self.cpu_s is not None else int(self.timeout_s) + 2
        return {"cpu_s": cpu, "as_bytes": self.memory_bytes, "nproc": self.nproc, "fsize": self.fsize_bytes,
                "nofile": self.nofile}


@dataclasses.dataclass(frozen=True)
class Isolation:
    """What contains a program on this machine. level: "namespaces" or "rlimits"."""

    level: str
    detail: str
    unshare_cmd: tuple[str, ...] = ()
    drop_uid: bool = False
    python: str = sys.executable

    @property
    def isolated(self) -> bool:
        return self.level == "namespaces"

    def describe(self) -> str:
        return f"{self.level} ({self.detail})"


@dataclasses.dataclass
class Result:
    passed: bool
    reason: str  # "passed", "failed: AssertionError: ...", "timeout", "output limit", "exited early ...", ...
    time_s: float
    returncode: int | None
    stdout: str = ""
    stderr: str = ""

    def to_json(self) -> dict:
        return {"passed": self.passed, "reason": self.reason, "time": round(self.time_s, 4)}


# ---- running one program ---------------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        pass
    return out


def _descendants(pid: int) -> list[int]:
    seen, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        seen += kids
        todo += kids
    return seen


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the namespace init / program and every descendant, then the process group."""
    for _ in range(3):  # a tree still forking may grow between the listing and the kills
        pids = _descendants(proc.pid)
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        if not pids:
            break
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        proc.kill()
    except OSError:
        pass


def _signal_name(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


def run_program(source: str, limits: Limits = Limits(), isolation: "Isolation | None" = None, slot: int = 0,
                keep_output: bool = False) -> Result:
    """Run one program (a whole Python file as text) in the sandbox; never raises for anything the program does."""
    iso = isolation or detect_isolation()
    nonce = secrets.token_hex(16)
    uid = BASE_UID + slot if iso.drop_uid else None
    workdir = tempfile.mkdtemp(prefix="qcjax-sbx-")
    rfd, wfd = os.pipe()
    try:
        if uid is not None:
            os.chown(workdir, uid, uid)
        cfg = {"result_fd": wfd, "workdir": workdir, "isolate": iso.isolated, "uid": uid, "nonce": nonce,
               "limits": limits.boot(), "tmpfs_bytes": limits.tmpfs_bytes, "sys_mount_setattr": SYS_MOUNT_SETATTR}
        cmd = [*iso.unshare_cmd, iso.python, "-I", "-S", "-c", _BOOT]
        t0 = time.perf_counter()
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env={}, cwd=workdir, pass_fds=(wfd,), start_new_session=True, close_fds=True)
        except OSError as e:
            raise SandboxError(f"cannot start {cmd[0]}: {e}") from None
        os.close(wfd)
        wfd = -1
        data = (json.dumps(cfg) + "\n" + source).encode("utf-8", "surrogatepass")
        writer = threading.Thread(target=_feed, args=(proc.stdin, data), daemon=True)
        writer.start()
        out, err, res, why = _collect(proc, rfd, t0 + limits.timeout_s, limits.output_bytes)
        rc = proc.returncode
        dt = time.perf_counter() - t0
        writer.join(timeout=1.0)
    finally:
        for fd in (rfd, wfd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        shutil.rmtree(workdir, ignore_errors=True)
    lines = [ln for ln in res.decode("utf-8", "replace").splitlines() if ln.strip()]
    reports = []
    for ln in lines:
        try:
            d = json.loads(ln)
            if isinstance(d, dict):
                reports.append(d)
        except ValueError:
            pass
    setup = [d["setup_error"] for d in reports if "setup_error" in d]
    if setup and why is None:
        raise SandboxError(f"sandbox setup failed ({iso.describe()}): {setup[0]}")
    done = [d for d in reports if d.get("done") is True and d.get("nonce") == nonce]
    failed = [d for d in reports if d.get("done") is False]
    if why is not None:
        passed, reason = False, why
    elif done and rc == 0 and not failed:
        passed, reason = True, "passed"
    elif failed:
        d = failed[0]
        msg = str(d.get("message", ""))
        passed, reason = False, f"failed: {d.get('error')}" + (f": {msg}" if msg else "")
    elif rc is not None and rc < 0:
        passed, reason = False, f"killed by {_signal_name(-rc)}"
    elif rc is not None and rc > 128 and iso.isolated:  # the namespace init re-reports a signal as 128 + n
        passed, reason = False, f"killed by {_signal_name(rc - 128)}"
    else:
        passed, reason = False, f"exited early (status {rc}) before the tests finished"
    if reason.startswith("killed by SIGKILL"):
        reason += " (CPU time or memory limit)"
    elif reason.startswith("killed by SIGXFSZ"):
        reason += " (file size limit)"
    dec = lambda b: b[:KEEP_BYTES].decode("utf-8", "replace")  # noqa: E731
    return Result(passed, reason[:300], dt, rc, dec(out) if keep_output else "", dec(err) if keep_output else "")


def _feed(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
    except (BrokenPipeError, OSError, ValueError):
        pass
    finally:
        try:
            pipe.close()
        except (BrokenPipeError, OSError):
            pass


def _collect(proc: subprocess.Popen, rfd: int, deadline: float, cap: int):
    """Read stdout, stderr and the result pipe until all close, the deadline passes or the output passes `cap`.
    Returns (stdout head, stderr head, result bytes, kill reason or None); the process is reaped."""
    sel = selectors.DefaultSelector()
    bufs = {"out": bytearray(), "err": bytearray(), "res": bytearray()}
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    sel.register(rfd, selectors.EVENT_READ, "res")
    total, why = 0, None
    try:
        while sel.get_map():
            left = deadline - time.perf_counter()
            if left <= 0:
                why = "timeout"
                break
            for key, _ in sel.select(timeout=min(left, 0.5)):
                fd = key.fd
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                b = bufs[key.data]
                if key.data == "res":
                    if len(b) < 65536:
                        b += chunk
                    continue
                total += len(chunk)
                if len(b) < KEEP_BYTES:
                    b += chunk[: KEEP_BYTES - len(b)]
            if total > cap:
                why = "output limit"
                break
        if why is None:
            try:
                proc.wait(timeout=max(0.05, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                why = "timeout"
    finally:
        if why is not None or proc.returncode is None:
            _kill_tree(proc)
        else:  # exited: anything it left behind in its group goes too (no-op with namespaces)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
        proc.wait()
        sel.close()
        for f in (proc.stdout, proc.stderr):
            f.close()
    return bytes(bufs["out"]), bytes(bufs["err"]), bytes(bufs["res"]), why


# ---- many programs ---------------------------------------------------------------------------------------------------
def run_programs(sources: Sequence[str], limits: Limits = Limits(), isolation: "Isolation | None" = None,
                 workers: int = 1, on_result: Callable[[int, Result], None] | None = None) -> list[Result]:
    """Run programs on `workers` threads (one sandboxed process each at a time); results in input order.
    on_result(index, result) is called as each finishes (progress bars)."""
    iso = isolation or detect_isolation()
    slots: queue.Queue[int] = queue.Queue()
    for k in range(max(1, workers)):
        slots.put(k)
    results: list[Result | None] = [None] * len(sources)
    lock = threading.Lock()

    def one(i: int) -> None:
        slot = slots.get()
        try:
            r = run_program(sources[i], limits, iso, slot=slot)
        finally:
            slots.put(slot)
        results[i] = r
        if on_result is not None:
            with lock:
                on_result(i, r)

    if workers <= 1:
        for i in range(len(sources)):
            one(i)
    else:
        with ThreadPoolExecutor(max_workers=workers) as ex:
            for f in [ex.submit(one, i) for i in range(len(sources))]:
                f.result()
    return results  # type: ignore[return-value]


# ---- which isolation works here ----------------------------------------------------------------------------------------
_PROBE = r"""
import os, socket, sys
bad = []
try:
    with open({outside!r}, "w") as f:
        f.write("escaped")
    bad.append("wrote outside the working directory")
except OSError:
    pass
try:
    s = socket.create_connection(("127.0.0.1", {port}), timeout=1)
    bad.append("reached a listener on 127.0.0.1")
except OSError:
    pass
if os.path.exists("/proc/{parent}/environ"):
    bad.append("sees the evaluator's processes")
open("inside.txt", "w").write("ok")
assert not bad, "; ".join(bad)
"""

_detected: dict = {}
_detect_lock = threading.Lock()


def _unshare_cmd(root: bool) -> tuple[str, ...] | None:
    exe = shutil.which("unshare")
    if exe is None:
        return None
    cmd = [exe, "--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc"]
    if not root:
        cmd[1:1] = ["--user", "--map-root-user"]
    return tuple(cmd)


def _others_can_read(paths: Sequence[str]) -> bool:
    """Whether a uid other than the owner can enter every directory on the way to `paths` and read them."""
    for p in paths:
        p = os.path.realpath(p)
        parts = p.strip("/").split("/")
        for k in range(1, len(parts) + 1):
            try:
                mode = os.stat("/" + "/".join(parts[:k])).st_mode
            except OSError:
                return False
            if not mode & 0o001 or (k == len(parts) and not mode & 0o004):
                return False
    return True


def rlimits_isolation(why: str, python: str | None = None) -> Isolation:
    """The fallback without namespaces: rlimits and the process-group kill; as root, programs also run as an
    unprivileged uid, unless that uid could not read the interpreter's own library (e.g. Python installed under a
    0700 /root: without a mount namespace there is no way to expose it, and every import would fail)."""
    python = python or sys.executable
    root = os.geteuid() == 0
    lib = [p for p in sys.path if p and os.path.isdir(p)] if python == sys.executable else []
    if python != sys.executable:
        try:
            out = subprocess.run([python, "-I", "-c", "import sys, json; print(json.dumps(sys.path))"],
                                 capture_output=True, text=True, timeout=30, env={})
            lib = [p for p in json.loads(out.stdout) if p and os.path.isdir(p)]
        except (OSError, ValueError, subprocess.SubprocessError):
            lib = ["/nonexistent"]
    drop = root and _others_can_read(lib)
    if drop:
        note = f"programs run as uid {BASE_UID}+slot"
    elif root:
        note = "programs run as root (the interpreter's files are not readable by other uids)"
    else:
        note = "programs keep the evaluator's uid"
    return Isolation("rlimits", f"{why}; rlimits, process-group kill; {note}", drop_uid=drop, python=python)


def detect_isolation(python: str | None = None, refresh: bool = False) -> Isolation:
    """Probe (once per process) whether programs can run in namespaces here: a program must fail to write outside
    its directory, to reach a listener on 127.0.0.1 and to see the evaluator's processes, and succeed otherwise."""
    python = python or sys.executable
    with _detect_lock:
        if python in _detected and not refresh:
            return _detected[python]
        root = os.geteuid() == 0
        uid_note = f"programs run as uid {BASE_UID}+slot" if root else "programs keep the evaluator's uid"
        cmd = _unshare_cmd(root)
        why = "no `unshare` binary" if cmd is None else ""
        if sys.platform != "linux":
            cmd, why = None, f"{sys.platform} is not Linux"
        iso = None
        if cmd is not None:
            cand = Isolation("namespaces", ("user+" if not root else "") +
                             "mount/net/pid/ipc/uts namespaces, read-only root, tmpfs workdir, no network; rlimits; "
                             + uid_note, cmd, drop_uid=root, python=python)
            lst = socket.socket()
            outside_dir = tempfile.mkdtemp(prefix="qcjax-probe-")
            try:
                if root:
                    os.chmod(outside_dir, 0o777)
                lst.bind(("127.0.0.1", 0))
                lst.listen(1)
                outside = os.path.join(outside_dir, "escape.txt")
                src = _PROBE.format(outside=outside, port=lst.getsockname()[1], parent=os.getpid())
                try:
                    r = run_program(src, Limits(timeout_s=20.0), cand)
                    if r.passed and not os.path.exists(outside):
                        iso = cand
                    else:
                        why = f"the probe program {r.reason}"
                except SandboxError as e:
                    why = str(e)
            finally:
                lst.close()
                shutil.rmtree(outside_dir, ignore_errors=True)
        if iso is None:
            iso = rlimits_isolation(f"no namespaces: {why}", python)
        _detected[python] = iso
        return iso


def machine() -> str:
    return f"{platform.system()} {platform.release()} {platform.machine()}, {os.cpu_count()} CPUs"
