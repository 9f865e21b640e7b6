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



def _one_line_error(e: BaseException, what: str = "") -> None:
    """Print a bad flag or config as one line and exit 2 (--debug on the command line: the traceback instead)."""
    if "--debug" in sys.argv:
        raise e
    text = str(e.args[0]) if e.args else str(e)
    if isinstance(e, OSError) and "Failed loading config file" in text:  # ml_collections' report: its last line
        text = "cannot load the config file: " + text.strip().splitlines()[-1].strip()  # is the cause
    text = " ".join(text.replace("\\n", "\n").replace("\\'", "'").split())
    if isinstance(e, (KeyError, AttributeError)):  # ml_collections: "'name'" and maybe a "Did you mean" line
        field, _, rest = text.strip("\"'").partition("'")
        text = f"unknown field '{field}'" + (f" ({rest.strip()})" if rest.strip() else "")
    print(f"train.py: error: {what}{text} (--debug shows the traceback)", file=sys.stderr)
    sys.exit(2)


try:  # the config file and its --config.FIELD overrides load here (a misspelt field raises now)
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Training config file (optionally :stage).")
except (KeyError, AttributeError, ValueError, TypeError, OSError) as e:
    _one_line_error(e, "config: ")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Run directory: checkpoints, metrics.jsonl, tensorboard.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (TPU pods / SLURM / GKE).")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for manual multi-process runs.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes, for manual multi-process runs.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index, for manual multi-process runs.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Compile the train step for --topology and report per-chip "
                                  "memory; train nothing (needs libtpu, no TPU).")
_DEBUG = flags.DEFINE_bool("debug", False, "On an error, show the full traceback instead of the one-line message.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice for --compile_only: v5p-128, v5e-16, v6e-256, v4-32, "
                                "2xv5p-128 (two slices), v5p:4x4x8 (a chip grid).")


def compile_only(c, topology: str | None) -> int:
    """The --compile_only report; 0 fits, 1 does not fit, 2 bad flags/config or no libtpu."""
    from qcjax import tpu_compile as T
    from qcjax.train.loop import ConfigError

    if not topology:
        print("train.py: error: --compile_only needs --topology, e.g. --topology=v5p-128", file=sys.stderr)
        return 2
    from qcjax.train.config import from_config

    try:
        report = T.compile_train(from_config(c), topology)  # the config parsed and checked once, here
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
    from qcjax import platform

    platform.quiet_libtpu(cpu_only=_COMPILE_ONLY.value)  # before JAX starts
    if _COMPILE_ONLY.value:
        sys.exit(compile_only(_CONFIG.value, _TOPOLOGY.value))  # (parses the config itself: a bad one exits 2)
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
    from qcjax.data.sources import DataError
    from qcjax.train.config import from_config
    from qcjax.train.loop import ConfigError, RunError, train

    try:
        tc = from_config(_CONFIG.value)  # parsed and checked once (a misspelt field in a config file, a bad value)
        result = train(tc, _WORKDIR.value)  # everything below reads the typed TrainConfig
    except (ConfigError, RunError, DataError, FloatingPointError, OSError) as e:
        if _DEBUG.value:
            raise
        hint = " (--debug shows the traceback)" if isinstance(e, OSError) else ""
        text = " ".join(str(e).split())  # one line (some library messages span several)
        print(f"train.py: error: {type(e).__name__ + ': ' if isinstance(e, OSError) else ''}{text}{hint}",
              file=sys.stderr)
        sys.exit(2)
    if result.stopped_at is not None:
        if jax.process_index() == 0:
            print(f"stopped at step {result.stopped_at} (checkpoint saved); rerun the same command to resume",
                  file=sys.stderr)
        sys.exit(130)  # interrupted (saved): schedulers see that the run has not finished
    if jax.process_index() == 0:
        m = result.last_metrics
        keys = ("loss", "eval_loss", "eval_perplexity", "reward_mean", "pass_rate", "tokens_per_s")
        summary = ", ".join(f"{k}={m[k]:.4g}" for k in keys if m.get(k) is not None)
        print(f"done: step {result.final_step}; {summary}", file=sys.stderr)  # status, like the rest


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a bad flag or a config file that fails to load reported in one line (exit 2); --debug
    keeps the full report."""
    try:
        argv = flags.FLAGS(argv)
        _CONFIG.value.get("steps")  # a config file that failed to load (a relative path) raises on first use
        return argv
    except (KeyError, AttributeError, OSError) as e:  # an unknown --config.FIELD, a config file that is not there
        _one_line_error(e, "config: ")
    except flags.Error as e:
        if "--debug" in argv:
            raise
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        cause = next((ln for ln in reversed(lines) if ln.startswith(("ValueError", "KeyError", "AttributeError",
                                                                      "TypeError", "FileNotFoundError", "[Errno"))),
                     lines[-1] if lines else str(e))
        head = lines[0] if lines and lines[0] != cause else ""
        print(f"train.py: error: {head + ' ' if head else ''}{cause} (--debug shows the traceback)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
