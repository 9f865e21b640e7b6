"""infer.py: prompts in the exact training formats, output equal to transformers' greedy generation, streaming,
batches, stop strings, and clear errors with a non-zero exit for bad input."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import qcjax
from qcjax import prompts as P
from qcjax.tokenizer import FIM_STOP_IDS

from conftest import TINY_HF_CFG

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("infer", os.path.join(ROOT, "infer.py"))
infer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(infer)

CFG = TINY_HF_CFG  # the real vocabulary: real token ids work
NEW = 24


@pytest.fixture(scope="module")
def hf_dir(tiny_hf):
    """The session's saved random tiny checkpoint with the real Qwen tokenizer.json, and its transformers model."""
    return tiny_hf


def hf_greedy_text(model, tok, ids, n=NEW):
    """transformers' greedy continuation, cut at the first FIM/chat stop token, as text."""
    import torch

    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                         eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    cut = next((k for k, t in enumerate(out) if t in FIM_STOP_IDS), len(out))
    return tok.decode(out[:cut])


def args(hf, *extra):
    return ["--hf_dir", hf, "--dtype", "float32", "--cache_dtype", "float32", "--max_new_tokens", str(NEW),
            "--quiet", *extra]


# ---- prompts are the training formats ------------------------------------------------------------------------------
def test_fim_prompt_is_the_exact_training_format(tok):
    ids = P.encode(tok, P.fim_prompt("def f(x):\n    ", "\n    return y\n"))
    assert ids == tok.encode_with_special("<|fim_prefix|>def f(x):\n    <|fim_suffix|>\n    return y\n<|fim_middle|>")


def test_repo_prompt_puts_other_files_first_then_fim_in_the_current_one(tok, tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "util.py").write_text("def helper():\n    return 1\n")
    (tmp_path / "main.py").write_text("from pkg.util import helper\n\nx = helper()\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: x\n")
    name, files = P.read_repo(str(tmp_path), current=str(tmp_path / "main.py"))
    assert files == [("pkg/util.py", "def helper():\n    return 1\n")]
    pre, suf = P.split_at_cursor("from pkg.util import helper\n\nx = helper()\n", "3:5")
    assert (pre, suf) == ("from pkg.util import helper\n\nx = ", "helper()\n")
    ids = P.encode(tok, P.repo_prompt(name, files, "main.py", pre, suf))
    want = (f"<|repo_name|>{name}\n<|file_sep|>pkg/util.py\ndef helper():\n    return 1\n\n"
            f"<|file_sep|>main.py\n<|fim_prefix|>{pre}<|fim_suffix|>{suf}<|fim_middle|>")
    assert ids == tok.encode_with_special(want)


def test_chat_prompt_is_chatml_with_the_generation_header(tok):
    ids = P.encode(tok, P.chat_prompt("Sort a list"))
    want = (f"<|im_start|>system\n{P.DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nSort a list<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert ids == tok.encode_with_special(want)


def test_control_token_strings_in_fim_text_stay_text(tok):
    ids = P.encode(tok, P.fim_prompt("s = '<|endoftext|>'", ""))
    assert ids.count(tok.special_id("<|endoftext|>")) == 0


# ---- generation ------------------------------------------------------------------------------------------------------
def test_fim_output_equals_transformers_greedy_and_only_text_on_stdout(hf_dir, tok):
    hf, model = hf_dir
    pre, suf = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    want = hf_greedy_text(model, tok, P.encode(tok, P.fim_prompt(pre, suf)))
    assert len(want) > 10
    argv = [a for a in args(hf, "--prefix", pre, "--suffix", suf) if a != "--quiet"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), *argv], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == want
    assert "tokens" in proc.stderr  # progress goes to stderr


class Recorder:
    def __init__(self):
        self.writes = []

    def write(self, s):
        if s:
            self.writes.append(s)

    def flush(self):
        pass


def test_single_prompt_streams_in_chunks(hf_dir, tok):
    hf, model = hf_dir
    text = "import numpy as np\n"
    want = hf_greedy_text(model, tok, tok.encode(text))
    out = Recorder()
    a = infer.build_parser().parse_args(args(hf, "--prompt", text, "--chunk", "3"))
    assert infer.run(a, out=out, log=open(os.devnull, "w")) == 0
    assert "".join(out.writes) == want
    assert len(out.writes) > 2


def test_long_prompt_prefilled_in_chunks_gives_transformers_greedy_text(hf_dir, tok):
    hf, model = hf_dir
    text = "def area(r):\n    return 3.14159 * r * r\n\n\ndef perimeter(r):\n    return 2 * 3.14159 * r\n\n\n"
    ids = tok.encode(text)
    assert len(ids) > 32  # a 64-token bucket: two 32-token chunks
    want = hf_greedy_text(model, tok, ids)
    out = Recorder()
    a = infer.build_parser().parse_args(args(hf, "--prompt", text, "--prefill_chunk", "32"))
    assert infer.run(a, out=out, log=open(os.devnull, "w")) == 0
    assert "".join(out.writes) == want


def test_file_cursor_and_ckpt_give_the_same_text_as_hf_dir(hf_dir, tok, tmp_path):
    hf, model = hf_dir
    src = tmp_path / "m.py"
    src.write_text("def area(r):\n    return \n")
    from qcjax.checkpoint import save

    cfg, params = qcjax.load_hf(hf)
    save(str(tmp_path / "ckpt"), 0, params, cfg, async_=False).close()
    want = hf_greedy_text(model, tok, P.encode(tok, P.fim_prompt("def area(r):\n    return ", "\n")))
    for src_flags in (["--hf_dir", hf], ["--ckpt", str(tmp_path / "ckpt"), "--tokenizer", tok.path]):
        out = Recorder()
        a = infer.build_parser().parse_args(args(hf, "--file", str(src), "--cursor", "2:12")[2:] + src_flags)
        assert infer.run(a, out=out, log=open(os.devnull, "w")) == 0
        assert "".join(out.writes) == want, src_flags


def test_a_run_directory_or_a_step_directory_samples_and_the_statistics_start_their_own_line(hf_dir, tok, tmp_path):
    """train.py's --workdir and one step directory are --ckpt too (the run's tokenizer/ found beside checkpoints/);
    with stdout and stderr in one stream (`2>&1 | ...`) the statistics still start a line of their own."""
    import io
    import re

    from qcjax.checkpoint import save

    hf, model = hf_dir
    cfg, params = qcjax.load_hf(hf)
    run = tmp_path / "run"
    save(str(run / "checkpoints"), 7, params, cfg, async_=False).close()
    (run / "tokenizer").mkdir()
    shutil.copy(tok.path, run / "tokenizer" / "tokenizer.json")
    text = "import numpy as np\n"
    want = hf_greedy_text(model, tok, tok.encode(text))
    for ckpt in (run, run / "checkpoints" / "7"):
        both = io.StringIO()
        flags = [f for f in args(hf, "--prompt", text)[2:] if f != "--quiet"] + ["--ckpt", str(ckpt)]
        assert infer.run(infer.build_parser().parse_args(flags), out=both, log=both) == 0
        printed = both.getvalue()
        assert f"tokens\n{want}" in printed and re.search(r"\ngenerated \d+ tokens in ", printed), printed


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_step(hf_dir, tok, tmp_path, capsys, damage):
    hf, model = hf_dir
    from qcjax.checkpoint import save

    cfg, params = qcjax.load_hf(hf)
    save(str(tmp_path / "ckpt"), 1, params, cfg, async_=False).close()
    noise = jax.tree.map(lambda x: x + 1, params)
    save(str(tmp_path / "ckpt"), 2, noise, cfg, async_=False).close()
    files = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "ckpt" / "2" / "params") for f in fs]
    data = max(files, key=os.path.getsize)
    with open(data, "r+b") as f:
        if damage == "truncate":
            f.truncate(os.path.getsize(data) // 2)
        else:
            f.seek(os.path.getsize(data) // 2)
            chunk = f.read(64)
            f.seek(os.path.getsize(data) // 2)
            f.write(bytes(b ^ 0xFF for b in chunk))
    text = "import numpy as np\n"
    out = Recorder()
    a = infer.build_parser().parse_args(args(hf, "--prompt", text)[2:] + ["--ckpt", str(tmp_path / "ckpt"),
                                                                          "--tokenizer", tok.path])
    assert infer.run(a, out=out, log=open(os.devnull, "w")) == 0
    assert "".join(out.writes) == hf_greedy_text(model, tok, tok.encode(text))  # step 1's weights
    assert "checkpoint step 2 is corrupt or unreadable" in capsys.readouterr().err
    a = infer.build_parser().parse_args(args(hf, "--prompt", text)[2:] + ["--ckpt", str(tmp_path / "ckpt"), "--step",
                                                                          "2", "--tokenizer", tok.path])
    with pytest.raises(infer.UsageError, match="step 2 .* is corrupt or unreadable"):  # asked for by number
        infer.run(a, out=Recorder(), log=open(os.devnull, "w"))


def test_jsonl_batch_one_object_per_prompt_with_per_row_limits_and_stop_strings(hf_dir, tok, tmp_path):
    hf, model = hf_dir
    fim = P.encode(tok, P.fim_prompt("x = [", "]\n"))
    full = hf_greedy_text(model, tok, fim)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    lines = [
        {"id": "a", "prefix": "x = [", "suffix": "]\n"},
        {"prompt": "class Stack:\n", "max_new_tokens": 5},
        {"id": "c", "prefix": "x = [", "suffix": "]\n", "stop": [stop]},
        {"chat": "Write hello world", "max_new_tokens": 7},
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    outp = tmp_path / "out.jsonl"
    assert infer.main(args(hf, "--prompts_jsonl", str(inp), "--out", str(outp))) == 0
    got = [json.loads(line) for line in outp.read_text().splitlines()]
    assert [g["index"] for g in got] == [0, 1, 2, 3] and [g["id"] for g in got] == ["a", None, "c", None]
    assert got[0]["completion"] == full
    assert got[1]["completion_tokens"] <= 5 and got[3]["completion_tokens"] <= 7
    assert got[2]["completion"] == full[: full.index(stop)] and got[2]["finish_reason"] == "stop"
    chat_ids = P.encode(tok, P.chat_prompt("Write hello world"))
    assert got[3]["completion"] == hf_greedy_text(model, tok, chat_ids, 7)


@pytest.mark.parametrize("line, match", [
    ({"messages": [{"role": "wizard", "content": "hi"}]}, r"line 1: chat message 0 has role 'wizard'; ChatML roles"),
    ({"messages": "hi"}, r"line 1: 'messages' must be a list"),
    ({"prompt": "x", "max_new_tokens": True}, r"line 1: max_new_tokens=True: must be an integer >= 1"),
    ({"prompt": "x", "seed": False}, r"line 1: seed=False: must be an integer"),
])
def test_bad_jsonl_requests_name_the_line_and_field(hf_dir, tmp_path, capsys, line, match):
    import re

    hf, _ = hf_dir
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(line) + "\n")
    assert infer.main(args(hf, "--prompts_jsonl", str(inp))) == 2
    assert re.search(match, capsys.readouterr().err), match


def test_a_prompt_that_is_not_utf8_is_a_one_line_error(hf_dir, capsys):
    hf, _ = hf_dir
    assert infer.main(args(hf, "--prompt", "caf\udce9")) == 2  # how Python hands over an undecodable argv byte
    assert "--prompt is not valid UTF-8 text" in capsys.readouterr().err


def test_truncate_left_keeps_the_last_tokens(hf_dir, tok):
    hf, model = hf_dir
    text = "def f():\n    pass\n" * 20
    ids = tok.encode(text)
    room = 64 - NEW
    want = hf_greedy_text(model, tok, ids[len(ids) - room:])
    out = Recorder()
    a = infer.build_parser().parse_args(args(hf, "--prompt", text, "--max_context", "64", "--truncate_left"))
    assert infer.run(a, out=out, log=open(os.devnull, "w")) == 0
    assert "".join(out.writes) == want


# ---- bad input: a clear error and exit status 2 ----------------------------------------------------------------------
@pytest.mark.parametrize("extra, match", [
    (["--prompt", "def f():\n    pass\n" * 20, "--max_context", "64"], r"prompt is \d+ tokens.*--truncate_left"),
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "x", "--temperature", "-0.5"], "--temperature=-0.5"),
    (["--prompt", "x", "--temperature", "1", "--top_p", "0"], "--top_p=0.0"),
    (["--prompt", "x", "--temperature", "1", "--top_p", "1.5"], "--top_p=1.5"),
    (["--prompt", "x", "--prefix", "a", "--suffix", "b"], "exactly one input"),
    (["--prompt", "x", "--prefill_chunk", "48"], r"--prefill_chunk=48: must be a power of two"),
    (["--cursor", "9:1", "--file", "FILE"], r"line 9 is outside .* \(lines 1\.\.3\)"),
    (["--cursor", "1:30", "--file", "FILE"], r"column 30 is outside line 1 .* \(columns 1\.\.13\)"),
])
def test_bad_input_exits_2_with_a_message_naming_it(hf_dir, tmp_path, capsys, extra, match):
    hf, _ = hf_dir
    src = tmp_path / "f.py"
    src.write_text("def area(r):\n    return 0\n")
    extra = [str(src) if e == "FILE" else e for e in extra]
    assert infer.main(args(hf, *extra)) == 2
    err = capsys.readouterr().err
    assert "error:" in err
    import re

    assert re.search(match, err, re.S), err


def test_checkpoint_that_does_not_match_its_config_exits_2(hf_dir, tmp_path, capsys):
    hf, _ = hf_dir
    bad = tmp_path / "bad"
    shutil.copytree(hf, bad)
    conf = json.loads((bad / "config.json").read_text())
    conf["intermediate_size"] += 16
    (bad / "config.json").write_text(json.dumps(conf))
    assert infer.main(args(str(bad), "--prompt", "x")) == 2
    err = capsys.readouterr().err
    assert "cannot load the model" in err and "mlp.gate_proj.weight" in err


def test_bad_input_in_a_subprocess_exits_nonzero_with_only_stderr(hf_dir):
    hf, _ = hf_dir
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), "--hf_dir", hf, "--prompt", "x",
                           "--top_p", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and "--top_p=2.0" in proc.stderr


def test_help_explains_the_modes():
    h = infer.build_parser().format_help()
    for s in ("--prefix", "--cursor", "--repo", "--chat", "--prompts_jsonl", "--truncate_left", "<|fim_pad|>"):
        assert s in h
