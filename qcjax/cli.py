"""What every command line shares: the one-line error, the platform's start-up, the `--mesh` flag and the default
serving mesh. The commands (train.py, infer.py, `python -m qcjax.serve | eval | prefs | convert`) keep only their
own flags and work; they import from here, and nothing in the library imports a command.

    from qcjax import cli

    def main(argv=None) -> int:
        a = build_parser().parse_args(argv)
        cli.start(a.dtype)                     # before JAX starts
        return cli.guarded("infer.py", lambda: run(a), debug=a.debug)
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

MESH_EXAMPLE = "e.g. 'tensor=8' or 'data=2,tensor=4'"


class UsageError(ValueError):
    """Bad flags or input: the command prints `PROG: error: MESSAGE` (one line) and exits with status 2."""


def start(dtype: str | None = None, *, cpu_only: bool = False) -> None:
    """The platform's start-up, before JAX starts: libtpu's and absl's notes off (Orbax's read-only / restore notices
    are not for stderr), XLA's flags for `dtype` (qcjax.platform; a no-op once JAX has started, e.g. under tests).
    cpu_only: compile-only runs that must not grab a TPU."""
    from absl import logging as absl_logging

    from qcjax import platform

    platform.quiet_libtpu(cpu_only=cpu_only)
    absl_logging.set_verbosity(absl_logging.ERROR)
    if dtype is not None:
        platform.configure_xla(dtype)


def parse_mesh(text: str) -> dict[str, int]:
    """'fsdp=4,tensor=2' -> {"fsdp": 4, "tensor": 2} (an argparse `type=`: a bad text is argparse's one-line error)."""
    try:
        shape = {k.strip(): int(v) for k, v in (kv.split("=") for kv in text.split(",") if kv.strip())}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a mesh ({MESH_EXAMPLE})") from None
    if not shape or any(n < 1 for n in shape.values()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a mesh ({MESH_EXAMPLE})")
    return shape


def mesh(text: str | None, flag: str = "--mesh"):
    """The jax Mesh a `--mesh` text names (None for None); a bad text or shape is a UsageError naming the flag."""
    if text is None:
        return None
    from qcjax.sharding import make_mesh

    try:
        return make_mesh(parse_mesh(text))
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise UsageError(f"{flag} {text!r}: {e}") from None


def serving_mesh(config: Callable[[], Any], batch: int):
    """The default mesh for sampling when no --mesh is given: over every accelerator of the host by the model's
    shape and `batch` (qcjax.sharding.serving_mesh_shape); None on one device or the CPU. Returns (mesh, shape)."""
    import jax

    if jax.device_count() == 1 or jax.default_backend() == "cpu":
        return None, None
    from qcjax.sharding import make_mesh, serving_mesh_shape

    shape = serving_mesh_shape(config(), jax.device_count(), batch)
    return make_mesh(shape), shape


def model_flags(p: argparse.ArgumentParser, *, title: str = "model", preset: bool = False, quant: bool = True,
                mesh: bool = True):
    """The flags that say which model a sampling command runs, declared once: --hf_dir | --ckpt (| --config, a preset
    for compile-only runs), --step, --tokenizer, --dtype, --cache_dtype, and where the command supports them --quant
    and --mesh. Returns the argument group (a command adds its own model flags to it)."""
    g = p.add_argument_group(title)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf_dir", help="Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json)")
    src.add_argument("--ckpt", help="qcjax (Orbax) checkpoint: a training run's directory (train.py's --workdir), its "
                     "checkpoints/, one step directory of it, or a converted checkpoint; the model config comes from "
                     "the checkpoint")
    if preset:
        src.add_argument("--config", help="a model preset (0.5b ... 32b, tiny), with --compile_only (no weights "
                                          "needed)")
    g.add_argument("--step", type=int, default=None, help="checkpoint step for --ckpt (default: the latest)")
    g.add_argument("--tokenizer", default=None, help="tokenizer.json / SentencePiece .model / directory / 'qwen' "
                                                     "(default: the one in the checkpoint directory)")
    g.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="param and compute dtype (default bfloat16)")
    g.add_argument("--cache_dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="KV cache dtype (default bfloat16)")
    if quant:
        from qcjax.loader import SAMPLING_QUANT  # importing JAX starts no backend: the platform set-up can follow

        g.add_argument("--quant", default="none", choices=SAMPLING_QUANT,
                       help="int8: weight-only int8 projections (one scale per output channel), quantized from the "
                            "float checkpoint as it loads; embeddings, norms, biases and the LM head stay in --dtype "
                            "(default none; docs/sampling.md)")
    if mesh:
        g.add_argument("--mesh", default=None,
                       help=f"run on a device mesh, {MESH_EXAMPLE} (default: on several TPU/GPU devices, tensor "
                            "parallel up to the model's KV heads, then data parallel over the rows; on the CPU, one "
                            "device)")
    return g


def guarded(prog: str, call: Callable[[], int], *, debug: bool = False, failures: dict | None = None,
            interrupted: str = "interrupted") -> int:
    """Run a command's body: a UsageError is `PROG: error: ...` and exit 2; an exception of a class in `failures`
    ({class: label}) is `PROG: label: ...` and exit 1; Ctrl-C is `PROG: interrupted` and exit 130. debug: re-raise
    (the traceback) instead."""
    failures = failures or {}
    try:
        return call()
    except UsageError as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except tuple(failures) as e:
        if debug:
            raise
        label = next(v for k, v in failures.items() if isinstance(e, k))
        print(f"{prog}: {label}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130


__all__ = ["UsageError", "guarded", "mesh", "model_flags", "parse_mesh", "serving_mesh", "start"]
