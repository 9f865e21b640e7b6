# The sandbox's trusted bootstrap: run as `python -I [-S] -c <this file's text>`, inside the namespaces when they are
# on. It reads one JSON line of settings and then the program from stdin. Without bubblewrap (which built the whole
# root already) it isolates the filesystem itself (read-only root, a size-capped tmpfs as the working directory). It
# sets resource limits, forks, drops to an unprivileged uid in the child, installs the seccomp filter and runs the
# program there; the parent (pid 1 of the namespace when isolated) waits and exits with the child's status, which
# tears the namespace (and anything the program left running) down. The child reports on the result fd: one JSON
# line carrying the nonce once the program ran to its end, or the exception that stopped it.
# Modes (sandbox.Tested): "run" (the above), "serve" (run the program, then answer calls read from req_fd on rep_fd:
# a function name and arguments in, the result as builtin values out; nothing is reported), "test" (the trusted
# tester: `_qcjax_call` forwards calls to the program's process, `_qcjax_test` records per-test verdicts).
# Standard library only; no qcjax import (the child must not see the evaluator's code or state).
import sys, os


def _expose_python(libc, ctypes):
    """The program runs as another uid: when a directory on sys.path sits below one that other users may not
    enter (e.g. Python installed under /root), cover that directory with an empty tmpfs (hiding the rest of it)
    and bind-mount only the sys.path directories back in place."""
    MS_BIND, MS_REC = 4096, 16384
    need = sorted({os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)})
    need = [p for p in need if not any(p != q and p.startswith(q + "/") for q in need)]
    groups = {}
    for p in need:
        parts = p.strip("/").split("/")
        for k in range(1, len(parts) + 1):
            d = "/" + "/".join(parts[:k])
            if not os.stat(d).st_mode & 0o001:
                groups.setdefault(d, []).append(p)
                break
    for top, paths in groups.items():
        if top in paths:
            continue  # the sys.path directory itself is closed: nothing to expose without changing modes
        fds = [os.open(p, os.O_PATH | os.O_DIRECTORY) for p in paths]
        if libc.mount(b"tmpfs", top.encode(), b"tmpfs", 2 | 4, b"mode=0755,size=1m") != 0:
            raise OSError(ctypes.get_errno(), "mount tmpfs over " + top)
        for p, fd in zip(paths, fds):
            os.makedirs(p, mode=0o755, exist_ok=True)
            if libc.mount(("/proc/self/fd/%d" % fd).encode(), p.encode(), None, MS_BIND | MS_REC, None) != 0:
                raise OSError(ctypes.get_errno(), "bind-mount " + p)
            os.close(fd)


def _boot():
    import json
    import resource

    cfg = json.loads(sys.stdin.readline())
    program = sys.stdin.read()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    rfd, wd = cfg["result_fd"], cfg["workdir"]

    def report(obj):
        try:
            os.write(rfd, (json.dumps(obj) + "\n").encode())
        except OSError:
            pass

    if cfg["isolate"] == "unshare":
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)

            class MountAttr(ctypes.Structure):
                _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                            ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

            MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 2, 4, 16384, 1 << 18
            if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
                raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
            if cfg["uid"] is not None:
                _expose_python(libc, ctypes)
            # mount_setattr(AT_FDCWD, "/", AT_RECURSIVE, {RDONLY|NOSUID|NODEV}): every mount read-only
            attr = MountAttr(1 | 2 | 4, 0, 0, 0)
            if libc.syscall(cfg["sys_mount_setattr"], -100, b"/", 0x8000, ctypes.byref(attr),
                            ctypes.sizeof(attr)) != 0:
                raise OSError(ctypes.get_errno(), "mount_setattr / read-only")
            opts = "size=%d,nr_inodes=%d,mode=0700" % (cfg["tmpfs_bytes"], 4096)
            if cfg["uid"] is not None:
                opts += ",uid=%d,gid=%d" % (cfg["uid"], cfg["uid"])
            if libc.mount(b"tmpfs", wd.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts.encode()) != 0:
                raise OSError(ctypes.get_errno(), "mount tmpfs on the working directory")
        except Exception as e:
            report({"setup_error": "%s: %s" % (type(e).__name__, e), "nonce": cfg["nonce"]})
            os._exit(125)
    os.chdir(wd)

    pid = os.fork()
    if pid:  # the waiter: reap everything; exit with the program's status
        os.close(rfd)
        while True:
            try:
                p, status = os.wait()
            except ChildProcessError:
                os._exit(125)
            except InterruptedError:
                continue
            if p == pid:
                break
        if os.WIFSIGNALED(status):
            os._exit(128 + os.WTERMSIG(status))
        os._exit(os.WEXITSTATUS(status))

    # the child: limits, an unprivileged uid, a clean environment, then the program
    try:
        os.umask(0o077)
        lim = cfg["limits"]
        R = resource
        for name, value in (("RLIMIT_CORE", 0), ("RLIMIT_CPU", lim["cpu_s"]), ("RLIMIT_NOFILE", lim["nofile"]),
                            ("RLIMIT_FSIZE", lim["fsize"]), ("RLIMIT_NPROC", lim["nproc"])):
            if value is not None:
                R.setrlimit(getattr(R, name), (value, value))
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
        if cfg["isolate"]:
            import ctypes

            ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL (cleared by setuid)
        os.environ.clear()
        os.environ.update({"HOME": wd, "TMPDIR": wd, "PATH": "/usr/bin:/bin"})
        if lim["as_bytes"] is not None:
            R.setrlimit(R.RLIMIT_AS, (lim["as_bytes"], lim["as_bytes"]))
        if cfg["bpf"]:
            _seccomp(bytes.fromhex(cfg["bpf"]))
    except Exception as e:
        report({"setup_error": "%s: %s" % (type(e).__name__, e), "nonce": cfg["nonce"]})
        os._exit(125)
    nonce, mode = cfg.pop("nonce"), cfg["mode"]
    g = {"__name__": "__main__", "__builtins__": __builtins__}
    tests = []
    if mode == "test":
        g["_qcjax_call"] = _caller(cfg["req_fd"], cfg["rep_fd"])
        g["_qcjax_test"] = lambda ok, why="": tests.append((bool(ok), str(why)[:200]))
    if mode == "serve":  # nothing to report from here on: the program gets no result fd to forge reports on
        os.close(rfd)
        _serve(program, g, cfg["req_fd"], cfg["rep_fd"])
    del cfg
    try:
        code = compile(program, "<program>", "exec")
        del program
        exec(code, g)
    except BaseException as e:  # noqa: B036 (SystemExit too: exiting before the end is not a pass)
        report({"done": False, "error": type(e).__name__, "message": _msg(e)[:500], "tests": tests})
        os._exit(1)
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except BaseException:
            pass
    report({"done": True, "nonce": nonce, "tests": tests})
    os._exit(0)


def _msg(e):
    try:
        return str(e)
    except BaseException:
        return "?"


def _seccomp(bpf):
    """prctl(PR_SET_NO_NEW_PRIVS), then prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &sock_fprog)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    prog = Prog(len(bpf) // 8, bpf)
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "seccomp filter")


def _read(fd, n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return buf


def _send(fd, payload):
    data = len(payload).to_bytes(8, "little") + payload
    while data:
        data = data[os.write(fd, data):]


def _serve(program, g, req_fd, rep_fd):
    """The program's process: run its code, then answer calls until the tester closes the pipe. A failure of the
    code itself answers every call."""
    import marshal

    err = None
    try:
        exec(compile(program, "<program>", "exec"), g)
    except BaseException as e:  # noqa: B036
        err = ("raise", type(e).__name__, _msg(e)[:500])
    while True:
        head = _read(req_fd, 8)
        if head is None:
            os._exit(0)
        req = _read(req_fd, int.from_bytes(head, "little"))
        if req is None:
            os._exit(0)
        reply = err
        if reply is None:
            try:
                name, args = marshal.loads(req)
                if name not in g:
                    raise NameError("name %r is not defined" % name)
                value = g[name](*args)
            except BaseException as e:  # noqa: B036
                reply = ("raise", type(e).__name__, _msg(e)[:500])
            else:
                try:
                    out = marshal.dumps(("ok", value))
                except BaseException:  # noqa: B036 (ValueError: unmarshallable; RecursionError, MemoryError)
                    reply = ("raise", "TypeError", "the result (%s) is not a builtin value" % type(value).__name__)
        try:
            _send(rep_fd, marshal.dumps(reply) if reply is not None else out)
        except OSError:
            os._exit(0)


_BUILTIN = (int, float, complex, str, bytes, bool, type(None), tuple, list, dict, set, frozenset)


def _builtin(v, depth=0):
    """Whether v is made of builtin values only (what the tester accepts back from the program)."""
    t = type(v)
    if t not in _BUILTIN or depth > 1000:
        return False
    if t in (tuple, list, set, frozenset):
        return all(_builtin(x, depth + 1) for x in v)
    if t is dict:
        return all(_builtin(k, depth + 1) and _builtin(x, depth + 1) for k, x in v.items())
    return True


def _caller(req_fd, rep_fd):
    """The tester's `_qcjax_call(name, *args)`: builtin arguments out, the program's result (builtin values only,
    checked here: the program's side of the pipe is untrusted) or its exception back."""
    import builtins
    import marshal

    def call(name, *args):
        try:
            payload = marshal.dumps((name, args))
        except ValueError:
            raise TypeError("a test argument is not a builtin value") from None
        try:
            _send(req_fd, payload)
            head = _read(rep_fd, 8)
            n = int.from_bytes(head, "little") if head else 0
            data = _read(rep_fd, n) if head and n <= 1 << 28 else None
        except OSError:
            data = None
        if data is None:
            raise EOFError("the program's process ended before the tests finished")
        try:
            reply = marshal.loads(data)
        except Exception:
            reply = None
        if type(reply) is tuple and len(reply) == 2 and reply[0] == "ok" and _builtin(reply[1]):
            return reply[1]
        if type(reply) is tuple and len(reply) == 3 and reply[0] == "raise" and _builtin(reply):
            cls = getattr(builtins, reply[1], None)
            if not (isinstance(cls, type) and issubclass(cls, BaseException)):
                cls = type(reply[1], (Exception,), {})
            try:
                exc = cls(reply[2])
            except Exception:
                exc = Exception(reply[2])
            raise exc
        raise TypeError("the program's reply is not a builtin value")

    return call


_boot()
