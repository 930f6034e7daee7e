"""An OpenAI-compatible completions server on the continuous-batching engine (serving.SlotEngine).

    python serve.py --out_dir=out-shakespeare-char-cpu          # http://127.0.0.1:8000/
    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "ROMEO:", "max_tokens": 50, "temperature": 0.8, "seed": 1}'

Routes: POST /v1/completions (OpenAI's completions API: prompt as a string, a list of strings, a
list of token ids or a list of those; max_tokens, temperature, top_p, n, stop, seed, stream,
logprobs, echo; top_k as an extension), POST /v1/chat/completions for a model finetuned on
conversations (messages rendered with its jaxgpt.chat template, the same sampling fields, replies
ending at <|end|>; docs/chat.md), GET /v1/models, GET /health, and a page at / to try it.

How a request runs. It is checked whole before anything is queued (a bad one is a 400 in
OpenAI's error shape naming the field), then split into one job per prompt and choice. Jobs wait
in a bounded queue (full: 429 with Retry-After); one engine thread admits them into free slots
between decode chunks, runs a chunk, and hands each job its tokens. Choice j of a request with
seed s draws with key fold_in(key(s), j): what sample.py --seed=s prints as its sample j, whatever
else the server is decoding. A job ends at max_tokens, at a stop string, at the end-of-text token
(BPE models), or when its client goes away (its slot is free at the next chunk). Without a seed a
request gets a random one.

What was chosen where OpenAI's API is silent or does not apply: logprobs are the model's own
(temperature 1, before top_k/top_p), over the tokenizer's vocabulary; the prompt plus max_tokens
must fit in the model's context (block_size), else 400 naming max_tokens (no sliding window);
fields this server does not implement (presence/frequency penalties, logit_bias, suffix, best_of
other than n) are refused by name when set to anything but their neutral value; unknown fields
are refused by name too.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import gc
import json
import math
import os
import secrets
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from jaxgpt.errors import UserError
from jaxgpt.serving import SlotEngine

MAX_N = 128  # choices per request (OpenAI's limit)
MAX_STOPS = 4


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None, status: int = 400, headers: dict | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.headers, self.kind = message, param, status, headers or {}, kind


def error_body(message: str, param: str | None, kind: str = "invalid_request_error") -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


# -- the jobs and the engine thread -------------------------------------------------------------------


def cut_at_stops(text: str, stops: list[str]) -> tuple[str, bool]:
    """text up to the earliest stop string, and whether one was found."""
    at = min((i for s in stops if s and (i := text.find(s)) >= 0), default=-1)
    return (text[:at], True) if at >= 0 else (text, False)


def held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of text might still become a stop string."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


@dataclass
class Job:
    """One choice of one request: a prompt decoded in one slot."""
    prompt: list[int]
    index: int  # the choice's index in the response
    draw: tuple[int, int]  # (seed, choice): its key is fold_in(key(seed), choice), sample.py's sample `choice`
    settings: dict  # temperature, top_k, top_p
    max_tokens: int
    stops: list[str]
    logprobs: int | None  # alternatives per token, or None
    echo: bool
    post: Callable[[dict], None]  # called from the engine thread with each event
    tokens: list[int] = field(default_factory=list)
    lps: list[float] = field(default_factory=list)
    tops: list[dict] = field(default_factory=list)
    prompt_lp: Any = None
    shown: int = 0  # characters of the completion already streamed
    shown_tokens: int = 0  # tokens whose logprobs were streamed
    cancelled: bool = False
    stop_token: int | None = None  # a chat reply ends at the template's <|end|>


class Scheduler:
    """The engine thread: admits queued jobs into free slots between chunks, runs chunks, ends jobs."""

    def __init__(self, engine: SlotEngine, tokenizer, queue_size: int, log: Callable[[str], None] = print):
        self.engine, self.tok, self.queue_size, self.log = engine, tokenizer, queue_size, log
        self.eot = getattr(tokenizer, "eot", None)
        self.pending: collections.deque[Job] = collections.deque()
        self.running: dict[int, Job] = {}
        self.cond = threading.Condition()
        self.stopping = False
        self.stats = collections.Counter()
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._token_text: dict[int, str] = {}

    def start(self):
        self.thread.start()

    def stop(self):
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout=60)

    def submit(self, jobs: list[Job]) -> None:
        with self.cond:
            if len(self.pending) + len(jobs) > self.queue_size:
                self.stats["refused_full"] += 1
                retry = max(1, math.ceil(len(self.pending) / max(1, self.engine.N)))
                raise BadRequest(f"the server is busy: {len(self.pending)} choices are waiting (queue size "
                                 f"{self.queue_size}); retry after {retry} s", None, 429, {"Retry-After": str(retry)},
                                 kind="rate_limit_error")
            self.pending.extend(jobs)
            self.cond.notify_all()

    def cancel(self, jobs: list[Job]) -> None:
        for j in jobs:
            j.cancelled = True
        with self.cond:
            self.cond.notify_all()

    def health(self) -> dict:
        with self.cond:
            return {"slots": self.engine.N, "busy": len(self.running), "queued": len(self.pending),
                    **{k: int(v) for k, v in self.stats.items()}}

    # engine thread ------------------------------------------------------------------------------

    def _loop(self):
        try:
            while True:
                with self.cond:
                    while not self.pending and not self.running and not self.stopping:
                        self.cond.wait()
                    if self.stopping and not self.running and not self.pending:
                        return
                    admit = []
                    while self.pending and len(admit) < len(self.engine.free):
                        job = self.pending.popleft()
                        if not job.cancelled:
                            admit.append(job)
                if admit:
                    self._admit(admit)
                for slot, job in list(self.running.items()):
                    if job.cancelled:
                        self._end(slot, job, None)
                if self.running:
                    chunk = self.engine.step()
                    for slot, job in list(self.running.items()):
                        self._feed(slot, job, chunk)
        except Exception:  # noqa: BLE001 -- the engine failed: every waiting client gets a 500, the log the cause
            self.log("engine thread failed:\n" + traceback.format_exc())
            with self.cond:
                jobs = list(self.running.values()) + list(self.pending)
                self.running.clear()
                self.pending.clear()
                self.stopping = True
            for job in jobs:
                job.post({"error": "the engine failed; see the server's log"})

    def _admit(self, jobs: list[Job]):
        """Prefills the jobs into free slots: those without echo's prompt logprobs together (one
        engine.join_many, one compiled call per prompt bucket), the others one at a time."""
        key = dict(zip(map(id, jobs), self.engine.keys([job.draw for job in jobs])))  # one engine call for the batch
        together = [job for job in jobs if not (job.echo and job.logprobs is not None)]
        slots = self.engine.join_many([dict(prompt=job.prompt, key_data=key[id(job)], **job.settings,
                                            logprobs=job.logprobs is not None) for job in together])
        slot_of = {id(job): slot for job, slot in zip(together, slots)}
        for job in jobs:
            if id(job) in slot_of:
                slot, pre = slot_of[id(job)], None
            else:
                slot, pre = self.engine.join(job.prompt, key[id(job)], **job.settings, echo=True, logprobs=True)
            with self.cond:
                self.running[slot] = job
            job.prompt_lp = pre
            self.stats["admitted"] += 1
            if job.echo:
                job.post({"index": job.index, "echo": True, "text": self.tok.decode(job.prompt),
                          "logprobs": self._prompt_logprobs(job) if job.logprobs is not None else None})
            if job.max_tokens == 0:
                self._end(slot, job, "length")

    def _feed(self, slot: int, job: Job, chunk) -> None:
        finish = None
        for i, t in enumerate(chunk.tokens[slot]):
            if len(job.tokens) >= job.max_tokens:
                break
            t = int(t)
            if t == self.eot or t == job.stop_token:
                finish = "stop"
                break
            job.tokens.append(t)
            if job.logprobs is not None:
                job.lps.append(float(chunk.logprobs[slot, i]))
                job.tops.append({self._text(int(a)): float(v) for a, v in
                                 zip(chunk.top_ids[slot, i, :job.logprobs], chunk.top_logprobs[slot, i, :job.logprobs])})
        text = self.tok.decode(job.tokens)
        text, stopped = cut_at_stops(text, job.stops)
        if stopped:
            finish = "stop"
        elif finish is None and len(job.tokens) >= job.max_tokens:
            finish = "length"
        if finish is None:  # hold back what may still change: a stop string's start, half a character
            visible = text[:len(text) - held_back(text, job.stops)].rstrip("\ufffd")
        else:
            visible = text
        if len(visible) > job.shown:
            job.post({"index": job.index, "text": visible[job.shown:], "logprobs": self._delta_logprobs(job, visible)})
            job.shown = len(visible)
        if finish is not None or job.cancelled:
            self._end(slot, job, finish, text)

    def _end(self, slot: int, job: Job, finish: str | None, text: str | None = None) -> None:
        self.engine.leave(slot)
        with self.cond:
            self.running.pop(slot, None)
        if finish is None:  # its client went away
            self.stats["disconnected"] += 1
            return
        self.stats["completed"] += 1
        if text is None:
            text = cut_at_stops(self.tok.decode(job.tokens), job.stops)[0]
        n = self._tokens_in(job, text)
        job.post({"index": job.index, "done": True, "finish_reason": finish, "completion": text,
                  "completion_tokens": len(job.tokens), "logprobs": self._logprobs(job, n)})

    # logprobs in OpenAI's shape -------------------------------------------------------------------

    def _text(self, t: int) -> str:
        if t not in self._token_text:
            self._token_text[t] = self.tok.decode([t])
        return self._token_text[t]

    def _tokens_in(self, job: Job, text: str) -> int:
        """How many of the job's tokens the (possibly cut) text holds, counting a partly shown one."""
        for k in range(len(job.tokens) + 1):
            if len(self.tok.decode(job.tokens[:k])) >= len(text):
                return k
        return len(job.tokens)

    def _prompt_logprobs(self, job: Job) -> dict:
        pre = job.prompt_lp
        toks = [self._text(t) for t in job.prompt]
        tops = [None] + [{self._text(int(a)): float(v) for a, v in zip(ids[:job.logprobs], vals[:job.logprobs])}
                         for ids, vals in zip(pre.top_ids, pre.top_logprobs)]
        offsets = list(np.cumsum([0] + [len(t) for t in toks[:-1]]).tolist())
        return {"tokens": toks, "token_logprobs": [None] + [float(x) for x in pre.logprobs],
                "top_logprobs": tops, "text_offset": offsets}

    def _logprobs(self, job: Job, n: int, start: int = 0) -> dict | None:
        if job.logprobs is None:
            return None
        toks = [self._text(t) for t in job.tokens[start:n]]
        base = len(self.tok.decode(job.prompt)) if job.echo else 0
        base += len(self.tok.decode(job.tokens[:start]))
        return {"tokens": toks, "token_logprobs": job.lps[start:n], "top_logprobs": job.tops[start:n],
                "text_offset": list((base + np.cumsum([0] + [len(t) for t in toks[:-1]])).tolist()) if toks else []}

    def _delta_logprobs(self, job: Job, visible: str) -> dict | None:
        if job.logprobs is None:
            return None
        n = self._tokens_in(job, visible)
        out = self._logprobs(job, n, job.shown_tokens)
        job.shown_tokens = n
        return out


# -- the request: checked whole, as OpenAI's API has it --------------------------------------------


KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream", "logprobs",
         "echo", "user", "presence_penalty", "frequency_penalty", "logit_bias", "suffix", "best_of", "stream_options"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body, name, default, lo, hi, lo_open=False):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BadRequest(f"{name} must be a number, got {json.dumps(v)}", name)
    if v < lo or (lo_open and v == lo) or v > hi:
        raise BadRequest(f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v}", name)
    return float(v)


def _integer(body, name, default, lo, hi, hint=""):
    v = body.get(name, default)
    if v is None:
        return default
    if not _is_int(v):
        raise BadRequest(f"{name} must be an integer, got {json.dumps(v)}", name)
    if not lo <= v <= hi:
        raise BadRequest(f"{name} must be in [{lo}, {hi}], got {v}{hint}", name)
    return v


@dataclass
class Request:
    prompts: list[list[int]]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    n: int
    stops: list[str]
    seed: int
    stream: bool
    logprobs: int | None
    echo: bool
    include_usage: bool


def parse_request(body: Any, tok, *, block_size: int, max_prompt: int, max_tokens_limit: int) -> Request:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", None)
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise BadRequest(f"unrecognized request argument: {unknown[0]}", unknown[0])
    for name, neutral in (("presence_penalty", 0), ("frequency_penalty", 0), ("suffix", None)):
        if body.get(name, neutral) not in (neutral, None):
            raise BadRequest(f"{name} is not supported by this server; leave it out", name)
    if body.get("logit_bias") not in (None, {}):
        raise BadRequest("logit_bias is not supported by this server; leave it out", "logit_bias")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest(f"model must be a string, got {json.dumps(model)}", "model")
    if "prompt" not in body:
        raise BadRequest("prompt is required: a string, a list of strings, or token ids", "prompt")
    prompts = _prompts(body["prompt"], tok)
    n = _integer(body, "n", 1, 1, MAX_N)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise BadRequest("best_of is not supported by this server (other than best_of = n); leave it out", "best_of")
    max_tokens = _integer(body, "max_tokens", 16, 0, max_tokens_limit,
                          f" (this server's limit is {max_tokens_limit})")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise BadRequest(f"echo must be true or false, got {json.dumps(echo)}", "echo")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"stream must be true or false, got {json.dumps(stream)}", "stream")
    opts = body.get("stream_options")
    if opts is not None and not (isinstance(opts, dict) and isinstance(opts.get("include_usage", False), bool)):
        raise BadRequest("stream_options must be an object like {\"include_usage\": true}", "stream_options")
    for p in prompts:
        if not p and not (echo and max_tokens == 0):
            raise BadRequest("a prompt is empty: give at least one token", "prompt")
        if len(p) > max_prompt:
            raise BadRequest(f"a prompt has {len(p)} tokens, more than this server's limit of {max_prompt}", "prompt")
        if len(p) + max_tokens > block_size:
            raise BadRequest(f"the prompt ({len(p)} tokens) plus max_tokens ({max_tokens}) is more than the model's "
                             f"context of {block_size} tokens; ask for max_tokens <= {max(0, block_size - len(p))}",
                             "max_tokens")
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise BadRequest(f"stop must be a string or a list of strings, got {json.dumps(stop)}", "stop")
    if len(stops) > MAX_STOPS:
        raise BadRequest(f"stop may hold at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    logprobs = body.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= 5):
        raise BadRequest(f"logprobs must be an integer in [0, 5], got {json.dumps(logprobs)}", "logprobs")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbits(32)
    elif not _is_int(seed):
        raise BadRequest(f"seed must be an integer, got {json.dumps(seed)}", "seed")
    return Request(prompts, max_tokens, _number(body, "temperature", 1.0, 0, 2), _number(body, "top_p", 1.0, 0, 1, True),
                   _integer(body, "top_k", 0, 0, 1 << 30, " (0 = no limit)"), n, [s for s in stops if s],
                   seed % (1 << 32), stream, logprobs, echo, bool((opts or {}).get("include_usage")))


CHAT_KNOWN = (KNOWN - {"prompt", "echo", "logprobs", "suffix", "best_of"}) | {
    "messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice",
    "parallel_tool_calls"}


def parse_chat_request(body: Any, template, *, block_size: int, max_prompt: int, max_tokens_limit: int) -> Request:
    """A /v1/chat/completions body: its messages rendered with the model's chat template (the prompt ends
    with the assistant's turn start), the sampling fields as parse_request reads them."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", None)
    unknown = sorted(set(body) - CHAT_KNOWN)
    if unknown:
        raise BadRequest(f"unrecognized request argument: {unknown[0]}", unknown[0])
    if template is None:
        raise BadRequest("this model was not trained on conversations (it has no chat template); use /v1/completions, "
                         "or finetune it on chat data (docs/chat.md)", "messages")
    for name in ("tools", "tool_choice", "parallel_tool_calls", "response_format", "top_logprobs"):
        if body.get(name) is not None:
            raise BadRequest(f"{name} is not supported by this server; leave it out", name)
    if body.get("logprobs") not in (None, False):
        raise BadRequest("logprobs is not supported for chat by this server; leave it out", "logprobs")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("messages is required: a list of {\"role\", \"content\"} objects", "messages")
    plain = []
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        role = "system" if role == "developer" else role  # OpenAI's newer name for the system role
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # OpenAI's content parts: the text ones, joined
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise BadRequest(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(c["text"] for c in content)
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise BadRequest(f"messages[{i}] must have a role (system, user or assistant) and a string content",
                             "messages")
        plain.append({"role": role, "content": content})
    if "max_completion_tokens" in body:
        if "max_tokens" in body and body["max_tokens"] != body["max_completion_tokens"]:
            raise BadRequest("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    prompt = template.prompt(plain)
    if "max_tokens" not in body or body["max_tokens"] is None:  # a reply may run to the end of the context
        body = {**body, "max_tokens": max(1, min(block_size - len(prompt), max_tokens_limit))}
    if len(prompt) > min(block_size, max_prompt) - 1:
        raise BadRequest(f"the messages are {len(prompt)} tokens with the chat template, more than this server's "
                         f"limit of {min(block_size, max_prompt) - 1} (context {block_size}); send fewer or shorter "
                         f"messages", "messages")
    rest = {k: v for k, v in body.items() if k in KNOWN and k not in ("logprobs", "prompt")}
    return parse_request({**rest, "prompt": prompt}, template, block_size=block_size, max_prompt=max_prompt,
                         max_tokens_limit=max_tokens_limit)


def _prompts(prompt, tok) -> list[list[int]]:
    vocab = tok.vocab_size

    def ids(p):
        if not all(_is_int(t) and 0 <= t < vocab for t in p):
            raise BadRequest(f"token ids in prompt must be integers in [0, {vocab})", "prompt")
        return list(p)

    def encode(text):
        try:
            return tok.encode(text)
        except UserError as e:
            raise BadRequest(f"prompt: {e}", "prompt") from None

    if isinstance(prompt, str):
        return [encode(prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [encode(p) for p in prompt]
        if all(_is_int(t) for t in prompt):
            return [ids(prompt)]
        if all(isinstance(p, list) for p in prompt):
            return [ids(p) for p in prompt]
    raise BadRequest("prompt must be a string, a list of strings, a list of token ids or a list of those", "prompt")


# -- the HTTP app ------------------------------------------------------------------------------------


class Server:
    """The app's state: the engine, its scheduler and the model's name; `app` is the Starlette app."""

    def __init__(self, engine: SlotEngine, tokenizer, *, model_name: str, queue_size: int = 64,
                 max_prompt: int = 0, max_tokens: int = 0, log: Callable[[str], None] = print, template=None):
        """template: a chat model's jaxgpt.chat.Template (POST /v1/chat/completions renders with it, and it
        is the tokenizer of both endpoints: its tokens never show in text); None: no chat."""
        tokenizer = template or tokenizer
        self.template = template
        self.engine, self.tok, self.model_name, self.log = engine, tokenizer, model_name, log
        self.block_size = engine.S
        self.max_prompt = min(max_prompt or engine.S, engine.S)
        self.max_tokens = min(max_tokens or engine.S, engine.S)
        self.scheduler = Scheduler(engine, tokenizer, queue_size, log)
        self.draining = False
        self.created = int(time.time())
        self.app = self._make_app()

    def drain(self) -> None:
        """Refuse new requests from now on; the ones in flight finish."""
        self.draining = True

    def _make_app(self):
        from contextlib import asynccontextmanager

        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
        from starlette.routing import Route

        @asynccontextmanager
        async def lifespan(app):
            # What the process built before serving (jax, the model, the compiled programs: a large
            # heap that lives as long as the server) is set aside from the cyclic garbage collector.
            # Scanning it in a full collection stopped every thread for about 70 ms, once every few
            # hundred requests: the slow round of serve_bench and its p99 time to first token.
            gc.collect()
            gc.freeze()
            self.scheduler.start()
            yield
            self.scheduler.stop()
            gc.unfreeze()

        def error(e: BadRequest):
            return JSONResponse(error_body(e.message, e.param, e.kind), status_code=e.status, headers=e.headers)

        async def page(request):
            return HTMLResponse(PAGE)

        async def health(request):
            status = "draining" if self.draining else "ok"
            return JSONResponse({"status": status, **self.scheduler.health()}, status_code=503 if self.draining else 200)

        async def models(request):
            return JSONResponse({"object": "list", "data": [{"id": self.model_name, "object": "model",
                                                             "created": self.created, "owned_by": "jaxgpt"}]})

        async def completions(request):
            return await handle(request, chat=False)

        async def chat_completions(request):
            return await handle(request, chat=True)

        async def handle(request, chat: bool):
            if self.draining:
                return error(BadRequest("the server is shutting down; retry on another one", None, 503,
                                        {"Retry-After": "5"}, kind="server_error"))
            try:
                raw = await request.body()
                try:
                    body = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise BadRequest(f"the request body is not valid JSON: {e}", None) from None
                parse = functools.partial(parse_chat_request, template=self.template) if chat else \
                    functools.partial(parse_request, tok=self.tok)
                req = parse(body, block_size=self.block_size, max_prompt=self.max_prompt,
                            max_tokens_limit=self.max_tokens)
                loop = asyncio.get_running_loop()
                events: asyncio.Queue = asyncio.Queue()
                post = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)  # noqa: E731
                jobs = [Job(p, i * req.n + j, (req.seed, j),
                            dict(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p),
                            req.max_tokens, req.stops, req.logprobs, req.echo, post,
                            stop_token=self.template.ids["end"] if chat else None)
                        for i, p in enumerate(req.prompts) for j in range(req.n)]
                self.scheduler.submit(jobs)
            except BadRequest as e:
                return error(e)
            head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}",
                    "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                    "model": self.model_name}
            prompt_tokens = sum(len(p) for p in req.prompts) * req.n
            if req.stream:
                if chat:
                    head["object"] = "chat.completion.chunk"
                return StreamingResponse(self._stream(request, jobs, events, head, prompt_tokens, req, chat),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            return await self._whole(request, jobs, events, head, prompt_tokens, chat)

        async def not_found(request, exc):
            code = getattr(exc, "status_code", 500)
            msg = {404: f"no route {request.url.path}: try POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health or /",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(code, str(getattr(exc, "detail", "")))
            return JSONResponse(error_body(msg, None), status_code=code)

        async def crashed(request, exc):
            self.log("request failed:\n" + "".join(traceback.format_exception(exc)))
            return JSONResponse(error_body("internal error; see the server's log", None, "server_error"),
                                status_code=500)

        routes = [Route("/", page), Route("/health", health), Route("/v1/models", models),
                  Route("/v1/completions", completions, methods=["POST"]),
                  Route("/v1/chat/completions", chat_completions, methods=["POST"])]
        return Starlette(routes=routes, lifespan=lifespan,
                         exception_handlers={HTTPException: not_found, Exception: crashed})

    async def _next(self, request, events, jobs):
        """The next event; when the client went away, cancels the jobs (their slots free at the next chunk)."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.scheduler.cancel(jobs)
                    raise asyncio.CancelledError from None

    async def _whole(self, request, jobs, events, head, prompt_tokens, chat: bool = False):
        from starlette.responses import JSONResponse

        choices: dict[int, dict] = {}
        echo: dict[int, dict] = {}
        try:
            while len(choices) < len(jobs):
                ev = await self._next(request, events, jobs)
                if "error" in ev:
                    return JSONResponse(error_body(ev["error"], None, "server_error"), status_code=500)
                if ev.get("done"):
                    choices[ev["index"]] = ev
                elif ev.get("echo"):
                    echo[ev["index"]] = ev
        except asyncio.CancelledError:
            self.scheduler.cancel(jobs)
            raise
        out = []
        for i in sorted(choices):
            ev, pre = choices[i], echo.get(i)
            text = (pre["text"] if pre else "") + ev["completion"]
            lp = ev["logprobs"]
            if pre is not None and pre.get("logprobs") is not None:
                lp = {k: pre["logprobs"][k] + (lp[k] if lp else []) for k in pre["logprobs"]}
            if chat:  # OpenAI's chat shape: the reply as the assistant's message
                out.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                            "finish_reason": ev["finish_reason"]})
                continue
            out.append({"text": text, "index": i, "logprobs": lp, "finish_reason": ev["finish_reason"]})
        completion_tokens = sum(c["completion_tokens"] for c in choices.values())
        return JSONResponse({**head, "choices": out, "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}})

    async def _stream(self, request, jobs, events, head, prompt_tokens, req, chat: bool = False):
        def sse(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        def as_chat(c: dict) -> dict:  # a completion chunk's choice in the chat shape (delta)
            delta = {"content": c["text"]} if c["finish_reason"] is None else {}
            return {"index": c["index"], "delta": delta, "logprobs": None, "finish_reason": c["finish_reason"]}

        done = 0
        completion_tokens = 0
        try:
            if chat:  # the assistant's role first, one chunk per choice, as OpenAI streams
                for i in range(len(jobs)):
                    yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})
            while done < len(jobs):
                ev = await self._next(request, events, jobs)
                if "error" in ev:
                    yield sse(error_body(ev["error"], None, "server_error"))
                    break
                if ev.get("done"):
                    done += 1
                    completion_tokens += ev["completion_tokens"]
                    choice = {"text": "", "index": ev["index"], "logprobs": None, "finish_reason": ev["finish_reason"]}
                else:
                    choice = {"text": ev["text"], "index": ev["index"], "logprobs": ev.get("logprobs"),
                              "finish_reason": None}
                yield sse({**head, "choices": [as_chat(choice) if chat else choice]})
            if req.include_usage:
                yield sse({**head, "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                            "completion_tokens": completion_tokens,
                                                            "total_tokens": prompt_tokens + completion_tokens}})
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or the stream ended): nothing more to decode for it
            self.scheduler.cancel(jobs)


def run(server: Server, host: str, port: int, log: Callable[[str], None] = print) -> None:
    """Serves until SIGTERM or Ctrl-C: then refuses new requests, finishes the ones in flight, exits."""
    import uvicorn

    class Graceful(uvicorn.Server):
        def handle_exit(self, sig, frame):  # uvicorn's, without raising the signal again at the end: exit 0
            if self.should_exit and sig == signal.SIGINT:  # a second Ctrl-C: stop now
                self.force_exit = True
                return
            server.drain()
            log(f"signal {sig}: refusing new requests, finishing {server.scheduler.health()['busy']} in flight")
            self.should_exit = True

    config = uvicorn.Config(server.app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=None)
    Graceful(config).run()


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>jaxgpt</title><link rel="icon" href="data:,">
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; }
textarea { width: 100%; height: 7rem; font-family: monospace; }
fieldset { display: flex; flex-wrap: wrap; gap: .8rem; border: none; padding: 0; margin: .8rem 0; }
label { display: flex; flex-direction: column; font-size: .85rem; }
input { width: 7rem; }
#out { white-space: pre-wrap; font-family: monospace; border: 1px solid #ccc; padding: .8rem; min-height: 6rem; }
#out .prompt { color: #777; }
#status { color: #555; font-size: .85rem; margin: .4rem 0; }
#status.error { color: #b00; }
</style></head>
<body>
<h1>jaxgpt <small id="model"></small></h1>
<form id="form">
<textarea id="prompt" placeholder="Type a prompt">ROMEO:</textarea>
<fieldset>
<label>max tokens <input id="max_tokens" type="number" value="200" min="0"></label>
<label>temperature <input id="temperature" type="number" value="0.8" min="0" max="2" step="0.05"></label>
<label>top_p <input id="top_p" type="number" value="1" min="0" max="1" step="0.05"></label>
<label>top_k (0 = off) <input id="top_k" type="number" value="200" min="0"></label>
<label>seed (empty = random) <input id="seed" type="number"></label>
<label>stop <input id="stop" type="text" placeholder="none"></label>
</fieldset>
<button id="go" type="submit">Generate</button> <button id="halt" type="button" disabled>Stop</button>
</form>
<div id="status"></div>
<div id="out"></div>
<script>
const $ = (id) => document.getElementById(id);
let controller = null;
fetch("/v1/models").then(r => r.json()).then(j => { $("model").textContent = j.data[0].id; });
function settings() {
  const body = {prompt: $("prompt").value, stream: true, max_tokens: Number($("max_tokens").value),
                temperature: Number($("temperature").value), top_p: Number($("top_p").value),
                top_k: Number($("top_k").value)};
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if ($("stop").value !== "") body.stop = $("stop").value.replace(/\\\\n/g, "\\n");
  return body;
}
function status(text, isError) { $("status").textContent = text; $("status").className = isError ? "error" : ""; }
$("form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const out = $("out");
  out.textContent = "";
  const shown = document.createElement("span"); shown.className = "prompt"; shown.textContent = $("prompt").value;
  const text = document.createElement("span"); text.id = "completion";
  out.append(shown, text);
  controller = new AbortController();
  $("go").disabled = true; $("halt").disabled = false;
  status("generating...", false);
  const t0 = performance.now();
  try {
    const r = await fetch("/v1/completions", {method: "POST", headers: {"Content-Type": "application/json"},
                                                body: JSON.stringify(settings()), signal: controller.signal});
    if (!r.ok) { const j = await r.json(); throw new Error(j.error.message); }
    const reader = r.body.getReader(); const dec = new TextDecoder(); let buf = ""; let finish = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let at;
      while ((at = buf.indexOf("\\n\\n")) >= 0) {
        const line = buf.slice(0, at); buf = buf.slice(at + 2);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const j = JSON.parse(data);
        if (j.error) throw new Error(j.error.message);
        for (const c of j.choices) { text.textContent += c.text; if (c.finish_reason) finish = c.finish_reason; }
      }
    }
    status(`done (${finish}) in ${((performance.now() - t0) / 1000).toFixed(2)} s`, false);
  } catch (err) {
    status(err.name === "AbortError" ? "stopped" : "error: " + err.message, err.name !== "AbortError");
  } finally {
    $("go").disabled = false; $("halt").disabled = true; controller = null;
  }
});
$("halt").addEventListener("click", () => { if (controller) controller.abort(); });
</script>
</body></html>
"""
