#!/usr/bin/env python
"""Generate code with a Qwen2.5-Coder checkpoint: completion, fill-in-the-middle, repository context, chat, batches.

    python infer.py --hf_dir Qwen2.5-Coder-0.5B --prompt "def quicksort(xs):"
    python infer.py --hf_dir DIR --prefix "def add(a, b):\\n    " --suffix "\\n\\nprint(add(1, 2))"
    python infer.py --hf_dir DIR --file src/app.py --cursor 42:9 --repo .          # FIM at a cursor, repo context
    python infer.py --hf_dir Qwen2.5-Coder-0.5B-Instruct --chat --prompt "Write a bubble sort in Python"
    python infer.py --ckpt runs/sft --prompts_jsonl in.jsonl --out out.jsonl        # a training run's newest step
    python infer.py --config 32b --compile_only --topology v5p-8 --batch 8 --context 32768   # fits? (no TPU)

stdout carries only the generated text (streamed as it is produced) or, with --prompts_jsonl, one JSON object per
prompt; logs go to stderr. Bad input is an error naming the flag, with exit status 2.
"""
from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
import time

from qcjax import cli
from qcjax.cli import UsageError
from qcjax.inference.flags import add_flags, speculation


JSONL_FIELDS = {"id", "prompt", "prefix", "suffix", "chat", "messages", "system", "max_new_tokens", "temperature",
                "top_k", "top_p", "min_p", "seed", "stop"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infer.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""input modes (pick one):
  --prompt / --prompt_file   raw text; control tokens written in it (e.g. <|fim_prefix|>) are parsed
  --prefix ... --suffix ...  fill in the middle: <|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>
  --file F --cursor L:C      fill in the middle of a file at a cursor (1-based line and column); with
                             --repo DIR the repository's other files come first, in the repo-level format
  --prompts_jsonl IN         one JSON object per line: {"prompt"} | {"prefix","suffix"} | {"chat"} |
                             {"messages": [{"role","content"}]}, optional "id", "system", "max_new_tokens",
                             "temperature", "top_k", "top_p", "min_p", "seed", "stop" (a list); output lines
                             {"index","id","completion","finish_reason","prompt_tokens","completion_tokens"}

Generation stops at Qwen's FIM/chat stop tokens (<|endoftext|> <|fim_prefix|> <|fim_middle|> <|fim_suffix|>
<|fim_pad|> <|repo_name|> <|file_sep|> <|im_end|>), at any --stop, or after --max_new_tokens.""")
    cli.model_flags(p, preset=True)

    inp = p.add_argument_group("input")
    inp.add_argument("--prompt", help="prompt text (backslash escapes such as \\n are not interpreted)")
    inp.add_argument("--prompt_file", help="read the prompt from this file ('-': stdin)")
    inp.add_argument("--prefix", help="FIM: the text before the hole")
    inp.add_argument("--suffix", help="FIM: the text after the hole")
    inp.add_argument("--file", help="FIM in this file at --cursor")
    inp.add_argument("--cursor", help="LINE:COL of the hole in --file (1-based; COL may be one past the line end)")
    inp.add_argument("--repo", help="repository directory whose other files precede --file (repo-level format)")
    inp.add_argument("--chat", action="store_true", help="wrap the prompt in ChatML (instruct checkpoints)")
    inp.add_argument("--system", default=None, help="system message for --chat (default: Qwen's default)")
    inp.add_argument("--prompts_jsonl", help="run a batch: one JSON object per line (see below)")
    inp.add_argument("--out", default="-", help="where --prompts_jsonl results go (default '-': stdout)")
    inp.add_argument("--batch_size", "--batch", type=int, default=8,
                     help="prompts per batch with --prompts_jsonl; rows compiled with --compile_only (default 8)")

    gen = p.add_argument_group("generation")
    gen.add_argument("--max_new_tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    gen.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    gen.add_argument("--top_p", type=float, default=1.0, help="keep the smallest set with this mass (1 = off)")
    gen.add_argument("--min_p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (batch row i uses seed + i unless given)")
    gen.add_argument("--stop", action="append", default=[],
                     help="extra stop: a control-token name (e.g. '<|im_end|>') or a string; backslash escapes "
                          "are interpreted (--stop '\\n\\n'); repeatable")
    gen.add_argument("--max_context", "--context", type=int, default=None,
                     help="context length limit (default: the model's max_position_embeddings); with "
                          "--compile_only, the tokens per row compiled for (prompt + --max_new_tokens)")
    gen.add_argument("--truncate_left", action="store_true",
                     help="drop the oldest prompt tokens when prompt + --max_new_tokens exceed the context "
                          "(default: an error)")
    gen.add_argument("--chunk", type=int, default=16,
                     help="decode steps per device call: between calls the host streams new text and checks stops "
                          "(default 16)")
    gen.add_argument("--prefill_chunk", type=int, default=None,
                     help="prompts longer than this many tokens prefill in chunks of it, each attending to the cache "
                          "so far (bounded activation memory for 32K-128K prompts); a power of two "
                          "(default 512)")
    gen.add_argument("--quiet", action="store_true", help="no progress on stderr")

    add_flags(p)

    aot = p.add_argument_group("compile only (no TPU needed; libtpu)")
    aot.add_argument("--compile_only", action="store_true",
                     help="compile prefill and decode for --topology and report per-chip memory; generate nothing "
                          "(exit status 1 when they do not fit)")
    aot.add_argument("--topology", help="TPU slice: v5p-8, v5e-4, v6e-8, v4-8, 2xv5p-128, v5p:4x4x8")
    aot.add_argument("--lora_slots", type=int, default=0,
                     help="also hold a bank of this many LoRA adapters (all seven projections) that rows pick per "
                          "request, as `python -m qcjax.serve --max_loras N` does (default 0: none)")
    aot.add_argument("--lora_rank", type=int, default=16, help="the bank's adapter rank (default 16)")
    aot.add_argument("--yarn", action="store_true",
                     help="with --config: the preset with Qwen's 128K YaRN scaling (factor 4 over 32K), as the "
                          "released config.json's rope_scaling sets it for long context")
    return p


# ---- inputs -> prompts (no model needed: bad input fails fast) ------------------------------------------------------
def _check_mode(a: argparse.Namespace) -> str:
    modes = {"prompt": a.prompt is not None, "prompt_file": a.prompt_file is not None,
             "fim": a.prefix is not None or a.suffix is not None, "file": a.file is not None,
             "jsonl": a.prompts_jsonl is not None}
    on = [k for k, v in modes.items() if v]
    if len(on) != 1:
        raise UsageError("give exactly one input: --prompt, --prompt_file, --prefix/--suffix, --file --cursor or "
                         f"--prompts_jsonl (got {', '.join('--' + k for k in on) or 'none'})")
    mode = on[0]
    if mode == "fim" and (a.prefix is None or a.suffix is None):
        raise UsageError("--prefix and --suffix go together (use '' for an empty one)")
    if (a.cursor is not None) != (mode == "file"):
        raise UsageError("--file needs --cursor LINE:COL, and --cursor needs --file")
    if a.repo is not None and mode != "file":
        raise UsageError("--repo needs --file/--cursor (the repository's other files precede that file)")
    if a.chat and mode not in ("prompt", "prompt_file"):
        raise UsageError("--chat wraps --prompt / --prompt_file (use 'chat' or 'messages' fields in --prompts_jsonl)")
    if a.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens={a.max_new_tokens}: must be >= 1")
    if a.batch_size < 1:
        raise UsageError(f"--batch_size={a.batch_size}: must be >= 1")
    if a.chunk < 1:
        raise UsageError(f"--chunk={a.chunk}: must be >= 1")
    return mode


def _sampling(temperature, top_k, top_p, min_p, where: str = "--"):
    from qcjax.sampling import SamplingParams

    try:
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    except ValueError as e:
        raise UsageError(f"{where}{e}") from None


def _stops(tok, values) -> tuple[set[int], list[str]]:
    """--stop values -> (extra stop ids, stop strings): a value that is one control token stops on its id."""
    ids, strings = set(), []
    for v in values:
        v = codecs.decode(v, "unicode_escape") if "\\" in v else v
        tid = tok.special_ids.get(v)
        if tid is not None:
            ids.add(tid)
        elif v:
            strings.append(v)
        else:
            raise UsageError("--stop '': an empty stop string would stop immediately")
    return ids, strings


def _request(tok, a, mode, log) -> dict:
    """The single prompt of a non-batch run: {"ids", "strings"}."""
    from qcjax import prompts as P

    for flag in ("prompt", "prefix", "suffix", "system"):  # the shell passes bytes; undecodable ones arrive escaped
        value = getattr(a, flag, None)
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise UsageError(f"--{flag} is not valid UTF-8 text (check the terminal's or the file's "
                                 "encoding)") from None

    if mode in ("prompt", "prompt_file"):
        if mode == "prompt":
            text = a.prompt
        else:
            try:
                text = sys.stdin.read() if a.prompt_file == "-" else open(a.prompt_file, encoding="utf-8").read()
            except (OSError, UnicodeDecodeError) as e:
                raise UsageError(f"--prompt_file {a.prompt_file}: {e}") from None
        if not text:
            raise UsageError(f"--{mode} is empty: give some text to continue")
        if a.chat:
            return {"ids": P.encode(tok, P.chat_prompt(text, a.system if a.system is not None else P.DEFAULT_SYSTEM))}
        return {"ids": tok.encode_with_special(text)}
    if mode == "fim":
        if not a.prefix and not a.suffix:
            raise UsageError("--prefix and --suffix are both empty: nothing to infill around")
        return {"ids": P.encode(tok, P.fim_prompt(a.prefix, a.suffix))}
    # --file --cursor [--repo]
    try:
        content = open(a.file, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--file {a.file}: {e}") from None
    try:
        prefix, suffix = P.split_at_cursor(content, a.cursor, where=a.file)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if a.repo is None:
        return {"ids": P.encode(tok, P.fim_prompt(prefix, suffix))}
    name, files = P.read_repo(a.repo, current=a.file)
    rel = os.path.relpath(os.path.realpath(a.file), os.path.realpath(a.repo)).replace(os.sep, "/")
    if rel.startswith(".."):
        rel = os.path.basename(a.file)
    base = len(P.encode(tok, P.repo_prompt(name, [], rel, prefix, suffix)))
    budget = max(0, a.context - a.max_new_tokens - base)
    files = P.fit_repo_files(tok, files, budget, log=log)
    return {"ids": P.encode(tok, P.repo_prompt(name, files, rel, prefix, suffix))}


def _jsonl_requests(tok, a) -> list[dict]:
    from qcjax import prompts as P

    try:
        lines = open(a.prompts_jsonl, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--prompts_jsonl {a.prompts_jsonl}: {e}") from None
    reqs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{a.prompts_jsonl} line {n}: "
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}not JSON ({e})") from None
        if not isinstance(d, dict):
            raise UsageError(f"{where}expected a JSON object")
        unknown = sorted(set(d) - JSONL_FIELDS)
        if unknown:
            raise UsageError(f"{where}unknown field(s) {unknown}; known: {sorted(JSONL_FIELDS)}")
        kinds = [k for k in ("prompt", "chat", "messages") if k in d] + (["prefix/suffix"] if "prefix" in d or
                                                                         "suffix" in d else [])
        if len(kinds) != 1:
            raise UsageError(f"{where}give exactly one of 'prompt', 'prefix'+'suffix', 'chat', 'messages'")
        try:
            if "prompt" in d:
                if not isinstance(d["prompt"], str) or not d["prompt"]:
                    raise UsageError("'prompt' must be a non-empty string")
                ids = tok.encode_with_special(d["prompt"])
            elif "chat" in d or "messages" in d:
                if "messages" in d and not isinstance(d["messages"], list):
                    raise UsageError("'messages' must be a list of {'role', 'content'} objects ('chat' also takes "
                                     "a string)")
                system = d.get("system", P.DEFAULT_SYSTEM)
                if system is not None and not isinstance(system, str):
                    raise UsageError("'system' must be a string or null")
                ids = P.encode(tok, P.chat_prompt(d.get("chat", d.get("messages")), system))
            else:
                pre, suf = d.get("prefix"), d.get("suffix")
                if not isinstance(pre, str) or not isinstance(suf, str):
                    raise UsageError("'prefix' and 'suffix' must both be strings")
                ids = P.encode(tok, P.fim_prompt(pre, suf))
            stop = d.get("stop", [])
            if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
                raise UsageError("'stop' must be a list of strings")
            extra_ids, strings = _stops(tok, a.stop + stop)
            max_new = d.get("max_new_tokens", a.max_new_tokens)
            if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
                raise UsageError(f"max_new_tokens={max_new!r}: must be an integer >= 1")
            sp = _sampling(d.get("temperature", a.temperature), d.get("top_k", a.top_k), d.get("top_p", a.top_p),
                           d.get("min_p", a.min_p), where="")
            seed = d.get("seed", a.seed + len(reqs))
            if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
                raise UsageError(f"seed={seed!r}: must be an integer in [0, 2**32)")
        except ValueError as e:
            raise UsageError(f"{where}{e}") from None
        reqs.append({"ids": ids, "id": d.get("id"), "max_new": max_new, "sampling": sp, "seed": seed,
                     "extra_ids": extra_ids, "strings": strings, "line": n})
    if not reqs:
        raise UsageError(f"--prompts_jsonl {a.prompts_jsonl}: no prompts")
    return reqs


def _fit_context(req: dict, a, log) -> None:
    """Prompt + max_new_tokens must fit the context: an error, or with --truncate_left the oldest tokens go."""
    where = f"{a.prompts_jsonl} line {req['line']}: " if "line" in req else ""
    room = a.context - req["max_new"]
    if room < 1:
        raise UsageError(f"{where}max_new_tokens={req['max_new']} leaves no room for a prompt in the context of "
                         f"{a.context} tokens")
    n = len(req["ids"])
    if n == 0:
        raise UsageError(f"{where}the prompt encodes to no tokens")
    if n > room:
        if not a.truncate_left:
            raise UsageError(
                f"{where}the prompt is {n} tokens; with --max_new_tokens={req['max_new']} it needs {n + req['max_new']}"
                f" > the context of {a.context} tokens. Shorten it, lower --max_new_tokens, or pass --truncate_left")
        req["ids"] = req["ids"][n - room:]
        print(f"{where}prompt truncated on the left: {n} -> {room} tokens", file=log)


# ---- model ----------------------------------------------------------------------------------------------------------
def _tokenizer(a):
    from qcjax import paths
    from qcjax.loader import checkpoint_tokenizer
    from qcjax.tokenizer import load_tokenizer

    src = a.hf_dir or a.ckpt
    if not paths.isdir(src):
        raise UsageError(f"--{'hf_dir' if a.hf_dir else 'ckpt'} {src}: not a directory")
    try:
        return load_tokenizer(a.tokenizer or (a.ckpt and checkpoint_tokenizer(a.ckpt, a.step)) or src)
    except (OSError, ValueError) as e:
        raise UsageError(f"tokenizer: {e}" + ("" if a.tokenizer else " (pass --tokenizer PATH)")) from None


def _resolve_ckpt(a: argparse.Namespace) -> None:
    """--ckpt may name the run directory, its checkpoints/ or one step directory (qcjax.loader.resolve_checkpoint)."""
    if not a.ckpt:
        return
    from qcjax.loader import resolve_checkpoint

    try:
        a.ckpt, a.step = resolve_checkpoint(a.ckpt, a.step)
    except ValueError as e:
        raise UsageError(f"--ckpt: {e}") from None


def _load_model(a, mesh, log):
    import qcjax

    t = time.perf_counter()
    try:
        cfg, params = qcjax.load(a.hf_dir or a.ckpt, mesh=mesh, dtype=a.dtype, step=None if a.hf_dir else a.step,
                                 quant=a.quant)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"cannot load the model from {a.hf_dir or a.ckpt}: {e}") from None
    cfg = cfg.replace(param_dtype=a.dtype, dtype=a.dtype)
    if not a.quiet:
        quant = "" if a.quant == "none" else f", {a.quant} projections"
        print(f"loaded {a.hf_dir or a.ckpt} ({cfg.num_layers} layers, hidden {cfg.hidden_size}, {a.dtype}{quant}) "
              f"in {time.perf_counter() - t:.1f} s", file=log)
        if a.quant != "none":
            from qcjax import adapters

            print(adapters.describe(cfg, params), file=log)
    return cfg, params


# ---- compile only ---------------------------------------------------------------------------------------------------
def _model_config(a):
    """The model config alone (no weights): a preset, an HF config.json, or a qcjax checkpoint's config."""
    from qcjax.config import get_config
    from qcjax.loader import load_config

    try:
        if a.config:
            return get_config(a.config)
        return load_config(a.hf_dir or a.ckpt, None if a.hf_dir else a.step)
    except (OSError, ValueError, KeyError) as e:
        flag = "--config" if a.config else "--hf_dir" if a.hf_dir else "--ckpt"
        raise UsageError(f"{flag} {a.config or a.hf_dir or a.ckpt}: {e}") from None


def _prefill_chunk(a: argparse.Namespace) -> int:
    from qcjax.inference.engine import DEFAULT_PREFILL_CHUNK, MIN_PREFILL_BUCKET

    chunk = DEFAULT_PREFILL_CHUNK if a.prefill_chunk is None else a.prefill_chunk
    if chunk < MIN_PREFILL_BUCKET or chunk & (chunk - 1):
        raise UsageError(f"--prefill_chunk={chunk}: must be a power of two >= {MIN_PREFILL_BUCKET}")
    return chunk


def compile_only(a: argparse.Namespace, out=None) -> int:
    """Compile prefill and decode for a TPU slice and print the memory report; 0 fits, 1 does not."""
    from qcjax import tpu_compile as T

    out = out or sys.stdout
    if not a.topology:
        raise UsageError("--compile_only needs --topology, e.g. --topology v5p-8")
    cfg = _model_config(a)
    if a.yarn:
        if not a.config:
            raise UsageError("--yarn goes with --config (a preset); an HF directory's config.json says its own "
                             "rope_scaling")
        cfg = cfg.with_yarn()
    cfg = cfg.replace(param_dtype=a.dtype, dtype=a.dtype)
    context = a.max_context or cfg.max_position_embeddings
    if a.lora_slots < 0 or a.lora_rank < 1:
        raise UsageError(f"--lora_slots={a.lora_slots} / --lora_rank={a.lora_rank}: must be >= 0 / >= 1")
    try:
        mesh = cli.parse_mesh(a.mesh) if a.mesh is not None else None
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"--mesh: {e}") from None
    try:
        report = T.compile_sampler(cfg, a.topology, batch=a.batch_size, context=context,
                                   max_new_tokens=a.max_new_tokens, mesh_shape=mesh, cache_dtype=a.cache_dtype,
                                   prefill_chunk=_prefill_chunk(a), decode_steps=max(1, a.chunk),
                                   sampling=_sampling(a.temperature, a.top_k, a.top_p, a.min_p),
                                   lora_slots=a.lora_slots, lora_rank=a.lora_rank)
    except (T.TopologyError, T.CompileUnavailable, ValueError) as e:
        raise UsageError(str(e)) from None
    print(report.format(), file=out)
    if not report.fits:
        print(f"infer.py: error: prefill/decode do not fit in the HBM of {a.topology}: lower --batch or --context, "
              "use --mesh to shard differently, or a larger slice", file=sys.stderr)
        return 1
    return 0


# ---- running --------------------------------------------------------------------------------------------------------
def run(a: argparse.Namespace, out=None, log=None) -> int:
    out = out or sys.stdout
    log = log or sys.stderr
    _resolve_ckpt(a)
    if a.compile_only:
        return compile_only(a, out)
    if a.config:
        raise UsageError("--config (a preset: random weights) only goes with --compile_only; give --hf_dir or --ckpt")
    mode = _check_mode(a)
    sampling = _sampling(a.temperature, a.top_k, a.top_p, a.min_p)
    from qcjax import paths
    from qcjax.config import ModelConfig
    from qcjax.inference import generate
    from qcjax.inference.programs import place_params
    from qcjax.text_stream import TextStream

    src = a.hf_dir or a.ckpt
    if not paths.isdir(src):
        raise UsageError(f"--{'hf_dir' if a.hf_dir else 'ckpt'} {src}: not a directory")
    if a.hf_dir:  # the model first: a wrong directory is named as such, not as a missing tokenizer
        try:
            ctx = ModelConfig.from_hf_json(a.hf_dir).max_position_embeddings
        except ValueError as e:
            raise UsageError(f"--hf_dir {a.hf_dir}: {e}") from None
    else:
        from qcjax.checkpoint import read_config

        try:
            ctx = read_config(a.ckpt, a.step)[0].max_position_embeddings
        except (OSError, ValueError, KeyError) as e:
            raise UsageError(f"--ckpt {a.ckpt}: {e} (pass a training run's directory, its checkpoints/, one step "
                             "directory of it, or a converted checkpoint; an HF directory goes to --hf_dir)") from None
    tok = _tokenizer(a)
    import jax.numpy as jnp

    if a.max_context is not None and a.max_context < 2:
        raise UsageError(f"--max_context={a.max_context}: must be >= 2")
    a.context = min(ctx, a.max_context) if a.max_context else ctx

    default_stops = set(tok.fim_stop_ids)
    if mode == "jsonl":
        reqs = _jsonl_requests(tok, a)
    else:
        extra_ids, strings = _stops(tok, a.stop)
        req = _request(tok, a, mode, log)
        req.update(max_new=a.max_new_tokens, sampling=sampling, seed=a.seed, extra_ids=extra_ids, strings=strings)
        reqs = [req]
    for r in reqs:
        _fit_context(r, a, log)
        r["stop_ids"] = sorted(default_stops | r["extra_ids"])

    mesh = cli.mesh(a.mesh)
    if mesh is None:
        mesh, shape = cli.serving_mesh(lambda: _model_config(a), len(reqs))
        if shape and not a.quiet:
            print(f"mesh: {', '.join(f'{k}={v}' for k, v in shape.items())} over {mesh.size} devices (the "
                  "serving default; --mesh to choose)", file=log)
    cfg, params = _load_model(a, mesh, log)
    if tok.vocab_size > cfg.vocab_size:
        raise UsageError(f"tokenizer {tok.path} has {tok.vocab_size} ids but the model only {cfg.vocab_size} "
                         "embedding rows: wrong tokenizer for this checkpoint")
    params = place_params(cfg, params, mesh)
    cache_dtype = jnp.dtype(a.cache_dtype)
    prefill_chunk = _prefill_chunk(a)

    def load_draft(path):
        import qcjax

        dcfg, dparams = qcjax.load(path, mesh=mesh, dtype=a.dtype)
        return dcfg.replace(param_dtype=a.dtype, dtype=a.dtype), dparams

    spec = speculation(a, tok, load_draft, UsageError)
    stats: dict = {}

    def gen(batch: list[dict], on_chunk=None):
        try:
            return generate(cfg, params, [r["ids"] for r in batch], max_new_tokens=[r["max_new"] for r in batch],
                            sampling=[r["sampling"] for r in batch], stop_tokens=[r["stop_ids"] for r in batch],
                            seed=[r["seed"] for r in batch], cache_dtype=cache_dtype, mesh=mesh, chunk=a.chunk,
                            on_chunk=on_chunk, prefill_chunk=prefill_chunk, max_rows=a.batch_size,
                            speculative=spec, stats=stats, max_len=a.context)
        except ValueError as e:
            if spec is not None and "draft" in str(e):
                raise UsageError(str(e)) from None
            raise

    t0 = time.perf_counter()
    produced = 0
    if mode != "jsonl":
        r = reqs[0]
        ts = TextStream(tok.decode, r["stop_ids"], r["strings"])
        if not a.quiet:
            print(f"prompt: {len(r['ids'])} tokens", file=log)

        def on_chunk(new):
            piece = ts.feed(new[0])
            if piece:
                out.write(piece)
                out.flush()
            return [0] if ts.stopped else None

        [done] = gen([r], on_chunk)
        out.write(ts.flush())
        open_line = not ts.text.endswith("\n")
        if open_line and getattr(out, "isatty", lambda: False)():
            out.write("\n")
            open_line = False
        out.flush()
        produced = len(done.tokens)
    else:
        sink = out if a.out == "-" else open(a.out, "w", encoding="utf-8")
        try:
            for s in range(0, len(reqs), a.batch_size):
                batch = reqs[s: s + a.batch_size]
                streams = [TextStream(tok.decode, r["stop_ids"], r["strings"]) for r in batch]

                def on_chunk(new, streams=streams):  # stop strings need text: finish rows whose text has one
                    for ts, ids in zip(streams, new):
                        ts.feed(ids)
                    return [i for i, ts in enumerate(streams) if ts.stopped]

                with_strings = any(r["strings"] for r in batch)
                results = gen(batch, on_chunk if with_strings else None)
                for k, (r, res, ts) in enumerate(zip(batch, results, streams)):
                    if not with_strings:
                        ts.feed(res.tokens)
                    rec = {"index": s + k, "id": r["id"], "completion": ts.text,
                           "finish_reason": "stop" if (res.finish_reason == "stop" or ts.stopped) else "length",
                           "prompt_tokens": len(r["ids"]), "completion_tokens": len(res.tokens)}
                    sink.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    produced += len(res.tokens)
                sink.flush()
                if not a.quiet:
                    print(f"{min(s + a.batch_size, len(reqs))}/{len(reqs)} prompts", file=log)
        finally:
            if sink is not out:
                sink.close()
    if not a.quiet:
        dt = time.perf_counter() - t0
        if mode != "jsonl" and open_line:  # stdout is not a terminal (2>&1 | ...): the text stays as generated, and
            log.write("\n")  # the statistics still start a line of their own
        print(f"generated {produced} tokens in {dt:.1f} s ({produced / dt:.1f} tok/s, compilation included)",
              file=log)
        if spec is not None and stats.get("verify_steps"):
            print(f"speculative ({spec.method}): {stats['spec_accepted']} of {stats['spec_drafted']} draft tokens "
                  f"accepted in {stats['verify_steps']} verify steps", file=log)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    cli.start(a.dtype, cpu_only=a.compile_only)  # before JAX starts
    return cli.guarded(parser.prog, lambda: run(a))


if __name__ == "__main__":
    sys.exit(main())
