"""Run untrusted programs (model-written code plus its tests) contained, one sandboxed process each, or as a
Tested pair (the program's process and a trusted tester's, joined by pipes that only carry builtin values).

    iso = detect_isolation()                      # once per process: which isolation this machine allows
    r = run_program("assert 1 + 1 == 2\\n", Limits(timeout_s=3.0), iso)
    r.passed, r.reason                            # True, "passed"
    r = run_program(Tested(program, tester), Limits(), iso)   # r.tests: each test's verdict
    results = run_programs([src1, src2, ...], Limits(), iso, workers=8)

Every process is a fresh `python -I -S` started with an empty environment, through a small trusted bootstrap
(`_boot.py`), inside (best first, as the probe finds them working):
- bubblewrap: pid, network, ipc and uts namespaces and a root built from the interpreter's files only (its binary,
  standard library and shared libraries, read-only), a size-capped tmpfs as the working directory and HOME, its own
  /proc, no network and no host Unix socket or file;
- `unshare` (mount, network, pid, ipc, uts namespaces): the host's root read-only (visible), the same tmpfs,
  network and /proc;
- rlimits only: the limits, uid drop and process-group kill; the program can read and write what that uid may and
  use the network; `require=True` refuses that.
In each, the bootstrap forks; the child sets resource limits (CPU seconds, address space, processes, file size, open
files, no core files), drops to an unprivileged uid of its own (one per worker slot, when the evaluator runs as
root), clears the environment but HOME/TMPDIR/PATH, installs the seccomp filter (libseccomp through pyseccomp:
ptrace, keyctl, bpf, new namespaces, mounts, socket(AF_UNIX), ... denied) and runs the program; the parent waits and
exits with the child's status, so a program's leftover processes die with the pid namespace when it ends.
The evaluator kills the whole tree at the wall-clock timeout or when stdout+stderr pass the output cap, and reads the
result from a pipe of its own: a program passes only when the bootstrap reports, with a per-run random nonce, that
it ran to its end without an exception (`os._exit(0)` or `sys.exit(0)` before the tests finish is a failure).

Known limit: a plain program (not Tested) that inspects the interpreter it runs in (frames, gc) can find the nonce
and forge a pass; in a Tested run the verdict is the tester's, whose process the program never enters.
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
from typing import Any, Callable, Sequence

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
    """What contains a program on this machine. level: "namespaces" or "rlimits". bwrap: bubblewrap's command line
    up to the per-run parts (a root built from the interpreter's files only); bpf: the seccomp filter the bootstrap
    installs before the program runs (libseccomp's compiled BPF); held / lacks: what the probe saw hold and fail."""

    level: str
    detail: str
    unshare_cmd: tuple[str, ...] = ()
    drop_uid: bool = False
    python: str = sys.executable
    bwrap: tuple[str, ...] = ()
    bpf: bytes = b""
    held: tuple[str, ...] = ()
    lacks: tuple[str, ...] = ()

    @property
    def isolated(self) -> bool:
        return self.level == "namespaces"

    @property
    def own_root(self) -> bool:
        """Whether the program sees only the interpreter's files (bubblewrap), not the host's file system."""
        return bool(self.bwrap)

    def describe(self) -> str:
        held = f"; held: {', '.join(self.held)}" if self.held else ""
        lacks = f"; lacks: {', '.join(self.lacks)}" if self.lacks else ""
        return f"{self.level} ({self.detail}{held}{lacks})"


@dataclasses.dataclass(frozen=True)
class Tested:
    """A program and the trusted tester that judges it, run as two sandboxed processes joined by two pipes: the
    program's process runs its code, then answers calls (a function name and builtin arguments, marshalled) with its
    results converted to builtin values; the tester runs the tests and compares. The tests and expected answers never
    enter the program's process, and a result of a type the program defined (an `__eq__` that always says True)
    cannot be sent, so it never satisfies a comparison. The tester's code calls `_qcjax_call(name, *args)`, records
    per-test verdicts with `_qcjax_test(ok, why)` (reported in Result.tests) and passes when it runs to its end."""

    program: str
    tester: str


@dataclasses.dataclass
class Result:
    passed: bool
    reason: str  # "passed", "failed: AssertionError: ...", "timeout", "output limit", "exited early ...", ...
    time_s: float
    returncode: int | None
    stdout: str = ""
    stderr: str = ""
    tests: list[tuple[bool, str]] | None = None  # Tested runs: each test's verdict and why it failed ("" if passed)

    def to_json(self) -> dict:
        out = {"passed": self.passed, "reason": self.reason, "time": round(self.time_s, 4)}
        if self.tests is not None:
            out["tests"] = [sum(ok for ok, _ in self.tests), len(self.tests)]
        return out


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


def _launch(source: str, mode: str, limits: Limits, iso: Isolation, slot: int, fds: dict, output: bool):
    """Start the bootstrap on `source` in the isolation `iso`; returns (process, workdir, result fd, feeder thread).
    fds: extra pipe ends the process keeps ({"req_fd": n, "rep_fd": m}, Tested runs); output: stdout and stderr are
    pipes to read (else /dev/null)."""
    uid = BASE_UID + slot if iso.drop_uid else None
    workdir = tempfile.mkdtemp(prefix="qcjax-sbx-")
    rfd, wfd = os.pipe()
    try:
        if uid is not None:
            os.chown(workdir, uid, uid)
        cfg = {"result_fd": wfd, "workdir": workdir, "uid": uid, "nonce": secrets.token_hex(16), "mode": mode,
               "isolate": ("bwrap" if iso.bwrap else "unshare") if iso.isolated else False, "bpf": iso.bpf.hex(),
               "limits": limits.boot(), "tmpfs_bytes": limits.tmpfs_bytes, "sys_mount_setattr": SYS_MOUNT_SETATTR,
               **fds}
        if iso.bwrap:
            wrap = [*iso.bwrap, "--size", str(limits.tmpfs_bytes), "--perms", "0777", "--tmpfs", workdir,
                    "--remount-ro", "/", "--chdir", workdir, "--"]
        else:
            wrap = list(iso.unshare_cmd)
        cmd = [*wrap, iso.python, "-I", "-S", "-c", _BOOT]
        pipe = subprocess.PIPE if output else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=pipe, stderr=pipe, env={}, cwd=workdir,
                                    pass_fds=(wfd, *fds.values()), start_new_session=True, close_fds=True)
        except OSError as e:
            raise SandboxError(f"cannot start {cmd[0]}: {e}") from None
    except BaseException:
        os.close(rfd)
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
        os.close(wfd)
    data = (json.dumps(cfg) + "\n" + source).encode("utf-8", "surrogatepass")
    writer = threading.Thread(target=_feed, args=(proc.stdin, data), daemon=True)
    writer.start()
    return proc, workdir, rfd, writer, cfg["nonce"]


def _reap(launched) -> bytes:
    """Kill a launched process's tree and clean up after it; what it wrote on its result pipe (setup errors)."""
    proc, workdir, rfd, _, _ = launched
    _kill_tree(proc)
    proc.wait()
    os.set_blocking(rfd, False)
    try:
        res = os.read(rfd, 65536)
    except OSError:
        res = b""
    os.close(rfd)
    shutil.rmtree(workdir, ignore_errors=True)
    return res


def _reports(res: bytes) -> list[dict]:
    out = []
    for ln in res.decode("utf-8", "replace").splitlines():
        try:
            d = json.loads(ln)
        except ValueError:
            continue
        if isinstance(d, dict):
            out.append(d)
    return out


def run_program(source: "str | Tested", limits: Limits = Limits(), isolation: "Isolation | None" = None,
                slot: int = 0, keep_output: bool = False) -> Result:
    """Run one program (a whole Python file as text, or a Tested program and its tester) in the sandbox; never
    raises for anything the program does. For a Tested run the verdict, output and per-test verdicts are the
    tester's; the program's own output is discarded."""
    iso = isolation or detect_isolation()
    server = None
    fds: dict = {}
    if isinstance(source, Tested):
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        try:
            server = _launch(source.program, "serve", limits, iso, slot, {"req_fd": req_r, "rep_fd": rep_w}, False)
        finally:
            os.close(req_r)
            os.close(rep_w)
        fds = {"req_fd": req_w, "rep_fd": rep_r}
        source = source.tester
    t0 = time.perf_counter()
    try:
        proc, workdir, rfd, writer, nonce = _launch(source, "test" if server else "run", limits, iso, slot, fds,
                                                    True)
    except BaseException:
        if server is not None:
            _reap(server)
        raise
    finally:
        for fd in fds.values():
            os.close(fd)
    try:
        out, err, res, why = _collect(proc, rfd, t0 + limits.timeout_s, limits.output_bytes)
        rc = proc.returncode
        dt = time.perf_counter() - t0
        writer.join(timeout=1.0)
    finally:
        os.close(rfd)
        shutil.rmtree(workdir, ignore_errors=True)
        if server is not None:
            sres = _reap(server)
    reports = _reports(res) + (_reports(sres) if server is not None else [])
    ours = {nonce} | ({server[4]} if server is not None else set())  # a program cannot forge a setup error
    setup = [d["setup_error"] for d in reports if "setup_error" in d and d.get("nonce") in ours]
    if setup and why is None:
        raise SandboxError(f"sandbox setup failed ({iso.describe()}): {setup[0]}")
    done = [d for d in reports if d.get("done") is True and d.get("nonce") == nonce]
    failed = [d for d in reports if d.get("done") is False]
    tests = None
    if server is not None and (done or failed):  # no report (a timeout, a crash): no per-test verdicts
        rep = (done or failed)[0].get("tests") or []
        tests = [(bool(t[0]), str(t[1])) for t in rep if isinstance(t, list) and len(t) == 2]
    if why is not None:
        passed, reason = False, why
    elif done and rc == 0 and not failed and all(ok for ok, _ in tests or []):
        passed, reason = True, "passed"
    elif failed:
        d = failed[0]
        msg = str(d.get("message", ""))
        passed, reason = False, f"failed: {d.get('error')}" + (f": {msg}" if msg else "")
    elif done and tests:
        passed, reason = False, "failed: " + next(why for ok, why in tests if not ok)
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
    return Result(passed, reason[:300], dt, rc, dec(out) if keep_output else "", dec(err) if keep_output else "",
                  tests)


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
def run_programs(sources: Sequence["str | Tested"], limits: Limits = Limits(), isolation: "Isolation | None" = None,
                 workers: int = 1, on_result: Callable[[int, Result], None] | None = None) -> list[Result]:
    """Run programs on `workers` threads (one sandboxed process each at a time); results in input order.
    Identical programs (the same source, and the same tester) run once and share the result: sampled completions
    repeat, and a program's verdict is a function of its text. on_result(index, result) is called for every input
    index as its result arrives (progress bars)."""
    iso = isolation or detect_isolation()
    slots: queue.Queue[int] = queue.Queue()
    for k in range(max(1, workers)):
        slots.put(k)
    where: dict[Any, list[int]] = {}  # distinct program -> the input indices that hold it
    for i, src in enumerate(sources):
        where.setdefault(src, []).append(i)
    distinct = list(where)
    results: list[Result | None] = [None] * len(sources)
    lock = threading.Lock()

    def one(j: int) -> None:
        slot = slots.get()
        try:
            r = run_program(distinct[j], limits, iso, slot=slot)
        finally:
            slots.put(slot)
        for i in where[distinct[j]]:
            results[i] = r
            if on_result is not None:
                with lock:
                    on_result(i, r)

    if workers <= 1:
        for j in range(len(distinct)):
            one(j)
    else:
        with ThreadPoolExecutor(max_workers=workers) as ex:
            for f in [ex.submit(one, j) for j in range(len(distinct))]:
                f.result()
    return results  # type: ignore[return-value]


# ---- which isolation works here ----------------------------------------------------------------------------------------
# What the probe checks, in the order the isolation line lists it; the first three decide whether namespaces work.
CHECKS = ("read-only outside the working directory", "no network", "private /proc", "no Unix sockets",
          "no host files", "seccomp filter")
_PROBE = r"""
import json, os, socket
held = {{}}
try:
    with open({outside!r}, "w") as f:
        f.write("escaped")
    held["read-only outside the working directory"] = False
except OSError:
    held["read-only outside the working directory"] = True
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=1)
    held["no network"] = False
except OSError:
    held["no network"] = True
held["private /proc"] = not os.path.exists("/proc/{parent}/environ")
try:
    u = socket.socket(socket.AF_UNIX)
    u.settimeout(1)
    u.connect({unix!r})
    held["no Unix sockets"] = False
except OSError:
    held["no Unix sockets"] = True
try:
    open({visible!r}).read()
    held["no host files"] = False
except OSError:
    held["no host files"] = True
held["seccomp filter"] = "Seccomp:\t2" in open("/proc/self/status").read()
open("inside.txt", "w").write("ok")
print(json.dumps(held))
"""
# Syscalls no benchmark program needs and namespaces do not contain (denied with EPERM): tracing and reading other
# processes, the kernel keyring, BPF and perf, new namespaces and mounts, modules, io_uring (its own path around
# this filter). clone3 answers ENOSYS (its flags sit in memory a filter cannot read; libc then falls back to clone,
# whose namespace flags are checked); socket(AF_UNIX) is denied (socketpair stays: it reaches nothing outside).
DENIED_SYSCALLS = ("ptrace", "process_vm_readv", "process_vm_writev", "keyctl", "add_key", "request_key", "bpf",
                   "perf_event_open", "userfaultfd", "unshare", "setns", "mount", "umount2", "pivot_root", "chroot",
                   "mount_setattr", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
                   "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
                   "swapon", "swapoff", "acct", "syslog", "iopl", "ioperm", "quotactl", "name_to_handle_at",
                   "open_by_handle_at", "io_uring_setup", "io_uring_enter", "io_uring_register", "lookup_dcookie")
CLONE_NAMESPACE_FLAGS = (0x20000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
AF_UNIX = 1

_detected: dict = {}
_detect_lock = threading.Lock()


def seccomp_filter() -> tuple[bytes, str]:
    """The compiled BPF of the sandbox's syscall filter (libseccomp through pyseccomp), or (b"", why not)."""
    try:
        import errno

        import pyseccomp as S

        f = S.SyscallFilter(S.ALLOW)
        for name in DENIED_SYSCALLS:
            try:
                f.add_rule(S.ERRNO(errno.EPERM), name)
            except OSError:  # not a syscall on this architecture
                pass
        for flag in CLONE_NAMESPACE_FLAGS:
            f.add_rule(S.ERRNO(errno.EPERM), "clone", S.Arg(0, S.MASKED_EQ, flag, flag))
        f.add_rule(S.ERRNO(errno.ENOSYS), "clone3")
        f.add_rule(S.ERRNO(errno.EPERM), "socket", S.Arg(0, S.EQ, AF_UNIX))
        with tempfile.TemporaryFile() as t:
            f.export_bpf(t)
            t.seek(0)
            return t.read(), ""
    except Exception as e:  # ImportError (pyseccomp), OSError / RuntimeError (no libseccomp)
        return b"", f"no seccomp filter ({type(e).__name__}: {e})"


def _python_files(python: str) -> tuple[list[str], list[str]]:
    """What the interpreter needs and nothing else: its binary, its standard library (sys.path under -S) and the
    shared libraries they load (ldd); and the package directories inside the standard library to cover (the
    interpreter's own site-packages). Raises OSError / ValueError where that cannot be found out."""
    out = subprocess.run([python, "-I", "-S", "-c", "import sys, json; print(json.dumps([sys.executable, sys.path]))"],
                         capture_output=True, text=True, timeout=60, env={})
    exe, path = json.loads(out.stdout)
    lib = sorted({os.path.realpath(p) for p in path if p and os.path.isdir(p)})
    lib = [p for p in lib if not any(p != q and p.startswith(q + "/") for q in lib)]
    hide = sorted(os.path.join(p, d) for p in lib for d in ("site-packages", "dist-packages")
                  if os.path.isdir(os.path.join(p, d)))
    objs = [os.path.realpath(exe)]
    for p in lib:
        for d, dirs, fs in os.walk(p):
            dirs[:] = [x for x in dirs if os.path.join(d, x) not in hide]
            objs += [os.path.join(d, f) for f in fs if f.endswith(".so")]
    ldd = shutil.which("ldd")
    if ldd is None:
        raise OSError("no `ldd` to list the interpreter's shared libraries")
    res = subprocess.run([ldd, *objs], capture_output=True, text=True, timeout=120, env={"LC_ALL": "C"})
    libs = set()
    for ln in res.stdout.splitlines():
        if not ln.rstrip().endswith(":"):
            libs.update(tok for tok in ln.split() if tok.startswith("/") and os.path.isfile(tok))
    if not libs:
        raise OSError(f"ldd found no shared libraries for {exe}")
    return [os.path.realpath(exe), *lib, *sorted(libs)], hide


def _bwrap_cmd(python: str, root: bool) -> tuple[str, ...]:
    """bubblewrap's command line that builds the program's root: an empty tmpfs, read-only, with the interpreter's
    files bound in place (their parent directories 0755, so that the worker's uid can reach them), /proc of its own
    pid namespace, a minimal /dev; no host file or socket else (_launch adds the working directory's tmpfs and makes
    / read-only). As root the bootstrap keeps CAP_SETUID / CAP_SETGID to drop to the worker slot's uid. Raises
    OSError where bwrap is missing."""
    exe = shutil.which("bwrap")
    if exe is None:
        raise OSError("no `bwrap` binary (Debian: apt-get install bubblewrap)")
    cmd = [exe, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
           "--die-with-parent", "--new-session", "--proc", "/proc", "--dev", "/dev"]
    if root:
        cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        cmd += ["--unshare-user", "--disable-userns"]
    files, hide = _python_files(python)
    parents = sorted({os.path.dirname(f)[:i] for f in files for i in range(1, len(os.path.dirname(f)) + 1)
                      if (os.path.dirname(f) + "/")[i] == "/"}, key=lambda d: (d.count("/"), d))
    for d in parents:
        cmd += ["--perms", "0755", "--dir", d]
    for f in files:
        cmd += ["--ro-bind", f, f]
    for d in hide:
        cmd += ["--tmpfs", d]
    return tuple(cmd)


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
    """The fallback without namespaces: rlimits, the process-group kill and the seccomp filter; as root, programs
    also run as an unprivileged uid, unless that uid could not read the interpreter's own library (e.g. Python
    installed under a 0700 /root: without a mount namespace there is no way to expose it, and every import would
    fail)."""
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
    bpf, no_bpf = seccomp_filter()
    return Isolation("rlimits", f"{why}; rlimits, process-group kill; {no_bpf or 'seccomp filter'}; {note}",
                     drop_uid=drop, python=python, bpf=bpf,
                     lacks=("namespaces: programs read and write what their uid may and use the network",))


def _probe(cand: Isolation, root: bool) -> tuple[dict, str]:
    """Run the probe program under `cand`: ({check: held}, "") or ({}, why it could not run)."""
    lst = socket.socket()
    ulst = socket.socket(socket.AF_UNIX)
    outside_dir = tempfile.mkdtemp(prefix="qcjax-probe-")
    try:
        os.chmod(outside_dir, 0o777 if root else 0o755)
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        unix = os.path.join(outside_dir, "s")
        ulst.bind(unix)
        ulst.listen(1)
        os.chmod(unix, 0o777)
        visible = os.path.join(outside_dir, "visible.txt")
        with open(visible, "w") as f:
            f.write("host file")
        os.chmod(visible, 0o644)
        outside = os.path.join(outside_dir, "escape.txt")
        src = _PROBE.format(outside=outside, port=lst.getsockname()[1], parent=os.getpid(), unix=unix,
                            visible=visible)
        try:
            r = run_program(src, Limits(timeout_s=20.0), cand, keep_output=True)
        except SandboxError as e:
            return {}, str(e)
        if not r.passed:
            return {}, f"the probe program {r.reason}"
        try:
            held = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {}, f"the probe program printed {r.stdout[:200]!r}"
        held["read-only outside the working directory"] &= not os.path.exists(outside)
        return held, ""
    finally:
        lst.close()
        ulst.close()
        shutil.rmtree(outside_dir, ignore_errors=True)


def detect_isolation(python: str | None = None, refresh: bool = False) -> Isolation:
    """Probe (once per process) how programs can be contained here: bubblewrap's own root, else `unshare` over the
    host's read-only root, else rlimits only; each with the seccomp filter where libseccomp is there. Namespaces
    count only when a program fails to write outside its directory, to reach a listener on 127.0.0.1 and to see the
    evaluator's processes; the isolation line lists every check that held and every one that did not."""
    python = python or sys.executable
    with _detect_lock:
        if python in _detected and not refresh:
            return _detected[python]
        root = os.geteuid() == 0
        uid_note = f"programs run as uid {BASE_UID}+slot" if root else "programs keep the evaluator's uid"
        bpf, no_bpf = seccomp_filter()
        seccomp = f"seccomp filter ({len(DENIED_SYSCALLS)} syscalls, namespace flags, AF_UNIX sockets)" if bpf \
            else no_bpf
        cands, why = [], []
        if sys.platform != "linux":
            why.append(f"{sys.platform} is not Linux")
        else:
            try:
                real = os.path.realpath(python)
                cands.append(Isolation("namespaces", ("user+" if not root else "") +
                                       "pid/net/ipc/uts namespaces, bubblewrap root of the interpreter's files only "
                                       f"(read-only), tmpfs workdir, no network; {seccomp}; rlimits; {uid_note}",
                                       drop_uid=root, python=real, bwrap=_bwrap_cmd(real, root), bpf=bpf))
            except (OSError, ValueError, subprocess.SubprocessError) as e:
                why.append(f"no bubblewrap root: {e}")
            cmd = _unshare_cmd(root)
            if cmd is None:
                why.append("no `unshare` binary")
            else:
                cands.append(Isolation("namespaces", ("user+" if not root else "") +
                                       "mount/net/pid/ipc/uts namespaces, the host's root read-only (visible), tmpfs "
                                       f"workdir, no network; {seccomp}; rlimits; {uid_note}", cmd, drop_uid=root,
                                       python=python, bpf=bpf))
        iso = None
        for cand in cands:
            held, err = _probe(cand, root)
            if err or not all(held.get(c) for c in CHECKS[:3]):
                why.append(err or "the probe saw " + ", ".join(c for c in CHECKS[:3] if not held.get(c)) + " fail")
                continue
            note = "; ".join(why)
            iso = dataclasses.replace(cand, detail=cand.detail + (f"; {note}" if note else ""),
                                      held=tuple(c for c in CHECKS if held.get(c)),
                                      lacks=tuple(c for c in CHECKS if not held.get(c)))
            break
        if iso is None:
            iso = rlimits_isolation("no namespaces: " + "; ".join(why), python)
        _detected[python] = iso
        return iso


def machine() -> str:
    return f"{platform.system()} {platform.release()} {platform.machine()}, {os.cpu_count()} CPUs"
