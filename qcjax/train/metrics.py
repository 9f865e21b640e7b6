"""Training metrics: the FLOPs/MFU formula, and writers (JSONL + TensorBoard) used by the loop.

FLOPs per trained token (the convention of the PaLM paper, appendix B; remat recomputation is not counted):
    6 * N_matmul + 6 * L * H * D * (T + 1)
N_matmul: parameters that take part in matmuls for each token (attention and MLP projections of every layer, plus
the LM head; the embedding lookup is a gather, not a matmul). The second term is causal attention: QK^T and PV are
each 2 * H * D FLOPs per (query, key) pair in the forward pass; a causal row of length T has T (T + 1) / 2 pairs, so
(T + 1) / 2 keys per query on average; x3 for forward + backward. Packed rows are counted at full row length (an
upper bound when segments are short: block-sparse kernels skip the cross-document blocks).
"""
from __future__ import annotations

import json
from typing import Any

import jax

from qcjax.config import ModelConfig

# bf16 dense peak FLOP/s per device, by jax's device_kind.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
}


def matmul_params(cfg: ModelConfig) -> int:
    e, d, i = cfg.hidden_size, cfg.dim_per_head, cfg.intermediate_size
    per_layer = e * cfg.num_heads * d + 2 * e * cfg.num_kv_heads * d + cfg.num_heads * d * e + 3 * e * i
    return cfg.num_layers * per_layer + e * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    attention = 6 * cfg.num_layers * cfg.num_heads * cfg.dim_per_head * (seq_len + 1)
    return 6 * matmul_params(cfg) + attention


def tokens_per_step(task: str, batch_size: int, seq_len: int) -> int:
    """Row positions one train step processes (padding included; a DPO row is a chosen + a rejected sequence)."""
    return batch_size * seq_len * (2 if task == "dpo" else 1)


def train_flops_per_step(cfg: ModelConfig, task: str, batch_size: int, seq_len: int) -> float:
    """The MFU numerator of one step: `train_flops_per_token` x `tokens_per_step` (a frozen DPO reference's
    forward pass and remat recomputation are not counted, as in the MFU)."""
    return train_flops_per_token(cfg, seq_len) * tokens_per_step(task, batch_size, seq_len)


def peak_flops(device: Any = None, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device: the config's override, else the table; None when unknown (e.g. CPU)."""
    if override:
        return float(override)
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if kind.startswith(name):
            return PEAK_FLOPS[name]
    return None


def mfu(cfg: ModelConfig, seq_len: int, tokens_per_s: float, n_devices: int, peak: float | None) -> float | None:
    if not peak:
        return None
    return train_flops_per_token(cfg, seq_len) * tokens_per_s / (peak * n_devices)


METRICS_FILE = "metrics.jsonl"


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The rows a run's MetricsWriter wrote, in order: {"step", "loss", ...} (eval rows: {"step", "eval_loss", ...})."""
    from qcjax import paths

    with paths.open_file(paths.join(workdir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
    """metrics.jsonl (one object per logged step) and TensorBoard event files, written by process 0 only.

    In a gs:// workdir (objects cannot be appended to) metrics.jsonl is kept in memory and the whole object is
    rewritten at every logged step; TensorBoard writes through tensorboardX's own gs:// writer
    (google-cloud-storage)."""

    def __init__(self, workdir: str, enabled: bool = True):
        from qcjax import paths

        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._url = None
        if enabled:
            paths.makedirs(workdir)
            path = paths.join(workdir, METRICS_FILE)
            if paths.is_url(path):
                self._url = path
                self._rows = paths.read_bytes(path).decode() if paths.exists(path) else ""
            else:
                self._jsonl = open(path, "a")
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(paths.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in metrics.items():
            if v is None:
                continue
            v = float(v)
            row[prefix + k] = v
            self._tb.add_scalar(prefix + k, v, int(step))
        if self._url is not None:
            from qcjax import paths

            self._rows += json.dumps(row) + "\n"
            with paths.open_file(self._url, "w") as f:
                f.write(self._rows)
            return
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            if self._jsonl is not None:
                self._jsonl.close()
            self._tb.close()
