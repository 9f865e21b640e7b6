"""Fault injection on a training run: kill it at seeded random moments (SIGKILL inside checkpoint saves, SIGKILL
anywhere, SIGTERM as a preemption notice), rerun the same command after each, and check what an operator cares
about against an uninterrupted run of the same config: the final params bit for bit, metrics.jsonl with one row per
step, and no checkpoint lost. Then full disks (root: a small tmpfs as the run directory): full when the run starts,
and filled by another writer while a checkpoint is being saved; each must end in one line naming the path and the
free space (exit 2), leave no lock, and resume to the same params once there is space.

    python bench/faults.py [--faults 8] [--seed 0] [--steps 36] [--workdir DIR] [--no_disk]

The run is the tiny config (configs/tiny.py) on this machine's CPU, with a checkpoint every 3 steps so that many
kills land inside a save. Prints one line per fault and summary tables; exits 1 if any fault lost data or a full
disk did not end as above. tests/test_faults.py runs it with a few faults.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("kill-in-save", "kill-anywhere", "sigterm")


def command(workdir: str, tokenizer: str, steps: int) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config=" + os.path.join(ROOT, "configs", "tiny.py"),
            f"--workdir={workdir}", f"--config.tokenizer={tokenizer}", "--config.seq_len=64",
            "--config.batch_size=8", f"--config.steps={steps}", "--config.log_every=1", "--config.eval_every=0",
            "--config.checkpoint_every=3", "--config.keep_checkpoints=2", "--config.optimizer.warmup_steps=2"]


def env() -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def metric_steps(workdir: str) -> list[int]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if '"loss"' in line]


def saving(workdir: str) -> bool:
    """Whether an Orbax save is in flight: a temporary step directory exists."""
    ckpts = os.path.join(workdir, "checkpoints")
    return os.path.isdir(ckpts) and any("tmp" in name for name in os.listdir(ckpts))


def inject(kind: str, cmd: list[str], workdir: str, target: int, rng: random.Random, timeout: float = 600) -> dict:
    """Start the run and deliver one fault of `kind` once this process has logged step `target`: SIGKILL at a random
    moment (0-50 ms) inside the next checkpoint save ("kill-in-save", the save's temporary directory present), else
    0-20 ms after the step (SIGKILL or SIGTERM). Waits for the process; what happened."""
    metrics = os.path.join(workdir, "metrics.jsonl")
    launched = time.time()
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = launched + timeout
    fired, step = False, None
    while time.time() < deadline and proc.poll() is None:
        # rows this process wrote (a resume rewrites the file to the restored step first)
        reached = os.path.exists(metrics) and os.path.getmtime(metrics) > launched and \
            max(metric_steps(workdir), default=0) >= target
        if reached and (kind != "kill-in-save" or saving(workdir)):
            time.sleep(rng.uniform(0, 0.05 if kind == "kill-in-save" else 0.02))
            step = max(metric_steps(workdir), default=0)
            proc.send_signal(signal.SIGTERM if kind == "sigterm" else signal.SIGKILL)
            fired = True
            break
        time.sleep(0.002)
    _, err = proc.communicate(timeout=timeout)
    return {"kind": kind, "fired": fired and proc.returncode != 0, "rc": proc.returncode, "step": step,
            "stderr": err[-400:]}


def final_params(workdir: str):
    import qcjax

    _, params = qcjax.load(os.path.join(workdir, "checkpoints"))
    return params


def same_params(a, b) -> bool:
    import jax
    import numpy as np

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def run(faults: int, seed: int, steps: int, root: str, log=print) -> dict:
    from qcjax.data.spm import train_spm

    tokenizer = os.path.join(root, "spm")
    if not os.path.exists(os.path.join(tokenizer, "spm.model")):
        train_spm(tokenizer, vocab_size=512, max_chars=300_000, progress=False)
    straight, faulty = os.path.join(root, "straight"), os.path.join(root, "faulty")
    for d in (straight, faulty):
        shutil.rmtree(d, ignore_errors=True)  # this tool's own scratch directories
    subprocess.run(command(straight, tokenizer, steps), env=env(), check=True, capture_output=True)
    rng = random.Random(seed)
    cmd = command(faulty, tokenizer, steps)
    # one target step per fault, increasing and 4 apart (a kill in a save lands up to a save interval after its
    # target; the rerun resumes before it), so every fault finds the run still going
    slack = steps - 2 - 4 * faults
    if slack < 0:
        raise ValueError(f"{faults} faults need at least {4 * faults + 2} steps")
    gaps = sorted(rng.sample(range(slack + faults), faults))
    targets = [2 + 4 * i + (g - i) for i, g in enumerate(gaps)]
    events = []
    for i, target in enumerate(targets):
        kind = KINDS[i] if i < len(KINDS) else rng.choice(KINDS)
        e = inject(kind, cmd, faulty, target, rng)
        events.append(e)
        log(f"fault {i + 1}/{faults}: {kind} after step {e['step']} -> rc {e['rc']}"
            + ("" if e["fired"] else " (the run ended before the fault fired)"))
    rerun = subprocess.run(cmd, env=env(), capture_output=True, text=True)  # finish the run
    rows = metric_steps(faulty)
    params_equal = rerun.returncode == 0 and same_params(final_params(straight), final_params(faulty))
    one_row_per_step = rows == list(range(1, steps + 1))
    fired = [e for e in events if e["fired"]]
    lost = not (params_equal and one_row_per_step)
    return {"faults": len(fired), "by_kind": {k: sum(e["kind"] == k for e in fired) for k in KINDS},
            "survived": len(fired) if not lost else 0, "params_bitwise_equal": params_equal,
            "metrics_one_row_per_step": one_row_per_step, "data_lost": lost, "final_rc": rerun.returncode,
            "final_stderr": rerun.stderr[-600:]}


def _mount(d: str, size: int) -> bool:
    os.makedirs(d, exist_ok=True)
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", d],
                              capture_output=True).returncode == 0
    except OSError:
        return False


def _fill(d: str, name: str = "filler") -> None:
    """Another writer takes every free byte of d's file system."""
    with open(os.path.join(d, name), "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError:
            pass


def _dir_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def _ended(proc_rc: int, stderr: str, workdir: str) -> dict:
    """How a run on a full disk ended: status, its stderr lines (progress bars aside), the error line."""
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip() and not ln.startswith("train:")]
    err = [ln for ln in lines if ln.startswith("train.py: error:")]
    return {"rc": proc_rc, "stderr_lines": len(lines), "error": err[0] if err else "",
            "names_path_and_free": bool(err) and workdir in err[0] and " free)" in err[0],
            "lock_left": os.path.exists(os.path.join(workdir, "LOCK")),
            "other_lines": [ln[:300] for ln in lines if not ln.startswith("train.py: error:")][:8]}


def disk_cases(root: str, tokenizer: str, steps: int, straight: str, log=print) -> list[dict]:
    """The full-disk cases (root only: they mount a tmpfs); [] where no tmpfs can be mounted."""
    ckpt = os.path.join(straight, "checkpoints")
    step_bytes = max(_dir_bytes(os.path.join(ckpt, s)) for s in os.listdir(ckpt) if s.isdigit())
    out = []
    for case in ("full at start", "filled during a save"):
        d = os.path.join(root, "disk-" + case.split()[0])
        work = os.path.join(d, "run")
        size = 256 << 10 if case == "full at start" else 4 * step_bytes + (1 << 20)
        if not _mount(d, size):
            log("disk cases skipped: cannot mount a tmpfs (needs root)")
            return []
        try:
            cmd = command(work, tokenizer, steps)
            if case == "full at start":
                _fill(d)
                r = subprocess.run(cmd, env=env(), capture_output=True, text=True)
                e = _ended(r.returncode, r.stderr, work)
            else:  # another writer fills the disk once the second save is under way
                proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                filled = False
                while proc.poll() is None and not filled:
                    if saving(work) and max(metric_steps(work), default=0) >= 6:
                        _fill(d)
                        filled = True
                    time.sleep(0.002)
                _, err = proc.communicate()
                e = _ended(proc.returncode, err, work)
                e["filled_in_a_save"] = filled
            log(f"disk {case}: rc {e['rc']}, {e['stderr_lines']} stderr line(s): {e['error'][:200]}")
            os.remove(os.path.join(d, "filler"))
            subprocess.run(["mount", "-o", f"remount,size={64 << 20}", d], check=True)  # space again
            r = subprocess.run(cmd, env=env(), capture_output=True, text=True)
            e["resumed_rc"] = r.returncode
            e["params_bitwise_equal"] = r.returncode == 0 and same_params(final_params(straight), final_params(work))
            e["ok"] = (e["rc"] == 2 and e["stderr_lines"] == 1 and e["names_path_and_free"] and not e["lock_left"]
                       and e["params_bitwise_equal"] and e.get("filled_in_a_save", True))
            out.append({"case": case, **e})
        finally:
            subprocess.run(["umount", "-l", d], capture_output=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faults", type=int, default=8, help="faults to inject (the first three: one of each kind)")
    p.add_argument("--seed", type=int, default=0, help="seeds the fault kinds and moments")
    p.add_argument("--steps", type=int, default=None, help="training steps of the run (default: 4 per fault + 4)")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a fresh temporary one)")
    p.add_argument("--no_disk", action="store_true", help="skip the full-disk cases")
    a = p.parse_args(argv)
    from qcjax import platform as switch

    switch.quiet_libtpu()
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's read-only notices when it reads the final params
    root = a.workdir or tempfile.mkdtemp(prefix="qcjax-faults-")
    os.makedirs(root, exist_ok=True)
    t0 = time.time()
    a.steps = a.steps or 4 * a.faults + 4
    r = run(a.faults, a.seed, a.steps, root)
    print(f"\n{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs; python bench/faults.py "
          f"--faults {a.faults} --seed {a.seed} --steps {a.steps}; {time.time() - t0:.0f} s")
    print("| faults injected | kill in a save | kill anywhere | SIGTERM | survived | params bitwise | "
          "metrics one row per step | data lost |")
    print("|---|---|---|---|---|---|---|---|")
    k = r["by_kind"]
    print(f"| {r['faults']} | {k['kill-in-save']} | {k['kill-anywhere']} | {k['sigterm']} | {r['survived']} | "
          f"{r['params_bitwise_equal']} | {r['metrics_one_row_per_step']} | {'yes' if r['data_lost'] else 'none'} |")
    if r["data_lost"]:
        print(r["final_stderr"], file=sys.stderr)
    disks = [] if a.no_disk else disk_cases(root, os.path.join(root, "spm"), a.steps, os.path.join(root, "straight"))
    if disks:
        print("\n| full disk | exit status | stderr lines | error names path and free space | lock left | resumed "
              "to the same params |")
        print("|---|---|---|---|---|---|")
        for e in disks:
            print(f"| {e['case']} | {e['rc']} | {e['stderr_lines']} | {e['names_path_and_free']} | "
                  f"{e['lock_left']} | {e['params_bitwise_equal']} |")
        for e in disks:
            print(f"{e['case']}: {e['error']}")
    return 1 if r["data_lost"] or not all(e["ok"] for e in disks) else 0


if __name__ == "__main__":
    sys.exit(main())
