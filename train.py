"""Train a Qwen2.5-Coder model: continued pretraining (next-token + FIM, file- then repo-level), SFT or DPO.

    python train.py --config=configs/tiny.py --workdir=runs/tiny                 # CPU demo on the stdlib corpus
    python train.py --config=configs/32b.py:repo --workdir=/mnt/run/32b        # every host of a TPU pod slice
    python train.py --config=configs/1.5b.py:sft --config.init_from=/ckpt/hf --config.steps=500

    python train.py --config=configs/32b.py --compile_only --topology=v5p-128   # does it fit? (no TPU needed)

Any config field can be set with --config.FIELD=VALUE (every field and its meaning: docs/config.md).
--compile_only compiles the exact train step for a TPU slice on this host (libtpu needed, no TPU) and reports
per-chip memory, FLOPs per step and compile time; exit status 1 when it does not fit (docs/tpu-memory.md).
Run the same command on every host; with --multihost the processes find each other (jax.distributed). The run
resumes automatically from the newest complete checkpoint in --workdir.
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Training config file (optionally :stage).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Run directory: checkpoints, metrics.jsonl, tensorboard.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (TPU pods / SLURM / GKE).")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for manual multi-process runs.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes, for manual multi-process runs.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index, for manual multi-process runs.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Compile the train step for --topology and report per-chip "
                                  "memory; train nothing (needs libtpu, no TPU).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice for --compile_only: v5p-128, v5e-16, v6e-256, v4-32, "
                                "2xv5p-128 (two slices), v5p:4x4x8 (a chip grid).")


def compile_only(c, topology: str | None) -> int:
    """The --compile_only report; 0 fits, 1 does not fit, 2 bad flags/config or no libtpu."""
    from qcjax import tpu_compile as T
    from qcjax.train.loop import ConfigError

    if not topology:
        print("train.py: error: --compile_only needs --topology, e.g. --topology=v5p-128", file=sys.stderr)
        return 2
    try:
        report = T.compile_train(c, topology)
    except (ConfigError, T.TopologyError, T.CompileUnavailable) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    print(report.format())
    if not report.fits:
        print(f"train.py: error: the train step does not fit in the HBM of {topology}: lower "
              "--config.per_device_batch, use --config.model.remat=full, or a larger slice (docs/tpu-memory.md)",
              file=sys.stderr)
        return 1
    return 0


def main(argv):
    del argv
    if _COMPILE_ONLY.value:
        from qcjax.tpu_compile import quiet_libtpu

        quiet_libtpu(cpu_only=True)  # before JAX starts
        sys.exit(compile_only(_CONFIG.value, _TOPOLOGY.value))
    import jax
    from absl import logging as absl_logging

    if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO; keep stderr readable by default
        absl_logging.set_verbosity(absl_logging.WARNING)

    if _COORD.value:
        jax.distributed.initialize(_COORD.value, num_processes=_NPROC.value, process_id=_PID.value)
    elif _MULTIHOST.value:
        jax.distributed.initialize()
    logging.basicConfig(level=logging.INFO if jax.process_index() == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stderr)
    from qcjax.train.loop import ConfigError, train

    try:
        result = train(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, FloatingPointError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    if jax.process_index() == 0:
        m = result.last_metrics
        summary = ", ".join(f"{k}={m[k]:.4g}" for k in ("loss", "eval_loss", "eval_perplexity", "tokens_per_s")
                            if m.get(k) is not None)
        print(f"done: step {result.final_step}; {summary}")


if __name__ == "__main__":
    app.run(main)
