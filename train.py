"""Train a Qwen2.5-Coder model: continued pretraining (next-token + FIM, file- then repo-level), SFT or DPO.

    python train.py --config=configs/tiny.py --workdir=runs/tiny                 # CPU demo on the stdlib corpus
    python train.py --config=configs/32b.py:repo --workdir=gs://bucket/run      # every host of a TPU pod slice
    python train.py --config=configs/1.5b.py:sft --config.init_from=/ckpt/hf --config.steps=500

Any config field can be set with --config.FIELD=VALUE (see configs/base.py for every field and its meaning).
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


def main(argv):
    del argv
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
