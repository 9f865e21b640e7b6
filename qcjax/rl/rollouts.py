"""Rollouts for online RL: the step's problems -> groups of completions on the paged engine (the params being trained,
on their own mesh) -> the sandbox's verdicts -> rewards, advantages and the train step's rows.

    src = Rollouts(tc, cfg, tok, mesh)                         # tc: the run's TrainConfig (its rl block)
    batch, metrics = src.batch(step, state["params"])          # numpy rows for to_global, host metrics

Everything a step samples is a function of (seed, step, params): the problems are the step's slice of a seeded
permutation of the task list (a new permutation per pass over it), the j-th completion of row i is drawn with seed
crc32(seed, step, i) (the engine's randomness is per row and per token, whatever the batch), so a run resumed from
a checkpoint samples exactly what it would have sampled (no iterator state is saved).

A group's prompts are identical, so the engine prefills the first and the others reuse its pages (the prefix cache).
Each completion goes to the sandbox as soon as it finishes, on `rl.workers` threads, while the engine samples the
rest; the step waits for the last verdict.
"""
from __future__ import annotations

import ast
import dataclasses
import queue
import random
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Sequence

import numpy as np

from qcjax.rl.rewards import ZERO_REASONS, group_advantages, reward, test_credit
from qcjax.rl.tasks import RlTask

if TYPE_CHECKING:
    from qcjax.train.config import TrainConfig


def row_seed(seed: int, step: int, row: int) -> int:
    return zlib.crc32(f"{seed}\0rl\0{step}\0{row}".encode()) & 0xFFFFFFFF


def step_tasks(n_tasks: int, per_step: int, step: int, seed: int) -> list[int]:
    """Task indices of `step`: positions step*per_step ... of the concatenated per-epoch seeded permutations."""
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(k, n_tasks)
        perm = list(range(n_tasks))
        random.Random(f"{seed}\0rl-order\0{epoch}").shuffle(perm)
        out.append(perm[pos])
    return out


def cut_at_stops(tok, tokens: Sequence[int], stops: Sequence[str]) -> tuple[list[int], str, bool]:
    """(the shortest token prefix whose text holds a stop string, its text cut before the stop, whether one was
    found); no stop string: all tokens, their text. A binary search over prefixes (holding a stop is monotone)."""
    tokens = list(tokens)
    text = tok.decode(tokens)
    hits = [text.find(s) for s in stops if s in text]
    if not hits:
        return tokens, text, False
    lo, hi = 1, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in tok.decode(tokens[:mid]) for s in stops):
            hi = mid
        else:
            lo = mid + 1
    return tokens[:lo], text[:min(hits)], True


def parses(code: str) -> bool:
    try:
        ast.parse(code)
        return True
    except (SyntaxError, ValueError):
        return False


@dataclasses.dataclass
class Sample:
    """One completion: its tokens (what the train step scores, the ending stop token included), the text scored,
    how it ended, and the sandbox's verdict."""

    task: int
    tokens: list[int]
    text: str
    ended: bool  # a stop token or stop string ended it (not max_new_tokens)
    passed: bool = False
    reason: str = ""
    tests: list | None = None
    reward: float = 0.0


class Sandbox:
    """The evaluation sandbox on `workers` threads (one process each, a uid slot each when root)."""

    def __init__(self, workers: int, limits, iso):
        self.limits, self.iso = limits, iso
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers))
        self.slots: queue.Queue[int] = queue.Queue()
        for k in range(max(1, workers)):
            self.slots.put(k)

    def submit(self, program):
        from qcjax.eval.sandbox import run_program

        def one():
            slot = self.slots.get()
            try:
                return run_program(program, self.limits, self.iso, slot=slot)
            finally:
                self.slots.put(slot)

        return self.pool.submit(one)

    def close(self):
        self.pool.shutdown(wait=True)


def sample(cfg, params, tok, tasks: Sequence[RlTask], rows: Sequence[int], *, max_new_tokens: int, temperature: float,
           top_p: float, seeds: Sequence[int], sandbox: Sandbox, format_weight: float = 0.0, mesh=None,
           cache_dtype=None, max_rows: int = 64) -> list[Sample]:
    """Complete tasks[rows[i]] once per row (a task repeated G times is a group: its prompt pages are shared), each
    completion scored in the sandbox as it finishes. Greedy at temperature 0."""
    from qcjax.inference import GREEDY, SamplingParams, generate

    prompts = [tasks[t].prompt_ids(tok) for t in rows]
    stops = [tasks[t].stop_strings() for t in rows]
    out: list[Sample | None] = [None] * len(rows)
    futures: dict[int, object] = {}
    got: list[list[int]] = [[] for _ in rows]

    def on_chunk(new):
        done = []
        for k, toks in enumerate(new):
            if toks:
                got[k] += toks
                if any(s in tok.decode(got[k]) for s in stops[k]):
                    done.append(k)
        return done

    def on_finish(k, c):
        toks = list(c.tokens)
        toks, text, cut = cut_at_stops(tok, toks, stops[k])
        ended = cut or c.finish_reason == "stop"
        if not cut and c.stop_token is not None:
            toks = toks + [int(c.stop_token)]  # the model chose to stop: train on that choice too
        task = tasks[rows[k]]
        out[k] = Sample(rows[k], toks, text, ended)
        futures[k] = sandbox.submit(task.program(text))

    sampling = SamplingParams(temperature=temperature, top_p=top_p) if temperature > 0 else GREEDY
    width = max(1, min(max_rows, len(rows)))
    # min_batch = max_rows: decode always runs the full row width (finished rows idle), so a run compiles one decode
    # program per table width instead of one per power-of-two count of busy rows
    generate(cfg, params, prompts, max_new_tokens=max_new_tokens, sampling=sampling, seed=list(seeds),
             stop_tokens=sorted(tok.fim_stop_ids), cache_dtype=cache_dtype or cfg.dtype, mesh=mesh,
             on_chunk=on_chunk, on_finish=on_finish, max_rows=width, min_batch=width)
    for k, s in enumerate(out):
        r = futures[k].result()
        s.passed, s.reason, s.tests = r.passed, r.reason, r.tests
        s.reward = reward(r.passed, r.reason, r.tests, s.ended and parses(tasks[s.task].code(s.text)), format_weight)
    return out  # type: ignore[return-value]


def build_rows(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], advantages, seq_len: int
               ) -> dict[str, np.ndarray]:
    """The train step's rows (task rl): prompt + completion right-padded to seq_len; loss_mask (label-aligned) on
    the completion tokens only, never on the prompt or padding; segment_ids 1 on real tokens, 0 on padding."""
    n = len(prompts)
    b = {"tokens": np.zeros((n, seq_len), np.int32), "positions": np.zeros((n, seq_len), np.int32),
         "segment_ids": np.zeros((n, seq_len), np.int32), "loss_mask": np.zeros((n, seq_len), np.float32),
         "advantages": np.asarray(advantages, np.float32).reshape(n)}
    for i, (p, c) in enumerate(zip(prompts, completions)):
        row = list(p) + list(c)
        if len(row) > seq_len:
            raise ValueError(f"a rollout row is {len(row)} tokens (prompt {len(p)} + completion {len(c)}), over "
                             f"seq_len={seq_len}: raise seq_len or lower rl.max_new_tokens")
        b["tokens"][i, :len(row)] = row
        b["positions"][i, :len(row)] = np.arange(len(row))
        b["segment_ids"][i, :len(row)] = 1
        b["loss_mask"][i, len(p):len(row)] = 1.0
    return b


class Rollouts:
    """The rl task's source of train batches (qcjax.train.loop): batch(step, params) -> (rows, metrics)."""

    def __init__(self, tc: TrainConfig, cfg, tok, mesh=None, log=sys.stderr):
        from qcjax.eval.sandbox import Limits, detect_isolation
        from qcjax.rl.tasks import load_tasks
        from qcjax.train.config import ConfigError

        rl = tc.rl  # (tc: checked by from_config: group_size, temperature, top_p, max_new_tokens, batch_size)
        try:
            self.tasks = load_tasks(rl, tc.seed)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.prompts = [t.prompt_ids(tok) for t in self.tasks]
        longest = max(range(len(self.tasks)), key=lambda i: len(self.prompts[i]))
        if len(self.prompts[longest]) + rl.max_new_tokens + 1 > tc.seq_len:
            raise ConfigError(f"seq_len={tc.seq_len} is too short for rl.max_new_tokens={rl.max_new_tokens} after "
                              f"the longest prompt ({self.tasks[longest].task_id}: {len(self.prompts[longest])} "
                              "tokens): raise seq_len or lower rl.max_new_tokens")
        self.tc, self.rl, self.cfg, self.tok, self.mesh = tc, rl, cfg, tok, mesh
        self.iso = detect_isolation()
        self.sandbox = Sandbox(rl.workers or (__import__("os").cpu_count() or 1),
                               Limits(timeout_s=rl.test_timeout_s), self.iso)
        self.per_step = tc.batch_size // rl.group_size

    def close(self):
        self.sandbox.close()

    def step_rows(self, step: int) -> list[int]:
        """The task index of each row of `step` (each task group_size times, adjacent)."""
        return [t for t in step_tasks(len(self.tasks), self.per_step, step, self.tc.seed)
                for _ in range(self.rl.group_size)]

    def batch(self, step: int, params) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        rl = self.rl
        rows = self.step_rows(step)
        t0 = time.perf_counter()
        samples = sample(self.cfg, params, self.tok, self.tasks, rows, max_new_tokens=rl.max_new_tokens,
                         temperature=rl.temperature, top_p=rl.top_p,
                         seeds=[row_seed(self.tc.seed, step, i) for i in range(len(rows))], sandbox=self.sandbox,
                         format_weight=rl.format_reward, mesh=self.mesh)
        rewards = np.array([s.reward for s in samples], np.float64)
        adv = group_advantages(rewards, rl.group_size, rl.advantage_scale)
        batch = build_rows([self.prompts[t] for t in rows], [s.tokens for s in samples], adv, self.tc.seq_len)
        groups = rewards.reshape(-1, rl.group_size)
        lens = np.array([len(s.tokens) for s in samples], np.float64)
        metrics = {
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "pass_rate": float(np.mean([s.passed for s in samples])),
            "tests_passed": float(np.mean([test_credit(s.passed, s.reason, s.tests) for s in samples])),
            "completion_len": float(lens.mean()), "truncated": float(np.mean([not s.ended for s in samples])),
            "stopped_by_sandbox": float(np.mean([s.reason.startswith(ZERO_REASONS) for s in samples])),
            "flat_groups": float(np.mean(groups.std(axis=1) == 0)), "rollout_s": time.perf_counter() - t0,
        }
        return batch, metrics


def evaluate(cfg, params, tok, tasks: Sequence[RlTask], *, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
             max_new_tokens: int = 64, seed: int = 0, workers: int = 2, timeout_s: float = 5.0, mesh=None
             ) -> dict[str, tuple[int, int]]:
    """{task_id: (samples, passed)} over n samples per task (greedy at temperature 0), the per-problem table of
    qcjax.prefs.stats (pass1, paired_difference)."""
    from qcjax.eval.sandbox import Limits, detect_isolation

    sb = Sandbox(workers, Limits(timeout_s=timeout_s), detect_isolation())
    try:
        rows = [i for i in range(len(tasks)) for _ in range(n)]
        out = sample(cfg, params, tok, tasks, rows, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_p=top_p, seeds=[row_seed(seed, -1, i) for i in range(len(rows))], sandbox=sb, mesh=mesh)
    finally:
        sb.close()
    per: dict[str, list[int]] = {}
    for s in out:
        d = per.setdefault(tasks[s.task].task_id, [0, 0])
        d[0] += 1
        d[1] += int(s.passed)
    return {t: (a, b) for t, (a, b) in per.items()}
