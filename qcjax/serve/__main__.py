"""Serve a Qwen2.5-Coder checkpoint over an OpenAI-compatible HTTP API: completions with fill-in-the-middle (`suffix`),
chat, streaming, continuous batching over a paged KV cache with a prefix cache (qcjax.inference).

    python -m qcjax.serve --hf_dir Qwen2.5-Coder-1.5B                    # http://127.0.0.1:8000/v1
    python -m qcjax.serve --ckpt runs/sft --max_batch 8 --max_len 4096 --api_key KEY    # a training run
    python -m qcjax.serve --hf_dir Qwen2.5-Coder-7B --speculative draft --draft_hf_dir Qwen2.5-Coder-0.5B
    python -m qcjax.serve --hf_dir Qwen2.5-Coder-7B --lora py=runs/py-lora --lora rust=peft/rust --max_loras 4

Bad flags are a one-line error naming the flag (exit status 2). The server compiles every program it needs before it
listens (warm-up), so no request waits on a compilation.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from qcjax import cli
from qcjax.cli import UsageError
from qcjax.inference.flags import add_flags, speculation

PROG = "python -m qcjax.serve"
DEFAULT_MAX_LEN = 8192  # --max_len when not given, for a model whose context is longer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""endpoints:
  POST /v1/completions       prompt (+ suffix: fill in the middle), max_tokens, temperature, top_p, n, stop, seed,
                             stream, echo
  POST /v1/chat/completions  messages (ChatML), the same sampling fields, stream
  GET  /v1/models (the base and every LoRA adapter), GET /health (rows, queue, pages, compile counts; no key needed)
  POST /v1/load_lora_adapter {"lora_name", "lora_path"}, POST /v1/unload_lora_adapter {"lora_name"}: with --max_loras
  GET  /metrics (Prometheus text: requests, queue, tokens, TTFT / inter-token latency, pages, prefix-cache hits)

Generation stops at Qwen's FIM/chat stop tokens, a request's stop strings, or max_tokens (default 16 for
completions, the rest of the context for chat). Requests beyond --max_batch running ones wait in a queue of
--max_queue, then get HTTP 429. docs/serving.md: editor set-up (FIM completion), examples.""")
    m = cli.model_flags(p, title="model (as infer.py)")
    m.add_argument("--served_model_name", default=None,
                   help="the model name clients send (default: the run directory's name for a training run's "
                        "checkpoint, else the directory's name)")

    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--api_key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $QCJAX_API_KEY if set, else none)")

    e = p.add_argument_group("engine")
    e.add_argument("--max_batch", type=int, default=16,
                   help="requests in flight at most: the largest decode batch (default 16)")
    e.add_argument("--max_len", type=int, default=None,
                   help=f"tokens per request, prompt + completion (default: the model's context, at most "
                        f"{DEFAULT_MAX_LEN}; never more than the model's context)")
    e.add_argument("--page_size", type=int, default=16, help="tokens per KV-cache page (default 16)")
    e.add_argument("--cache_tokens", type=int, default=None,
                   help="KV-cache size in tokens, shared by all requests in pages (default: max_batch x max_len)")
    e.add_argument("--no_prefix_cache", action="store_true",
                   help="do not reuse the cached pages of earlier prompts (default: reuse them)")
    e.add_argument("--max_queue", type=int, default=64,
                   help="requests that may wait for a row; more get HTTP 429 (default 64)")
    e.add_argument("--chunk", type=int, default=8,
                   help="decode steps per device call; new requests join between calls (default 8)")
    e.add_argument("--prefill_batch", type=int, default=4,
                   help="prompts prefilled together at most (a power of two; default 4)")
    e.add_argument("--prefill_tokens", type=int, default=2048,
                   help="padded prompt tokens prefilled per engine round at most, between decode chunks (default 2048)")
    e.add_argument("--prefill_chunk", type=int, default=512,
                   help="prompt tokens of one request per prefill call: longer prompts go in over several rounds, "
                        "interleaved with decoding (a power of two; default 512)")
    lo = p.add_argument_group("LoRA adapters (many on one base; a request picks one with \"model\": NAME)")
    lo.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                    help="serve an adapter under NAME: a qcjax LoRA checkpoint (a LoRA training run, any of its "
                         "names) or a PEFT adapter directory; repeat for more")
    lo.add_argument("--max_loras", type=int, default=None,
                    help="adapters resident on the device at once; more are kept in host memory and swapped in "
                         "least-recently-used (default: the number of --lora, at least 1; giving it enables "
                         "/v1/load_lora_adapter with no --lora)")
    lo.add_argument("--max_lora_rank", type=int, default=None,
                    help="the largest adapter rank the server holds (default: the largest --lora's, else 16)")
    lo.add_argument("--lora_targets", default=None,
                    help="projections adapters may target, comma-separated from q,k,v,o,gate,up,down (default: "
                         "those the --lora adapters target, else all seven)")
    e.add_argument("--log_level", default="info", choices=("debug", "info", "warning", "error"),
                   help="server log level (default info)")
    add_flags(p)
    return p


def check_args(a: argparse.Namespace) -> None:
    """Flag checks that need no model: one-line errors naming the flag."""
    from qcjax import paths

    if a.ckpt:
        from qcjax.loader import resolve_checkpoint

        try:
            a.ckpt, a.step = resolve_checkpoint(a.ckpt, a.step)
        except ValueError as e:
            raise UsageError(f"--ckpt: {e}") from None
    src = a.hf_dir or a.ckpt
    if not paths.isdir(src):
        raise UsageError(f"--{'hf_dir' if a.hf_dir else 'ckpt'} {src}: not a directory")
    if not 0 <= a.port < 65536:
        raise UsageError(f"--port={a.port}: must be in [0, 65535]")
    for flag, lo in (("max_batch", 1), ("max_len", 2), ("max_queue", 0), ("chunk", 1), ("prefill_tokens", 16),
                     ("page_size", 1), ("cache_tokens", 1)):
        if getattr(a, flag) is not None and getattr(a, flag) < lo:
            raise UsageError(f"--{flag}={getattr(a, flag)}: must be >= {lo}")
    if a.prefill_batch < 1 or a.prefill_batch & (a.prefill_batch - 1):
        raise UsageError(f"--prefill_batch={a.prefill_batch}: must be a power of two >= 1")
    if a.prefill_chunk < 16 or a.prefill_chunk & (a.prefill_chunk - 1):
        raise UsageError(f"--prefill_chunk={a.prefill_chunk}: must be a power of two >= 16")
    if a.api_key is not None and not a.api_key.strip():
        raise UsageError("--api_key is empty")
    for flag in ("max_loras", "max_lora_rank"):
        if getattr(a, flag) is not None and getattr(a, flag) < 1:
            raise UsageError(f"--{flag}={getattr(a, flag)}: must be >= 1")
    a.loras = {}  # --lora as {name: path}; --lora_targets as a list (None: not given)
    for item in a.lora:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise UsageError(f"--lora {item}: expected NAME=PATH")
        if name in a.loras:
            raise UsageError(f"--lora {item}: the name {name!r} is given twice")
        a.loras[name] = path
    if a.lora_targets is not None:
        from qcjax.config import LORA_TARGETS

        targets = [t.strip() for t in a.lora_targets.split(",") if t.strip()]
        if not targets or any(t not in LORA_TARGETS for t in targets):
            raise UsageError(f"--lora_targets={a.lora_targets}: each must be one of {','.join(LORA_TARGETS)}")
        a.lora_targets = targets


def load_tokenizer(a: argparse.Namespace):
    from qcjax.loader import checkpoint_tokenizer
    from qcjax.tokenizer import load_tokenizer as load

    try:
        return load(a.tokenizer or (a.ckpt and checkpoint_tokenizer(a.ckpt, a.step)) or a.hf_dir or a.ckpt)
    except (OSError, ValueError) as e:
        raise UsageError(f"--tokenizer: cannot load a tokenizer ({e})" + ("" if a.tokenizer else
                                                                         "; pass --tokenizer PATH")) from None


def max_len(asked: int | None, context: int) -> int:
    """--max_len: the model's context capped at DEFAULT_MAX_LEN when not given (a small model's short context, a
    large one's 32K, both serve with no flag); more than the context is an error."""
    if asked is None:
        return min(DEFAULT_MAX_LEN, context)
    if asked > context:
        raise UsageError(f"--max_len={asked}: more than the model's context of {context}")
    return asked


def served_name(a: argparse.Namespace) -> str:
    """--served_model_name, else the model's own name: the run directory of a training run's checkpoints/
    (runs/tiny/checkpoints -> tiny), else the directory's name (an HF directory, a converted checkpoint)."""
    from qcjax import paths
    from qcjax.loader import RUN_CHECKPOINTS

    if a.served_model_name:
        return a.served_model_name
    src = paths.absolute(a.hf_dir or a.ckpt).rstrip("/")
    name = paths.basename(src)
    return paths.basename(paths.dirname(src)) if name == RUN_CHECKPOINTS else name


def load_model(a: argparse.Namespace, mesh):
    import qcjax

    try:
        cfg, params = qcjax.load(a.hf_dir or a.ckpt, mesh=mesh, dtype=a.dtype, step=None if a.hf_dir else a.step,
                                 quant=a.quant)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"--{'hf_dir' if a.hf_dir else 'ckpt'}: cannot load the model from {a.hf_dir or a.ckpt}: "
                         f"{e}") from None
    return cfg.replace(param_dtype=a.dtype, dtype=a.dtype), params


def load_draft(path: str, mesh, dtype: str):
    """A draft model for --speculative draft, loaded as the target is (mesh, dtype)."""
    import qcjax

    cfg, params = qcjax.load(path, mesh=mesh, dtype=dtype)
    return cfg.replace(param_dtype=dtype, dtype=dtype), params


def lora_slots(a: argparse.Namespace, cfg, name: str, mesh, log=print):
    """The adapters of --lora (read and checked against the base) in a LoraSlots sized by --max_loras,
    --max_lora_rank and --lora_targets (as `check_args` parsed them); None when no adapter flag is given."""
    if not a.loras and a.max_loras is None:
        return None
    from qcjax.config import LORA_TARGETS
    from qcjax.inference.lora import LoraSlots, read_adapter

    read = {}
    for n, path in a.loras.items():
        if n == name:
            raise UsageError(f"--lora {n}={path}: {n!r} is the base model's name (--served_model_name)")
        try:
            read[n] = read_adapter(path, cfg)
        except ValueError as e:
            raise UsageError(f"--lora {n}: {e}") from None
    targets = a.lora_targets or ([t for t in LORA_TARGETS if any(t in ad.targets for ad in read.values())]
                                 or list(LORA_TARGETS))
    rank = a.max_lora_rank or max([ad.rank for ad in read.values()], default=16)
    slots = LoraSlots(cfg, max_loras=a.max_loras or max(1, len(read)), max_rank=rank, targets=targets, mesh=mesh)
    for n, ad in read.items():
        try:
            slots.add(n, ad)
        except ValueError as e:
            raise UsageError(f"--lora {n}: {e}") from None
        log(f"LoRA adapter {n!r}: {ad.source} (rank {ad.rank}, targets {','.join(ad.targets)})")
    from qcjax import row_lora

    size = row_lora.bank_bytes(cfg, slots.max_loras, rank, slots.targets, slots.dtype)
    log(f"LoRA: {slots.max_loras} device slots of rank {rank} over {','.join(slots.targets)} "
        f"({size / 2**20:.1f} MiB)")
    return slots


def make_mesh(a: argparse.Namespace, cfg_source):
    """--mesh, else the serving default over the host's accelerators (qcjax.cli.serving_mesh)."""
    return cli.mesh(a.mesh) or cli.serving_mesh(cfg_source, a.max_batch)[0]


def build(a: argparse.Namespace, log=print):
    """(engine, app) from parsed flags: the tokenizer, the model, the engine (warmed up and started), the app."""
    import jax.numpy as jnp

    from qcjax.config import ModelConfig
    from qcjax.serve.api import create_app
    from qcjax.inference import Engine

    check_args(a)
    tok = load_tokenizer(a)

    def cfg_only():
        if a.hf_dir:
            return ModelConfig.from_hf_json(a.hf_dir)
        from qcjax.checkpoint import read_config

        return read_config(a.ckpt, a.step)[0]

    try:
        context = cfg_only().max_position_embeddings
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"--{'hf_dir' if a.hf_dir else 'ckpt'} {a.hf_dir or a.ckpt}: {e}") from None
    a.max_len = max_len(a.max_len, context)
    mesh = make_mesh(a, cfg_only)
    t = time.perf_counter()
    cfg, params = load_model(a, mesh)
    if tok.vocab_size > cfg.vocab_size:
        raise UsageError(f"--tokenizer: {tok.vocab_size} ids but the model has {cfg.vocab_size} embedding rows "
                         "(wrong tokenizer for this checkpoint)")
    quant = "" if a.quant == "none" else f", {a.quant} projections"
    log(f"loaded {a.hf_dir or a.ckpt} ({cfg.num_layers} layers, hidden {cfg.hidden_size}, {a.dtype}{quant}) in "
        f"{time.perf_counter() - t:.1f} s")
    if a.quant != "none":
        from qcjax import adapters

        log(adapters.describe(cfg, params))
    spec = speculation(a, tok, lambda path: load_draft(path, mesh, a.dtype), UsageError)
    name = served_name(a)
    lora = lora_slots(a, cfg, name, mesh, log)
    try:
        engine = Engine(cfg, params, max_rows=a.max_batch, max_len=a.max_len, page_size=a.page_size,
                        num_pages=-(-a.cache_tokens // a.page_size) if a.cache_tokens else None,
                        prefix_cache=not a.no_prefix_cache, cache_dtype=jnp.dtype(a.cache_dtype), mesh=mesh,
                        chunk=a.chunk, max_queue=a.max_queue, prefill_batch=a.prefill_batch,
                        prefill_tokens=a.prefill_tokens, prefill_chunk=a.prefill_chunk, speculative=spec, lora=lora)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if spec is not None:
        log(f"speculative decoding: {spec.method}, up to {spec.k} draft tokens per target forward")
    log(f"KV cache: {engine.num_pages} pages of {a.page_size} tokens ({engine.num_pages * a.page_size} tokens), "
        f"prefix cache {'off' if a.no_prefix_cache else 'on'}")
    log(f"warming up: compiling every program for up to {a.max_batch} rows x {a.max_len} tokens ...")
    log(f"warm-up done in {engine.warmup():.1f} s ({engine.stats()['compiles']} compiles)")
    engine.start()
    key = a.api_key if a.api_key is not None else os.environ.get("QCJAX_API_KEY") or None
    return engine, create_app(engine, tok, name, key), name


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    cli.start(a.dtype)  # before JAX starts
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if a.log_level != "debug":  # JAX's start-up notes ("Unable to initialize backend 'tpu'") are not server news
        logging.getLogger("jax").setLevel(logging.WARNING)
    return cli.guarded(PROG, lambda: serve(a, say))


def serve(a: argparse.Namespace, say) -> int:
    engine, app, name = build(a, say)
    import uvicorn

    say(f"serving '{name}' on http://{a.host}:{a.port}/v1 (up to {a.max_batch} requests, {a.max_len} tokens each)")
    try:
        from qcjax.serve.connections import DeadlineH11Protocol

        uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, timeout_graceful_shutdown=5,
                    http=DeadlineH11Protocol)
    except KeyboardInterrupt:
        pass
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
