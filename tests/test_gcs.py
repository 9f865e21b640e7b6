"""gs:// paths end to end against a local GCS emulator (gcp-storage-emulator on 127.0.0.1, started and stopped here;
tests/gcs_emulator.py adds the object generations TensorStore needs).

Each library reads its own endpoint setting: gcsfs (etils.epath's gs:// backend without TensorFlow) and
google-cloud-storage (tensorboardX's gs:// writer) read STORAGE_EMULATOR_HOST; TensorStore (Orbax's array store)
reads TENSORSTORE_GCS_HTTP_URL and, for a fixed bearer token instead of Google credentials,
GOOGLE_AUTH_TOKEN_FOR_TESTING; gcsfs takes anonymous access from fsspec's config (FSSPEC_GS). gcsfs's bucket-type
probe (a gRPC call the emulator does not serve, 60 s per bucket) is turned off with
GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false, which gcsfs reads when it is imported.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before anything imports gcsfs

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "qcjax-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs():
    """The emulator's environment (also for subprocesses); yields the fsspec filesystem for checks."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "gcs_emulator.py"), str(port), BUCKET],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("the GCS emulator did not start")
            time.sleep(0.1)
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
           "FSSPEC_GS": json.dumps({"token": "anon", "use_listings_cache": False}),
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GOOGLE_CLOUD_PROJECT": "test"}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    import fsspec
    import fsspec.config

    mp.setitem(fsspec.config.conf, "gs", {"token": "anon", "use_listings_cache": False})
    # the plain GCSFileSystem even if gcsfs was imported before the variable above was set
    fsspec.register_implementation("gs", "gcsfs.core.GCSFileSystem", clobber=True)
    fsspec.filesystem("gs").clear_instance_cache()
    try:
        yield fsspec.filesystem("gs")
    finally:
        mp.undo()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _env():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = ROOT
    return env


def _metrics(gcs, workdir):
    with gcs.open(workdir.split("://", 1)[1] + "/metrics.jsonl", "r") as f:
        return [json.loads(line) for line in f if line.strip()]


def _losses(gcs, workdir):
    return {r["step"]: r["loss"] for r in _metrics(gcs, workdir) if "loss" in r}


def _train_cmd(workdir, spm_dir, steps):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config=" + os.path.join(ROOT, "configs", "tiny.py"),
            f"--workdir={workdir}", f"--config.tokenizer={spm_dir}", "--config.seq_len=64", "--config.batch_size=8",
            f"--config.steps={steps}", "--config.log_every=1", "--config.eval_every=0", "--config.checkpoint_every=4",
            "--config.optimizer.warmup_steps=2", "--config.mesh.fsdp=-1"]


# ---- (a) training in a gs:// workdir -------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_in_a_gs_workdir_resumes_after_a_kill_bitwise_and_samples(gcs, spm_dir, tmp_path):
    """Two runs of 12 steps on gs:// (checkpoints every 4 steps, 2 kept): one straight, one killed after its step-4
    checkpoint and run again. The rerun takes over the dead trainer's LOCK, resumes and ends with the straight run's
    losses and params, bit for bit. Then step 12 is damaged: the next run falls back to step 8, sets 12 aside and
    trains it again, bitwise as before. infer.py samples the same text from the gs:// checkpoint as from a local copy
    (and finds the tokenizer through the checkpoint); nothing is written under a local "gs:" path."""
    from qcjax.checkpoint import restore_params

    straight, killed = f"gs://{BUCKET}/runs/straight", f"gs://{BUCKET}/runs/killed"
    run = dict(env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    out = subprocess.run(_train_cmd(straight, spm_dir, 12), **run)
    assert out.returncode == 0, out.stderr[-3000:]
    proc = subprocess.Popen(_train_cmd(killed, spm_dir, 12), env=_env(), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    commit = f"{BUCKET}/runs/killed/checkpoints/4/commit_success.txt"  # Orbax's commit marker on object stores
    deadline = time.time() + 600
    while not gcs.exists(commit) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not gcs.exists(f"{BUCKET}/runs/killed/checkpoints/12/commit_success.txt")
    assert gcs.exists(f"{BUCKET}/runs/killed/LOCK")  # left by the killed trainer: stale, taken over below
    out = subprocess.run(_train_cmd(killed, spm_dir, 12), **run)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from checkpoint step 4" in out.stderr or "resuming from checkpoint step 8" in out.stderr
    assert "taking over the stale lock" in out.stderr
    assert not gcs.exists(f"{BUCKET}/runs/killed/LOCK")
    a, b = _losses(gcs, straight), _losses(gcs, killed)
    assert sorted(b) == list(range(1, 13))  # one row per step after the resume
    assert a == b  # bit for bit
    assert gcs.ls(f"{BUCKET}/runs/killed/tensorboard")
    steps = lambda run: sorted(p.rsplit("/", 1)[1] for p in gcs.ls(f"{BUCKET}/runs/{run}/checkpoints"))  # noqa: E731
    assert steps("straight") == ["12", "8"]  # step 4 pruned (keep_checkpoints=2)
    _, pa = restore_params(straight + "/checkpoints")
    _, pb = restore_params(killed + "/checkpoints", step=12)
    import jax

    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # flip 64 bytes in the middle of step 12's largest params object: the rerun falls back to step 8
    objs = [p for p in gcs.find(f"{BUCKET}/runs/killed/checkpoints/12/params")]
    data = max(objs, key=lambda p: gcs.info(p)["size"])
    raw = bytearray(gcs.cat_file(data))
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(b ^ 0xFF for b in raw[mid:mid + 64])
    gcs.pipe_file(data, bytes(raw))
    out = subprocess.run(_train_cmd(killed, spm_dir, 12), **run)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "checkpoint step 12 is corrupt or unreadable" in out.stderr and "resuming from checkpoint step 8" in out.stderr
    assert "moved the corrupt checkpoint step 12" in out.stderr
    assert [s for s in steps("killed") if s.startswith("unreadable-step-12-")]
    assert _losses(gcs, killed) == a
    samples = []
    for ckpt in (killed + "/checkpoints", str(tmp_path / "local")):
        if not ckpt.startswith("gs://"):  # the same checkpoint copied to a local directory
            gcs.get(f"{BUCKET}/runs/straight/checkpoints/", ckpt + "/", recursive=True)
        sample = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), "--ckpt", ckpt, "--tokenizer",
                                 spm_dir, "--prompt", "def read(path):", "--max_new_tokens", "6", "--temperature",
                                 "0"] + (["--step", "12"] if ckpt.startswith("gs://") else []), **run)
        assert sample.returncode == 0 and "generated 6 tokens" in sample.stderr, sample.stderr[-3000:]
        samples.append(sample.stdout)
    assert samples[0] == samples[1]
    # without --tokenizer: the one the checkpoint names (the run's --config.tokenizer)
    sample = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), "--ckpt", killed + "/checkpoints",
                             "--prompt", "def read(path):", "--max_new_tokens", "6", "--temperature", "0"], **run)
    assert sample.returncode == 0 and sample.stdout == samples[0], sample.stderr[-3000:]
    assert not os.path.exists(tmp_path / "gs:")


def test_workdir_lock_on_gs_refuses_a_second_trainer_and_takes_over_a_dead_one(gcs, monkeypatch):
    from qcjax import paths
    from qcjax.train.lock import WorkdirBusy, WorkdirLock

    workdir = f"gs://{BUCKET}/locktest"
    with WorkdirLock(workdir) as lock:
        assert lock.held and json.loads(gcs.cat_file(f"{BUCKET}/locktest/LOCK"))["pid"] == os.getpid()
        with pytest.raises(WorkdirBusy, match=rf"in use by another trainer \(pid {os.getpid()} on "):
            WorkdirLock(workdir).acquire()
        with monkeypatch.context() as m:  # a trainer that checked before the lock appeared: the precondition holds
            m.setattr(paths, "exists", lambda p: False)
            with pytest.raises(WorkdirBusy, match="in use by another trainer"):
                WorkdirLock(workdir).acquire()
        assert json.loads(gcs.cat_file(f"{BUCKET}/locktest/LOCK"))["pid"] == os.getpid()
    assert not gcs.exists(f"{BUCKET}/locktest/LOCK")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gcs.pipe_file(f"{BUCKET}/locktest/LOCK", json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}).encode())
    with WorkdirLock(workdir) as lock:
        assert lock.held and json.loads(gcs.cat_file(f"{BUCKET}/locktest/LOCK"))["pid"] == os.getpid()


# ---- (b) conversion to and from gs:// ------------------------------------------------------------------------------
def test_convert_hf_to_orbax_and_back_through_gs(gcs, tmp_path, tok):
    from conftest import save_hf_dir

    from qcjax import convert, load
    from qcjax.config import ModelConfig
    from qcjax.paths import upload

    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, tie_word_embeddings=False)
    save_hf_dir(tmp_path / "hf", cfg, tok)
    upload(str(tmp_path / "hf"), f"gs://{BUCKET}/conv/hf")
    hf, ckpt, out = f"gs://{BUCKET}/conv/hf", f"gs://{BUCKET}/conv/ckpt", f"gs://{BUCKET}/conv/out"
    assert convert.main(["hf-to-orbax", "--hf_dir", hf, "--out", ckpt, "--no_progress"]) == 0
    assert gcs.exists(f"{BUCKET}/conv/ckpt/0/commit_success.txt")
    assert not [p for p in gcs.ls(f"{BUCKET}/conv") if ".tmp-" in p]  # the temporary prefix is gone
    assert convert.main(["orbax-to-hf", "--ckpt", ckpt, "--out", out, "--tokenizer_dir", hf, "--max_shard_size",
                         "40000", "--no_progress"]) == 0
    names = {p.rsplit("/", 1)[1] for p in gcs.ls(f"{BUCKET}/conv/out")}
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= names
    # a non-empty gs:// output is refused, as a local one is
    assert convert.main(["orbax-to-hf", "--ckpt", ckpt, "--out", out, "--no_progress"]) == 1

    _, want = load(str(tmp_path / "hf"))
    import jax

    for src in (hf, ckpt, out):
        got_cfg, got = load(src)
        assert got_cfg.hidden_size == 32
        for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    gcs.get(f"{BUCKET}/conv/out/", str(tmp_path / "out") + "/", recursive=True)
    from safetensors.numpy import load_file

    ref = load_file(str(tmp_path / "hf" / "model.safetensors"))
    got = {}
    for f in os.listdir(tmp_path / "out"):
        if f.endswith(".safetensors"):
            got.update(load_file(str(tmp_path / "out" / f)))
    assert sorted(ref) == sorted(got)
    for k in ref:
        np.testing.assert_array_equal(ref[k], got[k])


# ---- (c) data sources and tokenizers on gs:// ----------------------------------------------------------------------
def _strip(rec):
    return {k: v for k, v in rec.items() if k != "__where__"}


def test_data_sources_and_tokenizers_read_from_gs(gcs, tmp_path, tok, spm_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qcjax.data.config import SourceConfig
    from qcjax.data.sources import make_source
    from qcjax.paths import upload
    from qcjax.tokenizer import load_tokenizer

    local = tmp_path / "data"
    (local / "jsonl").mkdir(parents=True)
    for k in range(2):
        with open(local / "jsonl" / f"part{k}.jsonl", "w") as f:
            for i in range(5):
                f.write(json.dumps({"text": f"def f{k}_{i}():\n    return {i}\n"}) + "\n")
            f.write("\n")
    (local / "pq").mkdir()
    pq.write_table(pa.table({"text": [f"x = {i}" for i in range(7)]}), local / "pq" / "a.parquet", row_group_size=3)
    for repo, files in {"alpha": {"a.py": "A = 1\n", "pkg/b.py": "B = 2\n"}, "beta": {"c.py": "C = 3\n"}}.items():
        for rel, text in files.items():
            (local / "tree" / repo / rel).parent.mkdir(parents=True, exist_ok=True)
            (local / "tree" / repo / rel).write_text(text)
    (local / "tree" / "one.py").write_text("ONE = 1\n")
    upload(str(local), f"gs://{BUCKET}/data")
    from qcjax.paths import local_copy

    copy = local_copy(f"gs://{BUCKET}/data/tree")  # a whole directory, downloaded
    assert sorted(os.path.relpath(os.path.join(d, f), copy) for d, _, fs in os.walk(copy) for f in fs) == \
        ["alpha/a.py", "alpha/pkg/b.py", "beta/c.py", "one.py"]

    cases = [({"kind": "jsonl", "path": "jsonl"}, 10), ({"kind": "jsonl", "path": "jsonl/part1.jsonl"}, 5),
             ({"kind": "jsonl", "path": "jsonl/*.jsonl"}, 10), ({"kind": "parquet", "path": "pq"}, 7),
             ({"kind": "tree", "path": "tree", "format": "repo"}, 3),
             ({"kind": "tree", "path": "tree", "format": "text"}, 4)]
    for spec, n in cases:
        here = make_source(SourceConfig(**{**spec, "path": str(local / spec["path"])}))
        there = make_source(SourceConfig(**{**spec, "path": f"gs://{BUCKET}/data/{spec['path']}"}))
        assert len(here) == len(there) == n, spec
        for i in range(n):
            got = _strip(there[i])
            if spec["kind"] == "tree" and spec.get("format") == "text":
                assert got["path"] == _strip(here[i])["path"]
            assert got == _strip(here[i]), (spec, i)
        assert there[0]["__where__"].startswith(f"gs://{BUCKET}/data/")

    upload(tok.path, f"gs://{BUCKET}/tok/tokenizer.json")
    upload(os.path.join(spm_dir, "spm.model"), f"gs://{BUCKET}/spm/spm.model")
    text = "def read_config(path):\n    return open(path).read()\n"
    for local_path, url in ((tok.path, f"gs://{BUCKET}/tok/tokenizer.json"), (tok.path, f"gs://{BUCKET}/tok"),
                            (os.path.join(spm_dir, "spm.model"), f"gs://{BUCKET}/spm")):
        assert load_tokenizer(url).encode(text) == load_tokenizer(local_path).encode(text), url
