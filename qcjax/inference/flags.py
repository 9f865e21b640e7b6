"""The speculative-decoding flags every sampling command shares (infer.py, `python -m qcjax.serve`,
`python -m qcjax.eval`): declared once here, turned into a `Speculation` (loading the draft model) once here."""
from __future__ import annotations

import argparse
from typing import Any, Callable

from qcjax.inference.speculative import SOURCES, Speculation

DEFAULT_K = Speculation.k


def add_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding (docs/serving.md: the same text, fewer target forwards)")
    g.add_argument("--speculative", default="off", choices=("off", "ngram", "draft"),
                   help="ngram: draft by prompt lookup (the prompt, the FIM suffix, the repository's files, the text "
                        "so far); draft: a smaller model of the same family drafts (--draft_hf_dir / --draft_ckpt). "
                        "Greedy text is unchanged, samples keep the model's distribution (default off)")
    g.add_argument("--num_speculative_tokens", type=int, default=DEFAULT_K,
                   help=f"draft tokens checked per target forward at most; each request grows and shrinks its own "
                        f"draft by what is accepted (default {DEFAULT_K})")
    g.add_argument("--draft_hf_dir", default=None, help="--speculative draft: the draft model's HF directory")
    g.add_argument("--draft_ckpt", default=None, help="--speculative draft: the draft model's qcjax checkpoint")
    g.add_argument("--speculative_sources", default=",".join(SOURCES),
                   help=f"--speculative ngram: where a draft may come from, comma-separated from {','.join(SOURCES)} "
                        "(default all)")


def speculation(a: argparse.Namespace, tok: Any, load: Callable[[str], tuple[Any, Any]],
                error: Callable[[str], Exception] = ValueError) -> Speculation | None:
    """The parsed flags as a Speculation (None when off). load(path) -> (cfg, params) loads the draft model the way
    the command loads its target (mesh, dtype); tok gives the FIM / repository markers. Bad flags raise error(msg),
    one line naming the flag."""
    if a.speculative == "off":
        if a.draft_hf_dir or a.draft_ckpt:
            raise error("--draft_hf_dir / --draft_ckpt need --speculative draft")
        return None
    if not 1 <= a.num_speculative_tokens <= 31:
        raise error(f"--num_speculative_tokens={a.num_speculative_tokens}: must be in [1, 31]")
    sources = tuple(s.strip() for s in a.speculative_sources.split(",") if s.strip())
    bad = [s for s in sources if s not in SOURCES]
    if bad or not sources:
        raise error(f"--speculative_sources={a.speculative_sources!r}: choose from {','.join(SOURCES)}")
    draft = None
    if a.speculative == "draft":
        if bool(a.draft_hf_dir) == bool(a.draft_ckpt):
            raise error("--speculative draft needs exactly one of --draft_hf_dir and --draft_ckpt")
        flag, path = ("--draft_hf_dir", a.draft_hf_dir) if a.draft_hf_dir else ("--draft_ckpt", a.draft_ckpt)
        try:
            draft = load(path)
        except (OSError, ValueError, KeyError) as e:
            raise error(f"{flag}: cannot load the draft model from {path}: {e}") from None
    elif a.draft_hf_dir or a.draft_ckpt:
        raise error("--draft_hf_dir / --draft_ckpt need --speculative draft")
    return Speculation(method=a.speculative, k=a.num_speculative_tokens, sources=sources, markers=markers(tok),
                       draft=draft)


def markers(tok: Any) -> dict:
    """The FIM / repository marker ids of a tokenizer (for speculative sources)."""
    from qcjax.tokenizer import FILE_SEP, FIM_MIDDLE, FIM_SUFFIX

    ids = getattr(tok, "special_ids", {}) or {}
    return {k: ids[n] for k, n in (("fim_suffix", FIM_SUFFIX), ("fim_middle", FIM_MIDDLE), ("file_sep", FILE_SEP))
            if n in ids}
