"""Completions for benchmark problems from the inference engine (qcjax.inference.generate).

    model = load(args, UsageError, log)                      # weights + tokenizer, as infer.py loads them
    prompts = [make_prompt(model, p, "base") for p in problems]
    texts = complete(model, [pr.ids for pr in prompts], n=10, a=args, stop_strings=stop_strings("humaneval", "base"))

Every problem x n samples goes to the engine at once, --batch_size of them in flight (continuous batching: a finished
row's place is taken at once); a problem's n samples are submitted together and share its prompt's KV pages (the
prefix cache). Each sample has its own seed, derived from --seed, the task id and the sample index: a sample does not
depend on which rows ran beside it.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, Sequence

from qcjax.eval.problems import Problem, base_prompt, instruct_message

# Stop strings of Qwen2.5-Coder's own EvalPlus scripts (QwenLM/Qwen2.5-Coder, qwencoder-eval/base/benchmarks/evalplus/
# model.py: EOS, extra_eos_for_direct_completion(dataset), and the "\n```\n", "```" that GeneralVllmDecoder adds).
# The completion is cut at the earliest one and tabs become four spaces, as codegen() there does.
QWEN_EOS = ("<|endoftext|>", "<|endofmask|>", "</s>", "\nif __name__", "\ndef main(", "\nprint(")
QWEN_DIRECT_EOS = {"humaneval": ("\ndef ", "\nclass ", "\nimport ", "\nfrom ", "\nassert "),
                   "mbpp": ('\n"""', "\nassert")}
QWEN_FENCE_EOS = ("\n```\n", "```")


def stop_strings(benchmark: str, mode: str = "base") -> list[str]:
    """The stop strings for `benchmark` ("humaneval" / "mbpp"); chat answers (instruct) stop only at the
    end-of-turn tokens and the base set (the code is extracted from the fenced block afterwards)."""
    if mode == "instruct":
        return list(QWEN_EOS)
    return list(QWEN_EOS) + list(QWEN_DIRECT_EOS[benchmark]) + list(QWEN_FENCE_EOS)


def truncate(text: str, stops: Sequence[str], tabs: bool = True) -> str:
    """Cut at the earliest stop string; tabs to four spaces (Qwen's post-processing; tabs=False keeps them)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut].replace("\t", "    ") if tabs else text[:cut]


@dataclasses.dataclass
class Model:
    cfg: Any
    params: Any  # ready for qcjax.inference.generate
    tok: Any
    cache_dtype: Any
    stop_ids: list[int]
    speculative: Any = None  # qcjax.inference.Speculation (--speculative), or None


@dataclasses.dataclass
class Prompt:
    text: str
    ids: list[int]


def _tokenizer_source(a) -> str:
    """--tokenizer, else the model directory, else (a checkpoint) qcjax.loader.checkpoint_tokenizer (as infer.py)."""
    from qcjax.loader import checkpoint_tokenizer

    return a.tokenizer or (a.ckpt and checkpoint_tokenizer(a.ckpt, a.step)) or a.hf_dir or a.ckpt


def load(a, usage_error, log) -> Model:
    """Weights (qcjax.load: an HF directory or a qcjax checkpoint) and tokenizer (qcjax.tokenizer.load_tokenizer);
    bad paths raise usage_error(one line naming the flag)."""
    import time

    import jax.numpy as jnp

    import qcjax
    from qcjax.tokenizer import load_tokenizer

    from qcjax import paths

    from qcjax.loader import resolve_checkpoint

    if a.ckpt:  # the run directory, its checkpoints/ or one step of it
        try:
            a.ckpt, a.step = resolve_checkpoint(a.ckpt, a.step)
        except ValueError as e:
            raise usage_error(f"--ckpt: {e}") from e
    flag, src = ("--hf_dir", a.hf_dir) if a.hf_dir else ("--ckpt", a.ckpt)
    if not paths.isdir(src):
        raise usage_error(f"{flag} {src}: not a directory")
    try:
        tok = load_tokenizer(_tokenizer_source(a))
    except (OSError, ValueError) as e:
        raise usage_error(f"tokenizer: {e}" + ("" if a.tokenizer else " (pass --tokenizer PATH)")) from e
    t = time.perf_counter()
    try:
        cfg, params = qcjax.load(src, dtype=a.dtype, step=None if a.hf_dir else a.step)
    except (OSError, ValueError, KeyError) as e:
        raise usage_error(f"{flag} {src}: cannot load the model: {e}") from e
    cfg = cfg.replace(param_dtype=a.dtype, dtype=a.dtype)
    if tok.vocab_size > cfg.vocab_size:
        raise usage_error(f"tokenizer {tok.path} has {tok.vocab_size} ids but the model only {cfg.vocab_size} "
                          "embedding rows: wrong tokenizer for this model")
    if not a.quiet:
        print(f"loaded {src} ({cfg.num_layers} layers, hidden {cfg.hidden_size}, {a.dtype}) in "
              f"{time.perf_counter() - t:.1f} s", file=log)
    spec = None
    if getattr(a, "speculative", "off") != "off":
        from qcjax.inference.flags import speculation

        def load_draft(path):
            dcfg, dparams = qcjax.load(path, dtype=a.dtype)
            return dcfg.replace(param_dtype=a.dtype, dtype=a.dtype), dparams

        spec = speculation(a, tok, load_draft, usage_error)
    return Model(cfg, params, tok, jnp.dtype(a.cache_dtype), sorted(tok.fim_stop_ids), spec)


def make_prompt(model: Model, p: Problem, mode: str = "base") -> Prompt:
    """base: the Qwen report's `task["prompt"].strip() + "\\n"` as plain text; instruct: one ChatML user turn
    asking for the function, ending with the assistant header (qcjax.prompts.chat_prompt)."""
    if mode == "instruct":
        from qcjax import prompts as P

        msg = instruct_message(p)
        return Prompt(msg, P.encode(model.tok, P.chat_prompt(msg)))
    text = base_prompt(p)
    return Prompt(text, model.tok.encode(text))


def sample_seed(seed: int, task_id: str, j: int) -> int:
    return zlib.crc32(f"{seed}\0{task_id}\0{j}".encode()) & 0xFFFFFFFF


def complete(model: Model, prompts: Sequence[Sequence[int]], n: int, a, stop_strings: Sequence[str],
             task_ids: Sequence[str] | None = None, progress=None,
             is_done: Callable[[int, str], bool] | None = None, tabs: bool = True) -> list[list[str]]:
    """n completions for each prompt (text cut at the stop strings), as [prompt][sample]. a: temperature, top_p,
    max_new_tokens, batch_size, seed. Rows stop early once their text holds a stop string or is_done(prompt index,
    text so far) says more text cannot matter. tabs: replace tabs by four spaces (Qwen's EvalPlus scripts)."""
    from qcjax.inference import GREEDY, SamplingParams, generate

    ctx = model.cfg.max_position_embeddings
    task_ids = list(task_ids) if task_ids is not None else [str(i) for i in range(len(prompts))]
    for i, ids in enumerate(prompts):
        if len(ids) + 1 > ctx:
            raise ValueError(f"{task_ids[i]}: the prompt is {len(ids)} tokens, the model's context {ctx}")
    sampling = SamplingParams(temperature=a.temperature, top_p=a.top_p) if a.temperature > 0 else GREEDY
    rows = [(i, j) for i in range(len(prompts)) for j in range(n)]  # a prompt's samples together: they share pages
    out: list[list[str]] = [[""] * n for _ in prompts]
    if progress is not None:
        progress.total(len(rows))
    ids = [list(prompts[i]) for i, _ in rows]
    max_new = [max(1, min(a.max_new_tokens, ctx - len(x))) for x in ids]
    got: list[list[int]] = [[] for _ in rows]

    def on_chunk(new):
        done = []
        for k, toks in enumerate(new):
            if not toks:
                continue
            got[k] += toks
            text = model.tok.decode(got[k])
            if any(s in text for s in stop_strings) or (is_done is not None and is_done(rows[k][0], text)):
                done.append(k)
        return done

    def on_finish(k, c):
        i, j = rows[k]
        out[i][j] = truncate(model.tok.decode(c.tokens), stop_strings, tabs)
        if progress is not None:
            progress.step(n=1)

    generate(model.cfg, model.params, ids, max_new_tokens=max_new, sampling=sampling, stop_tokens=model.stop_ids,
             seed=[sample_seed(a.seed, task_ids[i], j) for i, j in rows], cache_dtype=model.cache_dtype,
             on_chunk=on_chunk if stop_strings or is_done is not None else None, on_finish=on_finish,
             max_rows=max(1, int(a.batch_size)), speculative=model.speculative)
    return out
