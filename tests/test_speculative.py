"""Speculative decoding (qcjax.inference.speculative / draft, programs.verify): greedy text equals transformers and
plain decoding with prompt lookup and with a draft model, sampled tokens keep the model's distribution (chi-square
against plain sampling), stops and length limits cut an accepted run where they fall, a tensor-parallel mesh gives
the one-device tokens, and the server speculates with the official client seeing the same text."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qcjax.inference import SamplingParams, Speculation, generate, programs
from qcjax.inference.speculative import NgramProposer, RowState

from test_inference import CFG_TIED, CFG_TP, CFG_UNTIED, hf_and_params, hf_greedy, prompts_of

F32 = jnp.float32


NEW = 24
_PROMPTS = {}


def repeating_prompt(cfg, params, seed=0):
    """A random prompt, the model's own greedy continuation of it, then the prompt again: prompt lookup finds
    earlier text to draft from (random weights agree with it now and then: they repeat themselves). Every test
    here generates NEW tokens after prompts of <= 60 tokens, so they all share compiled shapes."""
    if (cfg, seed) not in _PROMPTS:
        base = prompts_of(cfg, [12], seed=seed)[0]
        cont = generate(cfg, params, [base], max_new_tokens=NEW, cache_dtype=F32)[0].tokens
        _PROMPTS[cfg, seed] = base + cont + base
    return _PROMPTS[cfg, seed]


def test_prompt_lookup_drafts_the_continuation_of_the_latest_match():
    p = NgramProposer(Speculation(k=3, min_ngram=2, max_ngram=3))
    toks = [5, 6, 7, 8, 9, 1, 5, 6, 7, 2, 3, 5, 6]
    st = RowState(k=3)
    assert p.propose(st, toks, 3) == [7, 2, 3]  # (5, 6) last seen before [7, 2, 3]
    assert p.propose(st, toks + [7], 3) == [2, 3, 5]  # (5, 6, 7): the longest n-gram, latest match
    assert p.propose(st, [1, 2, 3, 4], 3) == []
    # sources: a match only inside the FIM suffix (between the markers 90 and 91)
    only_suffix = NgramProposer(Speculation(k=2, sources=("suffix",), markers={"fim_suffix": 90, "fim_middle": 91}))
    toks = [4, 5, 6, 90, 4, 5, 8, 91, 4, 5]
    st = only_suffix.state(toks, prompt_len=8)
    assert only_suffix.propose(st, toks, 2) == [8, 91]
    everywhere = NgramProposer(Speculation(k=2, gate=False))
    assert everywhere.propose(everywhere.state(toks, 8), toks, 2) == [8, 91]
    assert everywhere.propose(everywhere.state(toks[:3] + toks[:3], 6), toks[:3] + toks[:3], 2) == [4, 5]  # (4, 5, 6) again


def test_device_lookup_drafts_what_the_host_proposer_drafts():
    """programs.speculate's prompt lookup (speculative.ngram_draft) against NgramProposer.propose, on random rows
    over a 4-token alphabet (many matches, of every n-gram length), every row length and draft limit."""
    from qcjax.inference.speculative import ngram_draft

    k, h = 5, 48
    spec = Speculation(k=k, min_ngram=2, max_ngram=4)
    lookup = jax.jit(lambda hist, n, kr: ngram_draft(hist, n, kr, k=k, min_n=2, max_n=4))
    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, 4, size=int(rng.integers(1, h))).tolist(), int(rng.integers(0, k + 1)))
             for _ in range(300)]
    hist = np.full((len(cases), h), -1, np.int32)
    for i, (toks, _) in enumerate(cases):
        hist[i, : len(toks)] = toks
    drafts, counts = lookup(jnp.asarray(hist), jnp.asarray([len(t) - 1 for t, _ in cases], jnp.int32),
                            jnp.asarray([kr for _, kr in cases], jnp.int32))
    got = [np.asarray(d)[: int(c)].tolist() for d, c in zip(drafts, counts)]
    want = [NgramProposer(spec).propose(RowState(k=k), toks, kr) for toks, kr in cases]
    assert got == want
    assert sum(map(bool, want)) > 100  # many rows draft (143 of 300 at this seed)


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fixed"])
def test_device_rounds_draft_and_adapt_as_the_host_does(adaptive):
    """Gate off, a chunk of 8 rounds per device call: the same drafts verified and accepted over the same requests
    as the host path (one verify per call): the device loop keeps each row's draft length and backoff as the host
    does (or, not adaptive, leaves them), across rounds and across calls (a row backing off one round must not skip
    a whole call)."""
    cfg, _, params = hf_and_params(CFG_TIED)
    prompts = [repeating_prompt(cfg, params, seed=s) for s in range(2, 5)]  # these back off at a call's start
    counts = []
    for device in (True, False):
        stats = {}
        generate(cfg, params, prompts, max_new_tokens=NEW, cache_dtype=F32, chunk=8, max_rows=1, stats=stats,
                 speculative=Speculation(k=7, gate=False, device=device, adaptive=adaptive))
        counts.append((stats["spec_drafted"], stats["spec_accepted"], stats["row_forwards"]))
    assert counts[0] == counts[1] and counts[0][0] > 0, counts


def test_the_device_gate_follows_the_measured_rates_and_the_text_stays(monkeypatch):
    """Rates injected (speculating calls 50x slower than plain chunks, then as fast): prompt lookup mostly runs
    plain chunks (a probe now and then), then mostly speculates; greedy text equals plain decoding every time, and
    on the host path (device=False) too."""
    from qcjax.inference.engine import Engine

    cfg, _, params = hf_and_params(CFG_TIED)
    prompt = repeating_prompt(cfg, params)
    plain = generate(cfg, params, [prompt], max_new_tokens=80, cache_dtype=F32)[0].tokens
    noted, calls = Engine._note_rate, collections.Counter()
    monkeypatch.setattr(Engine, "_speculate_call", lambda self, *a, f=Engine._speculate_call: (
        calls.update(["speculate"]), f(self, *a))[1])
    monkeypatch.setattr(Engine, "_spec_decode", lambda self, *a, f=Engine._spec_decode: (
        calls.update(["chunk"]), f(self, *a))[1])
    for slow, few_verifies in ((50.0, True), (1.0, False)):
        monkeypatch.setattr(Engine, "_note_rate", lambda self, mode, b, w, tokens, s, c0, f=slow: noted(
            self, mode, b, w, 1, f if mode == "speculate" else 1.0, c0))
        calls.clear()
        [c] = generate(cfg, params, [prompt], max_new_tokens=80, cache_dtype=F32, speculative=Speculation(k=7))
        assert c.tokens == plain
        assert (calls["chunk"] > calls["speculate"]) == few_verifies, calls
    monkeypatch.undo()
    stats = {}
    [c] = generate(cfg, params, [prompt], max_new_tokens=80, cache_dtype=F32, stats=stats,
                   speculative=Speculation(k=4, gate=False, device=False))
    assert c.tokens == plain and stats["spec_accepted"] > 0


@pytest.mark.parametrize("cfg", [CFG_TIED, CFG_UNTIED], ids=["tied", "untied"])
def test_ngram_greedy_equals_transformers_and_plain_decoding(cfg):
    cfg, model, params = hf_and_params(cfg)
    prompts = [repeating_prompt(cfg, params, seed=s) for s in range(2)] + prompts_of(cfg, [7], seed=5)
    plain = generate(cfg, params, prompts, max_new_tokens=NEW, cache_dtype=F32)
    stats = {}
    spec = generate(cfg, params, prompts, max_new_tokens=NEW, cache_dtype=F32, speculative=Speculation(k=4, gate=False),
                    stats=stats)
    assert [c.tokens for c in spec] == [c.tokens for c in plain]
    assert [c.tokens for c in spec] == [hf_greedy(model, p, NEW) for p in prompts]
    assert stats["spec_accepted"] > 0  # the accept path ran (rates on trained models: bench/speculative.py)


def test_draft_model_greedy_equals_transformers():
    cfg, model, params = hf_and_params(CFG_TIED)
    prompts = [repeating_prompt(cfg, params)] + prompts_of(cfg, [9, 3], seed=3)
    want = [hf_greedy(model, p, NEW) for p in prompts]
    # the target drafting for itself: every draft is accepted, k + 1 tokens per verify step
    stats = {}
    same = generate(cfg, params, prompts, max_new_tokens=NEW, cache_dtype=F32, stats=stats,
                    speculative=Speculation(method="draft", k=3, draft=(cfg, params), gate=False))
    assert [c.tokens for c in same] == want
    assert stats["spec_accepted"] == stats["spec_drafted"] > 0
    # a different, one-layer model of the same vocabulary: drafts mostly rejected, the text the same
    small = CFG_TIED.replace(num_layers=1)
    other = hf_and_params(small, std=0.05)[2]
    stats = {}
    got = generate(cfg, params, prompts, max_new_tokens=NEW, cache_dtype=F32, stats=stats,
                   speculative=Speculation(method="draft", k=3, draft=(small, other), gate=False))
    assert [c.tokens for c in got] == want
    assert stats["spec_drafted"] > stats["spec_accepted"]


def test_the_gate_runs_decode_chunks_where_verifying_costs_more_and_the_text_stays(monkeypatch):
    """Call times injected (a decode chunk of 8 steps: 8 s; a verify call: 50 s, then 1 s, as one decode step on an
    accelerator), drafts from the target itself (all accepted): the gate turns verifying down, then keeps it;
    greedy text equals plain decoding both times."""
    from qcjax.inference.engine import Engine

    cfg, _, params = hf_and_params(CFG_TIED)
    prompt = repeating_prompt(cfg, params)
    plain = generate(cfg, params, [prompt], max_new_tokens=80, cache_dtype=F32)[0].tokens
    timed = Engine._timed
    for verify_cost, few_verifies in ((50.0, True), (1.0, False)):  # noqa: B007
        monkeypatch.setattr(Engine, "_timed", lambda self, key, s, c0, c=verify_cost: timed(
            self, key, c if key[0] == "verify" else float(key[3]), c0))
        stats = {}
        [c] = generate(cfg, params, [prompt], max_new_tokens=80, cache_dtype=F32, stats=stats,
                       speculative=Speculation(method="draft", k=3, draft=(cfg, params)))  # every draft right
        assert c.tokens == plain
        assert (stats["decode_steps"] > 4 * stats["verify_steps"]) == few_verifies, stats


def test_a_draft_model_with_a_larger_vocabulary_is_refused():
    cfg, _, params = hf_and_params(CFG_TIED)
    big = CFG_TIED.replace(vocab_size=CFG_TIED.vocab_size + 64)
    with pytest.raises(ValueError, match="vocab_size=448 is larger than the target's 384"):
        generate(cfg, params, [[1, 2, 3]], max_new_tokens=2,
                 speculative=Speculation(method="draft", draft=(big, params)))


def test_sampling_with_speculation_keeps_the_models_distribution_and_a_seeds_text():
    """Two-sample chi-square on the tokens at generated positions 1-3 (position 0 comes from prefill), 512 seeds
    each, top-k 3 so drafts are accepted often enough to matter. Under the null a test fails with probability 0.001
    per position; the seeds are fixed, so the outcome is too. And a seed draws the same text with or without
    speculation (a draft is kept only where it equals plain decoding's draw)."""
    from scipy.stats import chi2_contingency

    cfg, _, params = hf_and_params(CFG_TIED)
    prompt = repeating_prompt(cfg, params)
    n, same = 512, 64
    sp = SamplingParams(temperature=1.0, top_k=3)
    plain = generate(cfg, params, [prompt] * n, max_new_tokens=4, sampling=sp, seed=list(range(n)),
                     cache_dtype=F32, max_rows=64)
    stats = {}
    spec = generate(cfg, params, [prompt] * (n + same), max_new_tokens=4, sampling=sp,
                    seed=list(range(n, 2 * n)) + list(range(same)), cache_dtype=F32, max_rows=64,
                    speculative=Speculation(k=3, gate=False), stats=stats)
    assert stats["spec_accepted"] > 50  # the accept path, not only the draws at rejections, is exercised
    assert [c.tokens for c in spec[n:]] == [c.tokens for c in plain[:same]]
    a, b = np.array([c.tokens for c in plain]), np.array([c.tokens for c in spec[:n]])
    for i in range(1, 4):
        cats = sorted(set(a[:, i]) | set(b[:, i]))
        table = np.array([[np.sum(x[:, i] == c) for c in cats] for x in (a, b)])
        rare = table.sum(0) < 10
        table = np.concatenate([table[:, ~rare], table[:, rare].sum(1, keepdims=True)], 1)
        table = table[:, table.sum(0) > 0]
        assert table.shape[1] >= 3, "too few outcomes for a meaningful comparison"
        assert chi2_contingency(table)[1] > 1e-3, (i, table)


def test_verify_rejects_a_draft_the_filters_exclude_and_draws_from_the_rest():
    """A draft outside top-k is never accepted and never emitted."""
    cfg, _, params = hf_and_params(CFG_TIED)
    prompt = repeating_prompt(cfg, params)
    greedy = generate(cfg, params, [prompt], max_new_tokens=NEW, cache_dtype=F32)[0].tokens
    sp = SamplingParams(temperature=1.0, top_k=1)  # top-k 1: sampling is greedy, any other draft is rejected
    got = generate(cfg, params, [prompt] * 3, max_new_tokens=NEW, sampling=sp, seed=[1, 2, 3], cache_dtype=F32,
                   speculative=Speculation(k=3, gate=False))
    assert all(c.tokens == greedy for c in got)


def test_stops_and_length_cut_an_accepted_run_where_they_fall():
    cfg, _, params = hf_and_params(CFG_TIED)
    prompt = repeating_prompt(cfg, params)
    plain = generate(cfg, params, [prompt], max_new_tokens=NEW, cache_dtype=F32)[0].tokens
    stop = plain[5]  # a token inside what drafts cover
    first = plain.index(stop)
    stats = {}
    [c] = generate(cfg, params, [prompt], max_new_tokens=NEW, cache_dtype=F32, stop_tokens=[stop],
                   speculative=Speculation(k=7, gate=False), stats=stats)
    assert (c.tokens, c.finish_reason, c.stop_token) == (plain[:first], "stop", stop)
    for n in (1, 2, 5, 9):
        [c] = generate(cfg, params, [prompt], max_new_tokens=n, cache_dtype=F32, speculative=Speculation(k=7, gate=False))
        assert (c.tokens, c.finish_reason) == (plain[:n], "length")
    # streaming: chunks concatenate to the one-shot text
    seen = []
    generate(cfg, params, [prompt], max_new_tokens=NEW, cache_dtype=F32, speculative=Speculation(k=4, gate=False),
             on_chunk=lambda new: seen.extend(new[0]))
    assert seen == plain


def test_speculation_on_a_tensor_parallel_mesh_gives_the_one_device_tokens():
    from qcjax.sharding import make_mesh

    cfg, _, params = hf_and_params(CFG_TP)
    prompts = [repeating_prompt(cfg, params, seed=2)] + prompts_of(cfg, [9], seed=6)
    one = generate(cfg, params, prompts, max_new_tokens=NEW, cache_dtype=F32)
    mesh = make_mesh({"tensor": 8})
    with jax.set_mesh(mesh):
        placed = programs.place_params(cfg, params, mesh)
    stats = {}
    many = generate(cfg, placed, prompts, max_new_tokens=NEW, cache_dtype=F32, mesh=mesh,
                    speculative=Speculation(k=4, gate=False), stats=stats)
    assert [c.tokens for c in many] == [c.tokens for c in one] and stats["spec_accepted"] > 0
