"""The OpenAI-compatible HTTP API over the engine: /v1/completions (with `suffix`: fill-in-the-middle in the training
layout), /v1/chat/completions (ChatML), /v1/models, /health; streaming as server-sent events.

Request bodies are checked here, field by field, into `Job`s (pure: `parse_completion`, `parse_chat`), so a bad
request is a 4xx in OpenAI's error shape naming the field, before anything reaches the engine. Prompts come from
`qcjax.prompts` (the training formats); generation stops at the tokenizer's FIM/chat stop tokens, the request's stop
strings (host-side, `text_stream.TextStream`: the text is cut at the first one and the request's pages are freed)
or max_tokens. Each choice of a request is one engine request (qcjax.inference); a client that goes away cancels
them. Usage reports `prompt_tokens_details.cached_tokens`: the prompt tokens the prefix cache held. `/metrics`
answers the engine's Prometheus metrics.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import secrets
import time
from typing import Any, AsyncIterator, Callable, Collection

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from qcjax import prompts as P
from qcjax.inference import Engine, QueueFull, Request
from qcjax.sampling import SamplingParams
from qcjax.text_stream import TextStream
from qcjax.tokenizer import Tokenizer

log = logging.getLogger("qcjax.serve")

MAX_STOPS = 4  # OpenAI's limit on stop sequences


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Limits:
    """What the server allows: the context (prompt + completion tokens), choices per request (prompts x n) and the
    request body's size."""

    max_len: int
    max_n: int
    max_body: int = 8 << 20  # bytes: a 128K-token prompt as an id list is about 1 MB
    read_timeout: float = 30.0  # seconds to receive a request body (a half-open or trickling client gets a 408)


def _check_text(value: Any, field: str) -> None:
    """A 400 naming the field for a string that is not valid Unicode (a lone UTF-16 surrogate such as \\ud800, which
    JSON can carry but no tokenizer can encode)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"'{field}' holds a lone UTF-16 surrogate: not valid Unicode text", field) from None
    elif isinstance(value, list):
        for v in value:
            _check_text(v, field)
    elif isinstance(value, dict):
        for v in value.values():
            _check_text(v, field)


@dataclasses.dataclass
class ChoiceSpec:
    index: int
    ids: list[int]
    max_new: int
    sampling: SamplingParams
    seed: int
    stop_ids: tuple[int, ...]
    stop_strings: tuple[str, ...]
    echo: str = ""  # text put before the completion (echo=true)


@dataclasses.dataclass
class Job:
    """One HTTP request, checked: its choices and how to answer."""

    chat: bool
    model: str
    choices: list[ChoiceSpec]
    prompt_tokens: int
    stream: bool = False
    include_usage: bool = False
    adapter: str | None = None  # the LoRA adapter the request named as its model (None: the base)


# ---- request checking (pure) ------------------------------------------------------------------------------------
COMPLETION_FIELDS = {"model", "prompt", "suffix", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options",
                     "stop", "seed", "echo", "logprobs", "best_of", "frequency_penalty", "presence_penalty",
                     "logit_bias", "user"}
CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream",
               "stream_options", "stop", "seed", "logprobs", "top_logprobs", "frequency_penalty", "presence_penalty",
               "logit_bias", "user"}


def _type_name(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool):
        raise APIError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {_type_name(v)}", name)
    if not ((lo < v if lo_open else lo <= v) and v <= hi):
        left = "(" if lo_open else "["
        raise APIError(400, f"'{name}' must be in {left}{lo}, {hi}], got {v}", name)
    return v


def _flag(body: dict, name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise APIError(400, f"'{name}' must be a boolean, got {_type_name(v)}", name)
    return v


def _common(body: Any, fields: set[str], model: str, limits: Limits, adapters: Collection[str] = ()) -> dict:
    """The checks every endpoint shares: an object, known fields, the model (the base's name or a served adapter's),
    sampling, n, seed, stop, stream."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_type_name(body)}")
    for field, value in body.items():
        _check_text(value, field)
    unknown = sorted(set(body) - fields)
    if unknown:
        raise APIError(400, f"unknown field(s) {', '.join(repr(u) for u in unknown)}; this endpoint takes "
                            f"{', '.join(sorted(fields))}", unknown[0])
    name = body.get("model", model)
    if not isinstance(name, str):
        raise APIError(400, f"'model' must be a string, got {_type_name(name)}", "model")
    if name != model and name not in adapters:
        served = ", ".join(repr(m) for m in [model, *adapters])
        raise APIError(404, f"The model '{name}' does not exist; this server serves {served}", "model",
                       "model_not_found")
    for f in ("frequency_penalty", "presence_penalty"):
        if _number(body, f, 0, -2, 2) != 0:
            raise APIError(400, f"'{f}' is not supported by this server (only 0)", f)
    lb = body.get("logit_bias")
    if lb not in (None, {}):
        raise APIError(400, "'logit_bias' is not supported by this server", "logit_bias")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise APIError(400, f"'user' must be a string, got {_type_name(body['user'])}", "user")
    temperature = float(_number(body, "temperature", 1.0, 0, 2))
    top_p = float(_number(body, "top_p", 1.0, 0, 1, lo_open=True))
    n = _number(body, "n", 1, 1, limits.max_n, integer=True)
    seed = _number(body, "seed", None, 0, 2**32 - 1, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a non-empty string or an array of non-empty strings", "stop")
    if len(stop) > MAX_STOPS:
        raise APIError(400, f"'stop' takes at most {MAX_STOPS} sequences, got {len(stop)}", "stop")
    stream = _flag(body, "stream")
    so = body.get("stream_options")
    if so is not None and (not isinstance(so, dict) or set(so) - {"include_usage"}
                           or not isinstance(so.get("include_usage", False), bool)):
        raise APIError(400, "'stream_options' must be {\"include_usage\": true|false}", "stream_options")
    if so is not None and not stream:
        raise APIError(400, "'stream_options' is only allowed with 'stream': true", "stream_options")
    return {"model": name, "adapter": None if name == model else name, "sampling": SamplingParams(temperature=temperature, top_p=top_p), "n": n,
            "seed": seed, "stop": stop, "stream": stream, "include_usage": bool(so and so.get("include_usage"))}


def _max_tokens(body: dict, name: str, prompt_len: int, limits: Limits, default: int | None) -> int:
    """max_tokens checked against the context: prompt + completion must fit in max_len."""
    m = body.get(name)
    if m is None:
        m = default if default is not None else limits.max_len - prompt_len
    elif not isinstance(m, int) or isinstance(m, bool):
        raise APIError(400, f"'{name}' must be an integer, got {_type_name(m)}", name)
    elif m < 1:
        raise APIError(400, f"'{name}' must be >= 1, got {m}", name)
    if prompt_len + m > limits.max_len:
        raise APIError(400, f"This model's maximum context length is {limits.max_len} tokens. However, you requested "
                            f"{prompt_len + max(m, 0)} tokens ({prompt_len} in the prompt, {max(m, 0)} for the "
                            f"completion). Please reduce the prompt or '{name}'.",
                       name if prompt_len < limits.max_len else "prompt", "context_length_exceeded")
    return m


def _stops(tok: Tokenizer, stop: list[str]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The tokenizer's FIM/chat stop ids, plus stops that name a control token (e.g. '<|im_end|>') as ids; the other
    stops stay strings (matched in the text)."""
    special = tok.special_ids
    ids = set(tok.fim_stop_ids) | {special[s] for s in stop if s in special}
    return tuple(sorted(ids)), tuple(s for s in stop if s not in special)


def _seeds(seed: int | None, count: int) -> list[int]:
    """Choice k uses seed + k (so n > 1 gives n different samples, each reproducible); no seed: random ones."""
    if seed is None:
        return [secrets.randbits(32) for _ in range(count)]
    return [(seed + k) % 2**32 for k in range(count)]


def parse_completion(body: Any, tok: Tokenizer, model: str, limits: Limits, adapters: Collection[str] = ()) -> Job:
    """A /v1/completions body -> a Job, or an APIError naming the field. adapters: the LoRA adapters' names."""
    c = _common(body, COMPLETION_FIELDS, model, limits, adapters)
    if body.get("logprobs") not in (None, 0):
        raise APIError(400, "'logprobs' is not supported by this server", "logprobs")
    if body.get("best_of") not in (None, 1, c["n"]):
        raise APIError(400, "'best_of' is not supported by this server (only best_of == n)", "best_of")
    echo = _flag(body, "echo")
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise APIError(400, f"'suffix' must be a string, got {_type_name(suffix)}", "suffix")
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError(400, "'prompt' is required", "prompt")
    # a string, an array of strings, an array of token ids, or an array of token-id arrays
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) and
                                                                                not isinstance(t, bool)
                                                                                for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt) or
                                                   all(isinstance(p, list) for p in prompt)):
        prompts = prompt
    else:
        raise APIError(400, "'prompt' must be a string, an array of strings, an array of token ids or an array of "
                            "token-id arrays", "prompt")
    if len(prompts) * c["n"] > limits.max_n:  # before any tokenizing: a long prompt list is refused at once
        raise APIError(400, f"'prompt' holds {len(prompts)} prompts x n={c['n']}: {len(prompts) * c['n']} choices, at "
                            f"most {limits.max_n} per request", "prompt")
    encoded = []
    for k, p in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{k}]"
        if isinstance(p, str):
            if suffix is not None:
                ids = P.encode(tok, P.fim_prompt(p, suffix))
            else:
                ids = tok.encode_with_special(p)
            text = p
        else:
            if suffix is not None:
                raise APIError(400, "'suffix' needs a text prompt (fill-in-the-middle encodes prefix and suffix)",
                               "suffix")
            bad = [t for t in p if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < tok.vocab_size]
            if bad:
                raise APIError(400, f"{where} has token ids outside [0, {tok.vocab_size}): {bad[:5]}", "prompt")
            ids, text = list(p), tok.decode(p)
        if not ids:
            raise APIError(400, f"{where} is empty: give some text to continue (or a 'suffix' to fill in before)",
                           "prompt")
        encoded.append((ids, text))
    stop_ids, strings = _stops(tok, c["stop"])
    choices = []
    seeds = _seeds(c["seed"], len(encoded) * c["n"])
    for k, (ids, text) in enumerate(encoded):
        max_new = _max_tokens(body, "max_tokens", len(ids), limits, 16)
        for j in range(c["n"]):
            i = k * c["n"] + j
            choices.append(ChoiceSpec(i, ids, max_new, c["sampling"], seeds[i], stop_ids, strings,
                                      text if echo else ""))
    return Job(False, c["model"], choices, sum(len(ids) for ids, _ in encoded), c["stream"], c["include_usage"],
               c["adapter"])


def _message_text(m: Any, k: int) -> dict:
    if not isinstance(m, dict):
        raise APIError(400, f"messages[{k}] must be an object with 'role' and 'content'", "messages")
    role, content = m.get("role"), m.get("content")
    if role not in ("system", "user", "assistant"):
        raise APIError(400, f"messages[{k}].role must be 'system', 'user' or 'assistant', got {role!r}", "messages")
    if isinstance(content, list):  # content parts: only text
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise APIError(400, f"messages[{k}].content parts must be {{\"type\": \"text\", \"text\": str}} (this "
                                "model reads text only)", "messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise APIError(400, f"messages[{k}].content must be a string, got {_type_name(content)}", "messages")
    return {"role": role, "content": content}


def parse_chat(body: Any, tok: Tokenizer, model: str, limits: Limits, adapters: Collection[str] = ()) -> Job:
    """A /v1/chat/completions body -> a Job (ChatML prompt ending with the assistant header), or an APIError."""
    c = _common(body, CHAT_FIELDS, model, limits, adapters)
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        raise APIError(400, "'logprobs' is not supported by this server", "logprobs")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty array of {\"role\", \"content\"} objects", "messages")
    ids = P.encode(tok, P.chat_prompt([_message_text(m, k) for k, m in enumerate(msgs)]))
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_new = _max_tokens(body, name, len(ids), limits, None)
    stop_ids, strings = _stops(tok, c["stop"])
    seeds = _seeds(c["seed"], c["n"])
    choices = [ChoiceSpec(j, ids, max_new, c["sampling"], seeds[j], stop_ids, strings) for j in range(c["n"])]
    return Job(True, c["model"], choices, len(ids), c["stream"], c["include_usage"], c["adapter"])


# ---- running a job ----------------------------------------------------------------------------------------------
class Run:
    """A job's choices in the engine: events come back from the engine thread into an asyncio queue; text comes out
    through one TextStream per choice (stop strings cut the text and free the slot at once)."""

    def __init__(self, job: Job, engine: Engine, tok: Tokenizer, loop: asyncio.AbstractEventLoop):
        self.job, self.engine = job, engine
        self.queue: asyncio.Queue = asyncio.Queue()
        self.streams = [TextStream(tok.decode, c.stop_ids, c.stop_strings) for c in job.choices]
        self.tokens = [0] * len(job.choices)
        self.finish: list[str | None] = [None] * len(job.choices)

        def post(k: int) -> Callable[[list[int], str | None], None]:
            return lambda toks, fin: loop.call_soon_threadsafe(self.queue.put_nowait, (k, toks, fin))

        self.reqs = [Request(c.ids, c.max_new, c.sampling, c.seed, c.stop_ids, on_event=post(k), adapter=job.adapter)
                     for k, c in enumerate(job.choices)]

    def submit(self) -> None:
        try:
            self.engine.submit(self.reqs)
        except QueueFull as e:
            raise APIError(429, f"The server is busy: {e}", code="rate_limit_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def cancel(self) -> None:
        """Free every unfinished choice's slot (the client went away)."""
        for k, r in enumerate(self.reqs):
            if self.finish[k] is None:
                self.engine.cancel(r)

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    async def pieces(self, timeout: float | None = None) -> AsyncIterator[tuple[int, str, str | None]]:
        """(choice, new text, finish_reason or None) as tokens arrive, until every choice has finished. With a
        timeout, yields (-1, "", None) when nothing came for that long (a chance to check the client)."""
        while not self.done:
            try:
                k, toks, fin = await asyncio.wait_for(self.queue.get(), timeout)
            except asyncio.TimeoutError:
                yield -1, "", None
                continue
            if self.finish[k] is not None:
                continue  # a choice already cut at a stop string: later events don't count
            ts = self.streams[k]
            self.tokens[k] += len(toks)
            piece = ts.feed(toks)
            if ts.stopped and fin is None:  # a stop string in the text: free the pages now
                self.engine.cancel(self.reqs[k], "stop")
                fin = "stop"
            if fin is not None:
                if fin == "error":
                    raise APIError(500, "generation failed on the device (see the server log)", type="server_error")
                piece += ts.flush()
                fin = "stop" if (ts.stopped or fin in ("stop", "cancelled")) else "length"
                self.finish[k] = fin
            yield k, piece, fin

    def usage(self) -> dict:
        done = sum(self.tokens)
        cached = min(r.cached_tokens for r in self.reqs)  # what the prompt found cached before any choice ran
        return {"prompt_tokens": self.job.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.job.prompt_tokens + done, "prompt_tokens_details": {"cached_tokens": cached}}


def _envelope(job: Job, rid: str, created: int, chunk: bool) -> dict:
    obj = ("chat.completion.chunk" if chunk else "chat.completion") if job.chat else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": job.model}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def stream_events(run: Run, rid: str, created: int) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk shapes, ending with `data: [DONE]`."""
    job = run.job
    if job.chat:
        for c in job.choices:
            yield _sse(_envelope(job, rid, created, True) | {"choices": [
                {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}]})
    else:
        for c in job.choices:
            if c.echo:
                yield _sse(_envelope(job, rid, created, True) | {"choices": [
                    {"index": c.index, "text": c.echo, "logprobs": None, "finish_reason": None}]})
    try:
        async for k, piece, fin in run.pieces():
            if not piece and fin is None:
                continue
            if job.chat:
                choice = {"index": k, "delta": {"content": piece} if piece else {}, "logprobs": None,
                          "finish_reason": fin}
            else:
                choice = {"index": k, "text": piece, "logprobs": None, "finish_reason": fin}
            out = _envelope(job, rid, created, True) | {"choices": [choice]}
            if job.include_usage:
                out["usage"] = None
            yield _sse(out)
    except APIError as e:
        yield _sse(e.body())
        return
    if job.include_usage:
        yield _sse(_envelope(job, rid, created, True) | {"choices": [], "usage": run.usage()})
    yield "data: [DONE]\n\n"


async def collect(run: Run, rid: str, created: int, disconnected: Callable[[], Any]) -> dict | None:
    """The whole response (stream=false); None (and the choices cancelled) when the client goes away meanwhile."""
    job = run.job
    texts = [c.echo for c in job.choices]
    async for k, piece, fin in run.pieces(timeout=1.0):
        if k < 0:
            if await disconnected():
                run.cancel()
                return None
            continue
        texts[k] += piece
    if job.chat:
        choices = [{"index": c.index, "message": {"role": "assistant", "content": texts[c.index]}, "logprobs": None,
                    "finish_reason": run.finish[c.index]} for c in job.choices]
    else:
        choices = [{"index": c.index, "text": texts[c.index], "logprobs": None, "finish_reason": run.finish[c.index]}
                   for c in job.choices]
    return _envelope(job, rid, created, False) | {"choices": choices, "usage": run.usage()}


# ---- the app --------------------------------------------------------------------------------------------------------
def create_app(engine: Engine, tok: Tokenizer, model: str, api_key: str | None = None):
    """The FastAPI app. api_key: when set, /v1/* needs `Authorization: Bearer <api_key>` (/health stays open)."""
    app = FastAPI(title="qcjax", description="OpenAI-compatible completions for Qwen2.5-Coder", docs_url=None,
                  redoc_url=None, openapi_url=None)
    limits = Limits(max_len=engine.max_len, max_n=engine.max_rows)

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(_, e: HTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        log.exception("request failed")
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}").body(), status_code=500)

    def authorize(request: HTTPRequest) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not got:
            raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        scheme, _, key = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    async def json_body(request: HTTPRequest) -> Any:
        """The body, read up to limits.max_body bytes (413 beyond), parsed off the event loop."""
        if int(request.headers.get("content-length") or 0) > limits.max_body:
            raise APIError(413, f"the request body is over {limits.max_body} bytes")
        raw = bytearray()
        try:
            async with asyncio.timeout(limits.read_timeout):
                async for part in request.stream():
                    raw += part
                    if len(raw) > limits.max_body:
                        raise APIError(413, f"the request body is over {limits.max_body} bytes")
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {limits.read_timeout:g} s") from None
        try:
            return await asyncio.to_thread(json.loads, bytes(raw))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None

    async def serve(request: HTTPRequest, parse: Callable[..., Job], prefix: str):
        authorize(request)
        # checking and tokenizing run on a worker thread: /health and streams stay responsive meanwhile
        job = await asyncio.to_thread(parse, await json_body(request), tok, model, limits, served_adapters())
        run = Run(job, engine, tok, asyncio.get_running_loop())
        run.submit()
        rid, created = f"{prefix}-{secrets.token_hex(12)}", int(time.time())
        if job.stream:
            return _EventStream(stream_events(run, rid, created), on_close=run.cancel)
        try:
            out = await collect(run, rid, created, request.is_disconnected)
        finally:
            run.cancel()
        return out if out is not None else JSONResponse({}, status_code=499)  # nobody is listening

    class _EventStream(StreamingResponse):
        """An SSE response that frees the engine slots however it ends (done, or the client went away)."""

        def __init__(self, content, on_close: Callable[[], None]):
            super().__init__(content, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self._on_close = on_close

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self._on_close()

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await serve(request, parse_completion, "cmpl")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await serve(request, parse_chat, "chatcmpl")

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        authorize(request)
        base = {"id": model, "object": "model", "created": 0, "owned_by": "qcjax", "root": model, "parent": None,
                "max_model_len": engine.max_len}
        return {"object": "list", "data": [base] + [
            {**base, "id": name, "root": source, "parent": model} for name, source in adapter_sources().items()]}

    def served_adapters() -> list[str]:
        return engine.lora.names() if engine.lora is not None else []

    def adapter_sources() -> dict[str, str]:
        return engine.lora.sources() if engine.lora is not None else {}

    def lora_updates() -> Any:
        if engine.lora is None:
            raise APIError(404, "this server serves no LoRA adapters (start it with --max_loras N)")
        return engine.lora

    def _name(body: Any, field: str = "lora_name") -> str:
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, got {_type_name(body)}")
        name = body.get(field)
        if not isinstance(name, str) or not name:
            raise APIError(400, f"'{field}' must be a non-empty string", field)
        return name

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: HTTPRequest):
        """{"lora_name": NAME, "lora_path": PATH} (vLLM's endpoint): read and check the adapter off the event loop
        and the engine's thread, then register it; its first request copies it into a device slot."""
        authorize(request)
        slots = lora_updates()
        body = await json_body(request)
        name, path = _name(body), _name(body, "lora_path")
        if name == model:
            raise APIError(400, f"'lora_name' {name!r} is the base model's name", "lora_name")
        if name in slots:
            raise APIError(400, f"an adapter named {name!r} is already loaded (unload it first)", "lora_name")
        from qcjax.inference.lora import read_adapter

        try:
            adapter = await asyncio.to_thread(read_adapter, path, engine.cfg)
            slots.add(name, adapter)
        except ValueError as e:
            raise APIError(400, str(e), "lora_path") from None
        log.info("loaded LoRA adapter %r from %s (rank %d, targets %s)", name, path, adapter.rank,
                 ",".join(adapter.targets))
        return Response(f"Success: LoRA adapter '{name}' added successfully.", media_type="text/plain")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: HTTPRequest):
        """{"lora_name": NAME}: no new request may name it; rows already running with it finish with it."""
        authorize(request)
        slots = lora_updates()
        name = _name(await json_body(request))
        try:
            slots.remove(name)
        except KeyError:
            raise APIError(404, f"The adapter '{name}' is not loaded", "lora_name", "model_not_found") from None
        log.info("unloaded LoRA adapter %r", name)
        return Response(f"Success: LoRA adapter '{name}' removed successfully.", media_type="text/plain")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model, **engine.stats()}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    return app
