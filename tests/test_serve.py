"""qcjax.serve: the OpenAI-compatible server, driven by the official `openai` client against a server this module
starts on 127.0.0.1 (a tiny random-weight model, the real Qwen tokenizer). Results equal qcjax.inference.generate for
the same prompts one at a time; concurrent clients get their one-at-a-time results; bad requests are 4xx in OpenAI's
shape and the server keeps serving; nothing compiles after warm-up. The server speculates (prompt lookup, as
`--speculative ngram`): greedy text is compared with plain decoding, sampled text with generate under the same
speculation (a seed reproduces it)."""
import concurrent.futures
import json
import socket
import time
import urllib.error
import urllib.request

import jax.numpy as jnp
import numpy as np
import pytest

import qcjax
from qcjax import prompts as P
from qcjax.inference import GREEDY, SamplingParams, generate

from conftest import TINY_HF_CFG, serving

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

CFG = TINY_HF_CFG
KEY = "sk-test-key"
MAX_LEN = 64  # tokens per slot: prompt buckets 16, 32, 64 (few programs to warm up)
SLOTS = 4


@pytest.fixture(scope="module")
def hf_dir(tiny_hf):
    return tiny_hf[0]


class Server:
    def __init__(self, engine, name, port, tok):
        self.engine, self.name, self.tok = engine, name, tok
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(api_key=KEY, base_url=self.url + "/v1", max_retries=0, timeout=120)

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body, key: str | None = KEY, raw: bytes | None = None) -> tuple[int, dict]:
        """A raw POST (bodies the openai client would refuse to send): (status, JSON answer)."""
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
        data = raw if raw is not None else json.dumps(body).encode()
        try:
            with urllib.request.urlopen(urllib.request.Request(self.url + path, data, headers), timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def reference(self, prompts: list[list[int]], max_new, sampling=GREEDY, seed=0) -> list[tuple[str, str]]:
        """qcjax.inference.generate on the served weights, one prompt at a time, without speculation (the server
        speculates: its text, greedy or seeded, must be plain decoding's): (text, finish_reason) each."""
        n = len(prompts)
        each = lambda v: v if isinstance(v, list) else [v] * n  # noqa: E731
        done = [generate(self.engine.cfg, self.engine.params, [p], max_new_tokens=m, sampling=s, seed=sd,
                         stop_tokens=self.tok.fim_stop_ids, cache_dtype=jnp.float32)[0]
                for p, m, s, sd in zip(prompts, each(max_new), each(sampling), each(seed))]
        return [(self.tok.decode(d.tokens), d.finish_reason) for d in done]


@pytest.fixture(scope="module")
def server(hf_dir, tok):
    """`python -m qcjax.serve`'s build (flags -> tokenizer, model, warmed-up engine, app) under uvicorn in a
    thread, on a free port of 127.0.0.1; stopped at the end."""
    from qcjax.serve.__main__ import build, build_parser

    a = build_parser().parse_args(
        ["--hf_dir", hf_dir, "--dtype", "float32", "--cache_dtype", "float32", "--max_batch", str(SLOTS),
         "--max_len", str(MAX_LEN), "--chunk", "4", "--prefill_batch", "2", "--prefill_tokens", "64",
         "--max_queue", "12", "--api_key", KEY, "--speculative", "ngram", "--num_speculative_tokens", "3"])
    engine, app, name = build(a, log=lambda msg: None)
    with serving(app, engine) as port:
        yield Server(engine, name, port, tok)


PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser()\n",
           "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n"]


# ---- the endpoints ---------------------------------------------------------------------------------------------
def test_models_and_health(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == [server.name]
    h = server.health()
    assert h["status"] == "ok" and h["max_rows"] == SLOTS and h["max_len"] == MAX_LEN


def test_greedy_completions_equal_generate(server, tok):
    ids = [tok.encode_with_special(p) for p in PROMPTS]
    want = server.reference(ids, 12)
    for p, i, (text, finish) in zip(PROMPTS, ids, want):
        r = server.client.completions.create(model=server.name, prompt=p, max_tokens=12, temperature=0)
        assert r.choices[0].text == text and r.choices[0].finish_reason == finish
        assert r.object == "text_completion"
        assert r.usage.prompt_tokens == len(i) and r.usage.completion_tokens == 12
    # a list of prompts (strings and token ids) gives one choice per prompt, in order
    r = server.client.completions.create(model=server.name, prompt=[ids[0], ids[1]], max_tokens=12, temperature=0)
    assert [c.text for c in r.choices] == [want[0][0], want[1][0]] and [c.index for c in r.choices] == [0, 1]


def test_fim_suffix_is_the_training_layout_and_equals_generate(server, tok):
    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    ids = P.encode(tok, P.fim_prompt(prefix, suffix))
    assert ids == tok.encode_with_special(f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>")
    [(text, finish)] = server.reference([ids], 16)
    r = server.client.completions.create(model=server.name, prompt=prefix, suffix=suffix, max_tokens=16,
                                         temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (text, finish)
    assert r.usage.prompt_tokens == len(ids)
    # echo puts the prompt before the completion
    r = server.client.completions.create(model=server.name, prompt=prefix, suffix=suffix, max_tokens=16,
                                         temperature=0, echo=True)
    assert r.choices[0].text == prefix + text


def test_chat_equals_generate_on_the_chatml_prompt_streamed_or_not(server, tok):
    msgs = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Reverse a list."}]
    ids = P.encode(tok, P.chat_prompt(msgs))
    [(text, finish)] = server.reference([ids], 10)
    r = server.client.chat.completions.create(model=server.name, messages=msgs, max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (text, finish)
    assert r.usage.prompt_tokens == len(ids)
    chunks = list(server.client.chat.completions.create(model=server.name, messages=msgs, max_tokens=10,
                                                        temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish


def test_streaming_sends_text_as_it_comes_and_usage_at_the_end(server):
    kw = dict(model=server.name, prompt=PROMPTS[1], max_tokens=20, temperature=0)
    whole = server.client.completions.create(**kw).choices[0].text
    chunks = list(server.client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole
    assert sum(1 for t in texts if t) >= 3  # 20 tokens in decode chunks of 4: several events, not one
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_a_repeated_prefix_is_served_from_the_prefix_cache_with_the_same_text(server, tok):
    """An editor re-sends its file with the cursor further on: the second request's prompt starts with the first's
    full pages, which usage reports as cached_tokens (OpenAI's field, streamed with include_usage too); the text is
    what the same request gives with nothing cached."""
    head = "import os\nimport sys\n\n\nclass Config:\n    def __init__(self, path):\n        self.path = path\n"
    first = server.client.completions.create(model=server.name, prompt=head, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    prompt = head + "    def load(self):\n"
    again = server.client.completions.create(model=server.name, prompt=prompt, max_tokens=6, temperature=0)
    a, b = tok.encode_with_special(head), tok.encode_with_special(prompt)
    common = next(i for i, (x, y) in enumerate(zip(a + [-1], b)) if x != y)  # the tokens the two prompts share
    n = common // 16 * 16  # in full 16-token pages (the first request's generated tokens differ from the new text)
    assert again.usage.prompt_tokens_details.cached_tokens == n > 0
    [(want, _)] = server.reference([tok.encode_with_special(prompt)], 6)
    assert again.choices[0].text == want
    chunks = list(server.client.completions.create(model=server.name, prompt=prompt, max_tokens=6, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= n


def test_metrics_are_prometheus_text(server):
    from prometheus_client.parser import text_string_to_metric_families

    server.client.completions.create(model=server.name, prompt=PROMPTS[0], max_tokens=3, temperature=0)
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        samples = [x for f in text_string_to_metric_families(r.read().decode()) for x in f.samples]
    value = lambda name, **labels: next(x.value for x in samples  # noqa: E731
                                        if x.name == name and all(x.labels.get(k) == v for k, v in labels.items()))
    assert value("qcjax_requests_total") >= 1 and value("qcjax_generation_tokens_total") >= 3
    assert value("qcjax_time_to_first_token_seconds_count") >= 1
    assert value("qcjax_inter_token_latency_seconds_count") >= 1
    assert value("qcjax_cache_pages", state="used") == 0  # nothing in flight
    assert value("qcjax_cache_pages", state="free") + value("qcjax_cache_pages", state="cached") > 0
    names = {x.name for x in samples}
    assert {"qcjax_prefix_cache_hit_tokens_total", "qcjax_preemptions_total", "qcjax_queue_depth"} <= names


def test_the_server_speculates_with_the_same_text_for_completions_fim_and_chat(server, tok):
    """Greedy completions, FIM and chat through `--speculative ngram` equal plain decoding of the same prompts;
    /metrics counts the draft tokens; nothing compiles after warm-up."""
    import urllib.request

    from qcjax import prompts as P

    s = server
    code = "x = 1\ny = 2\nx = 1\ny = 2\nx = 1\n"
    r = s.client.completions.create(model=s.name, prompt=code, max_tokens=12, temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason) == s.reference([tok.encode(code)], 12)[0]
    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\nprint(add(1, 2))\n"
    r = s.client.completions.create(model=s.name, prompt=prefix, suffix=suffix, max_tokens=12, temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason) == s.reference(
        [P.encode(tok, P.fim_prompt(prefix, suffix))], 12)[0]
    msgs = [{"role": "user", "content": "Repeat: a b a b a b"}]
    chunks = list(s.client.chat.completions.create(model=s.name, messages=msgs, max_tokens=10, temperature=0,
                                                   stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == s.reference([P.encode(tok, P.chat_prompt(msgs))], 10)[0][0]
    with urllib.request.urlopen(s.url + "/metrics", timeout=30) as m:
        metrics = m.read().decode()
    drafted = [float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("qcjax_spec_draft_tokens_total")]
    assert drafted and drafted[0] > 0 and "qcjax_spec_accepted_tokens_total" in metrics
    assert s.engine.stats()["compiles_after_warmup"] == 0


def test_n_choices_with_a_seed_are_reproducible_and_equal_generate(server, tok):
    ids = tok.encode_with_special(PROMPTS[0])
    kw = dict(model=server.name, prompt=PROMPTS[0], max_tokens=8, temperature=1.0, top_p=0.9, n=3, seed=7)
    a = server.client.completions.create(**kw)
    b = server.client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) == 3  # choice k samples with seed + k
    want = server.reference([ids] * 3, 8, SamplingParams(temperature=1.0, top_p=0.9), seed=[7, 8, 9])
    assert [c.text for c in a.choices] == [t for t, _ in want]
    other = server.client.completions.create(**(kw | {"seed": 8, "n": 1}))
    assert other.choices[0].text == a.choices[1].text


def test_stop_strings_cut_the_text_streamed_or_not(server):
    kw = dict(model=server.name, prompt=PROMPTS[2], max_tokens=20, temperature=0)
    full = server.client.completions.create(**kw).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop and full.find(stop) >= 0
    want = full[: full.find(stop)]
    r = server.client.completions.create(**kw, stop=[stop, "never appears 123"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    chunks = list(server.client.completions.create(**kw, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want and chunks[-1].choices[0].finish_reason == "stop"


def test_concurrent_clients_with_mixed_lengths_get_their_one_at_a_time_results(server, tok):
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta def return import class self for in range".split()
    jobs = []
    for i in range(12):
        text = " ".join(rng.choice(words, size=int(rng.integers(2, 30))))
        jobs.append(dict(model=server.name, prompt=text, max_tokens=int(rng.integers(3, 16)),
                         temperature=0.0 if i % 2 == 0 else 0.8, seed=100 + i))

    def run(kw, stream):
        if stream:
            return "".join(c.choices[0].text for c in server.client.completions.create(**kw, stream=True))
        return server.client.completions.create(**kw).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda ik: run(ik[1], ik[0] % 3 == 0), enumerate(jobs)))
    alone = [run(kw, False) for kw in jobs]
    assert together == alone
    greedy = [(kw, a) for kw, a in zip(jobs, alone) if kw["temperature"] == 0][:3]
    ref = server.reference([tok.encode_with_special(kw["prompt"]) for kw, _ in greedy],
                           [kw["max_tokens"] for kw, _ in greedy])
    assert [t for t, _ in ref] == [a for _, a in greedy]
    assert server.health()["busy"] == 0


def _wait(cond, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_a_client_that_leaves_mid_stream_frees_its_slot(server):
    before = server.health()["cancelled"]
    stream = server.client.completions.create(model=server.name, prompt=PROMPTS[0], max_tokens=MAX_LEN - 8,
                                              temperature=1.0, seed=1, stream=True)
    next(iter(stream))
    assert server.health()["busy"] == 1
    stream.close()
    assert _wait(lambda: server.health()["busy"] == 0)
    assert server.health()["cancelled"] == before + 1  # freed by the disconnect, not by finishing
    r = server.client.completions.create(model=server.name, prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length"


def test_a_full_queue_answers_429_and_the_server_recovers(server):
    streams, refused = [], None
    kw = dict(model=server.name, prompt=PROMPTS[0], max_tokens=MAX_LEN - 8, temperature=1.0, n=SLOTS, stream=True)
    try:
        for _ in range(6):  # 4 slots + a queue of 12: the 5th request of 4 choices cannot wait
            try:
                streams.append(server.client.completions.create(**kw))
            except openai.RateLimitError as e:
                refused = e
                break
    finally:
        for s in streams:
            s.close()
    assert refused is not None and refused.status_code == 429
    assert "busy" in refused.body["message"] and refused.body["type"] == "rate_limit_error"
    assert _wait(lambda: server.health()["busy"] == 0 and server.health()["waiting"] == 0)
    r = server.client.completions.create(model=server.name, prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert r.choices[0].text


@pytest.mark.parametrize("body, status, param, words", [
    (None, 400, None, "not valid JSON"),
    ([1, 2], 400, None, "JSON object"),
    ({"prompt": "x", "max_tokens": 4, "frobnicate": 1}, 400, "frobnicate", "unknown field"),
    ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "must be an integer"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature", "must be a number"),
    ({"prompt": 5}, 400, "prompt", "must be a string"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ({"prompt": ["def f():"] * 200_000, "max_tokens": 1}, 400, "prompt", "at most 4 per request"),  # before tokenizing
    ({"prompt": "a\ud800b"}, 400, "prompt", "lone UTF-16 surrogate"),
    ({"prompt": "x", "suffix": "\ud800"}, 400, "suffix", "lone UTF-16 surrogate"),
    ({"prompt": "x", "max_tokens": MAX_LEN}, 400, "max_tokens", "maximum context length is 64"),
    ({"prompt": "word " * 80, "max_tokens": 1}, 400, "prompt", "maximum context length is 64"),
    ({"prompt": "", "max_tokens": 4}, 400, "prompt", "empty"),
    ({"prompt": [1, 10**9], "max_tokens": 4}, 400, "prompt", "token ids outside"),
    ({"prompt": "x", "n": 99}, 400, "n", "must be in [1, 4]"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model", "does not exist"),
])
def test_bad_requests_are_4xx_in_openai_shape_and_the_server_keeps_serving(server, body, status, param, words):
    body = body if not isinstance(body, dict) else {"model": server.name} | body
    code, answer = server.post("/v1/completions", None,
                               raw=b"{not json" if body is None else json.dumps(body).encode())
    assert code == status, answer
    err = answer["error"]
    assert words in err["message"] and err["param"] == param and err["type"].endswith("error")
    ok = server.client.completions.create(model=server.name, prompt="x = ", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_bad_chat_requests_name_the_problem(server):
    for body, words in [({"messages": []}, "non-empty array"),
                        ({"messages": [{"role": "robot", "content": "hi"}]}, "role must be"),
                        ({"messages": [{"role": "user", "content": 3}]}, "content must be a string"),
                        ({"messages": [{"role": "user", "content": "\udfff"}]}, "lone UTF-16 surrogate")]:
        code, answer = server.post("/v1/chat/completions", {"model": server.name} | body)
        assert code == 400 and words in answer["error"]["message"], answer
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        server.client.chat.completions.create(model=server.name, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=0)


def test_an_oversized_body_is_413_and_health_answers_meanwhile(server):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=30)
    conn.putrequest("POST", "/v1/completions")  # 9 MiB announced: refused before a byte of it is read
    for k, v in {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}",
                 "Content-Length": str(9 << 20)}.items():
        conn.putheader(k, v)
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "over" in json.loads(r.read())["error"]["message"]
    conn.close()
    assert server.health()["status"] == "ok"


def test_a_missing_or_wrong_key_is_401(server):
    for key in (None, "sk-wrong"):
        code, answer = server.post("/v1/completions", {"model": server.name, "prompt": "x"}, key=key)
        assert code == 401 and answer["error"]["code"] == "invalid_api_key", answer
    bad = openai.OpenAI(api_key="sk-wrong", base_url=server.url + "/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert server.health()["status"] == "ok"  # /health needs no key


def test_no_compilation_after_warmup_for_any_mix(server, tok):
    """Every prompt bucket, batched and lone prefills, greedy and sampled decodes, n > 1, cancels: the engine thread
    compiles nothing after warm-up (this module's earlier tests ran their mixes on the same server too)."""
    kws = [dict(prompt="word " * k, max_tokens=m, temperature=t, n=n)
           for k, m, t, n in [(1, 3, 0, 1), (20, 5, 0.7, 2), (45, 10, 0, 1), (8, 2, 1.0, 1), (30, 4, 0, 3)]]
    with concurrent.futures.ThreadPoolExecutor(len(kws)) as pool:
        list(pool.map(lambda kw: server.client.completions.create(model=server.name, **kw), kws))

    def drop(k):  # streaming clients that leave together, mid-stream
        stream = server.client.completions.create(model=server.name, prompt="word " * (3 + k), max_tokens=40,
                                                  temperature=0.5, seed=k, stream=True)
        next(iter(stream))
        stream.close()

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        list(pool.map(drop, range(3)))
    assert _wait(lambda: server.health()["busy"] == 0)
    h = server.health()
    assert h["compiles"] > 0 and h["compiles_after_warmup"] == 0, h


# ---- the CLI ----------------------------------------------------------------------------------------------------
def test_help_explains_and_bad_flags_are_one_line_errors(hf_dir, capsys):
    from qcjax.serve.__main__ import build_parser, main

    text = build_parser().format_help()
    for words in ("--hf_dir", "--max_batch", "--api_key", "/v1/completions", "suffix", "429"):
        assert words in text
    for argv, flag in [(["--hf_dir", hf_dir + "/nope"], "--hf_dir"), (["--hf_dir", hf_dir, "--max_batch", "0"],
                       "--max_batch"), (["--hf_dir", hf_dir, "--prefill_batch", "3"], "--prefill_batch"),
                       (["--hf_dir", hf_dir, "--max_len", "100000"], "--max_len")]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("python -m qcjax.serve: error: ") and flag in err and "\n" not in err, err


def test_max_len_follows_the_model_and_the_name_follows_the_run():
    """No flag: the model's context up to 8192 (the tiny config's 4096 serves as it is); a training run's
    checkpoints/ serves under the run's name, whichever of its paths was given."""
    import argparse

    from qcjax.serve.__main__ import UsageError, build_parser, max_len, served_name

    assert build_parser().parse_args(["--hf_dir", "x"]).max_len is None
    assert (max_len(None, 4096), max_len(None, 32768), max_len(512, 4096)) == (4096, 8192, 512)
    with pytest.raises(UsageError, match=r"--max_len=8192: more than the model's context of 4096"):
        max_len(8192, 4096)

    def name(**kw):
        return served_name(argparse.Namespace(**{"hf_dir": None, "ckpt": None, "served_model_name": None, **kw}))

    assert name(ckpt="runs/tiny/checkpoints") == name(ckpt="/abs/runs/tiny/checkpoints/") == "tiny"
    assert name(ckpt="ckpt/7b") == "7b" and name(hf_dir="models/Qwen2.5-Coder-1.5B/") == "Qwen2.5-Coder-1.5B"
    assert name(ckpt="runs/tiny/checkpoints", served_model_name="coder") == "coder"


@pytest.mark.slow
def test_the_cli_serves_fim_completions_until_interrupted(hf_dir, tok):
    """`python -m qcjax.serve` as users run it, in its own process: warm-up, listen, answer a FIM request with
    generate's text, stop on SIGINT."""
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"QCJAX_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "qcjax.serve", "--hf_dir", hf_dir, "--dtype", "float32",
                             "--cache_dtype", "float32", "--max_batch", "2", "--max_len", "32", "--prefill_batch", "1",
                             "--port", str(port), "--log_level", "warning"],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(api_key=KEY, base_url=f"http://127.0.0.1:{port}/v1", max_retries=0, timeout=60)
        deadline = time.time() + 300
        while True:
            try:
                [model] = client.models.list().data
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
                time.sleep(0.5)
        assert model.id == os.path.basename(hf_dir)
        r = client.completions.create(model=model.id, prompt="def add(a, b):\n    ", suffix="\n", max_tokens=8,
                                      temperature=0)
        cfg, params = qcjax.load_hf(hf_dir, dtype="float32")
        [want] = generate(cfg.replace(dtype="float32"), params, [P.encode(tok, P.fim_prompt("def add(a, b):\n    ",
                                                                                              "\n"))],
                            max_new_tokens=8, stop_tokens=tok.fim_stop_ids, cache_dtype=jnp.float32)
        assert r.choices[0].text == tok.decode(want.tokens)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        finally:
            proc.kill() if proc.poll() is None else None
    err = proc.stderr.read()
    assert "warm-up done" in err and "serving" in err, err
