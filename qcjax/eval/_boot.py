# The sandbox's trusted bootstrap: run as `python -I [-S] -c <this file's text>`, inside the namespaces when they are
# on. It reads one JSON line of settings and then the program from stdin, isolates the filesystem (read-only root,
# a size-capped tmpfs as the working directory), sets resource limits, forks, drops to an unprivileged uid in the
# child and runs the program there; the parent (pid 1 of the namespace when isolated) waits and exits with the
# child's status, which tears the namespace (and anything the program left running) down. The child reports on the
# result fd: one JSON line carrying the nonce once the program ran to its end, or the exception that stopped it.
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

    if cfg["isolate"]:
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
            report({"setup_error": "%s: %s" % (type(e).__name__, e)})
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
    except Exception as e:
        report({"setup_error": "%s: %s" % (type(e).__name__, e)})
        os._exit(125)
    nonce = cfg.pop("nonce")
    del cfg
    g = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        code = compile(program, "<program>", "exec")
        del program
        exec(code, g)
    except BaseException as e:  # noqa: B036 (SystemExit too: exiting before the end is not a pass)
        try:
            msg = str(e)
        except BaseException:
            msg = "?"
        report({"done": False, "error": type(e).__name__, "message": msg[:500]})
        os._exit(1)
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except BaseException:
            pass
    report({"done": True, "nonce": nonce})
    os._exit(0)


_boot()
