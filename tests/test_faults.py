"""Faults on a training run. bench/faults.py: SIGKILL inside a checkpoint save, SIGKILL at a random step and SIGTERM,
each followed by the same command (the final params equal an uninterrupted run's bit for bit, metrics.jsonl holds one
row per step), and full disks. Here also the pieces: the lock on a full disk, checkpoints that do not fit, unusable
data files, resumes with changed settings, the corrupt-step report."""
import contextlib
import errno
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from qcjax import paths
from qcjax.checkpoint import CheckpointCorrupt, Checkpointer, _ReadErrors
from qcjax.config import get_config
from qcjax.data.config import SourceConfig
from qcjax.data.sources import DataError, make_source
from qcjax.train.lock import WorkdirLock
from qcjax.train.loop import resume_changes

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import faults  # noqa: E402


@pytest.mark.slow
def test_seeded_faults_lose_no_data(tmp_path):
    r = faults.run(faults=3, seed=1, steps=14, root=str(tmp_path), log=lambda msg: None)
    assert r["faults"] == 3, r  # each fault fired while the run was still going
    assert r["params_bitwise_equal"] and r["metrics_one_row_per_step"], r
    assert not r["data_lost"] and r["final_rc"] == 0, r["final_stderr"]
    disks = faults.disk_cases(str(tmp_path), str(tmp_path / "spm"), 14, str(tmp_path / "straight"),
                              log=lambda msg: None)
    if not disks:
        pytest.skip("the full-disk cases need a tmpfs (mount -t tmpfs: root)")
    for e in disks:  # one line naming the path and the free space, exit 2, no lock left, nothing lost
        assert e["ok"], e


@contextlib.contextmanager
def small_disk(root, size: str):
    """A real tmpfs of `size` at root/disk (root can mount), else None: the caller simulates the full disk."""
    d = os.path.join(str(root), "disk")
    os.makedirs(d)
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", d],
                            capture_output=True).returncode == 0
    except OSError:  # no mount binary
        ok = False
    try:
        yield d if ok else None
    finally:
        if ok:
            subprocess.run(["umount", "-l", d], capture_output=True)


def _fill(d):
    with open(os.path.join(d, "fill"), "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def test_a_full_disk_leaves_no_lock(tmp_path, monkeypatch):
    with small_disk(tmp_path, "64k") as d:
        work = os.path.join(d or str(tmp_path), "run")
        os.makedirs(work)
        if d:
            _fill(d)
        else:  # no tmpfs here: the owner's write fails as on a full disk
            monkeypatch.setattr(json, "dump", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
        with pytest.raises(paths.DiskFull, match=r"run/LOCK: no space left on the device for the run's lock file"):
            WorkdirLock(work).acquire()
        assert os.listdir(work) == []  # nothing left that nobody holds
        if d:
            os.remove(os.path.join(d, "fill"))
        monkeypatch.undo()
        lock = WorkdirLock(work).acquire()  # the next run takes it
        lock.release()
        assert os.listdir(work) == []


def _params(n):
    return {"w": jnp.arange(n, dtype=jnp.float32)}


def test_a_checkpoint_that_cannot_fit_is_refused_in_one_line(tmp_path, monkeypatch):
    cfg = get_config("tiny")
    with small_disk(tmp_path, "1m") as d:
        ckdir = os.path.join(d or str(tmp_path), "ck")
        if d is None:  # report a small disk
            monkeypatch.setattr(paths, "free_bytes", lambda p: 200_000)
        ck = Checkpointer(ckdir, max_to_keep=2)
        ck.save(1, _params(1000), cfg)  # 4 KB: fits
        ck.wait()
        with pytest.raises(paths.DiskFull) as e:
            ck.save(2, _params(1_000_000), cfg)  # 4 MB
        ck.close()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{ck.directory}: no space left on the device for checkpoint step "
                                                  "2 (about 4.0 MB)") and " free); nothing was lost: the newest " \
            "complete checkpoint is step 1" in msg, msg
        assert Checkpointer(ckdir, read_only=True).all_steps() == [1]


def test_a_save_that_fills_the_disk_ends_in_one_line(tmp_path, monkeypatch, capfd):
    cfg = get_config("tiny")
    with small_disk(tmp_path, "1m") as d:
        if d is None:
            pytest.skip("needs a tmpfs (root) to fill a disk during a save")
        monkeypatch.setattr(paths, "free_bytes", lambda p: None)  # no check before: the write itself fails
        ck = Checkpointer(os.path.join(d, "ck"), max_to_keep=2)
        ck.save(1, _params(1000), cfg)
        ck.save(2, _params(1_000_000), cfg)
        with pytest.raises(paths.DiskFull, match=r"no space left on the device for the checkpoint being saved"):
            ck.wait()
        with contextlib.suppress(Exception):
            ck.close()
        assert "Traceback" not in capfd.readouterr().err  # Orbax's error logs of it are dropped
        assert Checkpointer(os.path.join(d, "ck"), read_only=True).all_steps() == [1]


@pytest.mark.parametrize("content, match", [(b"", "is empty"), (bytes(range(256)) * 64 + b"\n" * 40,
                                                                 "none of its first 32 records is readable")])
def test_unusable_data_files_fail_at_once(tmp_path, content, match):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=match):
        make_source(SourceConfig("jsonl", str(path)))


def test_an_unusable_data_file_stops_train_py_in_one_line(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "bin.jsonl").write_bytes(os.urandom(20000))
    out = subprocess.run([sys.executable, os.path.join(root, "train.py"), "--config=" + os.path.join(root, "configs",
                          "tiny.py"), f"--workdir={tmp_path / 'run'}", "--config.data.sources[0].kind=jsonl",
                          f"--config.data.sources[0].path={tmp_path / 'bin.jsonl'}"],
                         capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root))
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("train.py:")]
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "bin.jsonl: none of its first 32 records is readable" in lines[0]
    assert not os.path.exists(tmp_path / "run" / "LOCK")


def test_resume_says_what_changed_and_refuses_what_cannot_apply():
    then = {"steps": 6, "seed": 0, "seq_len": 64, "batch_size": 8, "optimizer": {"lr": 0.003, "b1": 0.9},
            "log_every": 1}
    same = resume_changes(then, dict(then, log_every=5, resume_data="exact"), 6, "D")
    assert same == (None, [])
    assert resume_changes(then, dict(then, steps=10, batch_size=16, optimizer={"lr": 0.001, "b1": 0.9}), 6, "D") == \
        (None, ["steps: 6 -> 10", "batch_size: 8 -> 16", "optimizer.lr: 0.003 -> 0.001"])
    why, changes = resume_changes(then, dict(then, steps=4), 6, "D")
    assert why.startswith("steps=4 is below step 6") and changes == ["steps: 6 -> 4"]
    for k, v in (("seed", 1), ("seq_len", 128)):
        why, _ = resume_changes(then, dict(then, **{k: v}, resume_data="exact"), 6, "D")
        assert why.startswith(f"{k} {then[k]!r} -> {v!r} since step 6") and "resume_data=reseed" in why
        assert resume_changes(then, dict(then, **{k: v}, resume_data="reseed"), 6, "D") == \
            (None, [f"{k}: {then[k]!r} -> {v!r}"])


def test_corrupt_step_message_names_tensorstores_error():
    with pytest.raises(CheckpointCorrupt) as e:
        with _ReadErrors("D", 6, "params"):
            try:
                raise ValueError('OUT_OF_RANGE: Error reading "w/0": Requested byte range [0, 30) is not valid')
            except ValueError as cause:
                raise Exception("Encountered error while reading array index: (slice(0, 2, 1),). See full "
                                "TensorStore details: <bound method spec of TensorStore({>.") from cause
    assert "bound method" not in str(e.value)
    assert e.value.reason == 'reading its params: ValueError: OUT_OF_RANGE: Error reading "w/0": Requested byte ' \
                             'range [0, 30) is not valid'
