"""The OpenAI-compatible server, live on 127.0.0.1, driven with the official `openai` client: a
completion at a fixed seed is what Engine.generate (sample.py's path) draws; streamed chunks join
to the non-streamed text; n > 1; stop; 32 concurrent requests from 8 threads each equal their solo
result; bad requests are 400s naming the field; a full queue is a 429; a client that goes away
frees its slot; echo + logprobs for lm-evaluation-harness; serve.py itself drains on SIGTERM."""

import gc
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT, make_corpus, subprocess_env, tiny_args
from helpers import run_python
from jaxgpt.model import ModelConfig, build_model
from jaxgpt.sampling import Engine
from jaxgpt.serving import SlotEngine
from jaxgpt.server import Server
from jaxgpt.tokenizer import CharTokenizer

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytestmark = pytest.mark.slow  # a live server: threads, sockets, a subprocess

TOK = CharTokenizer.from_text(make_corpus())
CFG = ModelConfig(vocab_size=TOK.vocab_size + 3, block_size=64, n_layer=2, n_head=2, n_embd=32)
GRAPHDEF, PARAMS = nnx.split(build_model(CFG, 0), nnx.Param)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Live:
    """A Server on its own uvicorn thread at 127.0.0.1:<free port>."""

    def __init__(self, slots=4, chunk=4, queue=64, step_delay=0.0, **kw):
        self.engine = SlotEngine(GRAPHDEF, PARAMS, CFG.block_size, slots=slots, chunk=chunk,
                                 vocab_size=TOK.vocab_size, min_bucket=16)
        self.engine.warm_up()
        if step_delay:  # a slow model: requests stay in flight long enough to fill the queue
            step = self.engine.step
            self.engine.step = lambda: (time.sleep(step_delay), step())[1]
        self.server = Server(self.engine, TOK, model_name="tiny", queue_size=queue, log=lambda m: None, **kw)
        self.port = free_port()
        self.uv = uvicorn.Server(uvicorn.Config(self.server.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        while not self.uv.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def post(self, body, raw=None):
        """(status, headers, JSON) of a POST /v1/completions with body (or raw bytes)."""
        data = raw if raw is not None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + "/v1/completions", data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.headers, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, e.headers, json.loads(e.read())

    def health(self):
        with urllib.request.urlopen(self.url + "/health", timeout=10) as r:
            return json.loads(r.read())

    def close(self):
        self.uv.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def live():
    s = Live()
    yield s
    s.close()


def engine_text(prompt, n, seed, num_samples=1, **kw):
    """What Engine.generate (sample.py's call) draws for this prompt, seed and settings."""
    res = Engine(GRAPHDEF, PARAMS, CFG.block_size, vocab_size=TOK.vocab_size).generate(
        TOK.encode(prompt), max_new_tokens=n, num_samples=num_samples, key=jax.random.key(seed), **kw)
    return [TOK.decode(row) for row in res.tokens]


def test_completion_at_a_seed_is_the_engines(live):
    r = live.client.completions.create(model="tiny", prompt="ROMEO", max_tokens=30, temperature=0.8, top_p=0.9,
                                       seed=7, extra_body={"top_k": 20})
    assert r.choices[0].text == engine_text("ROMEO", 30, 7, temperature=0.8, top_p=0.9, top_k=20)[0]
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 30 and r.usage.prompt_tokens == 5
    assert [m.id for m in live.client.models.list().data] == ["tiny"]


def test_n_choices_are_samples_of_the_seed(live):
    r = live.client.completions.create(model="tiny", prompt=["to be", "or not"], max_tokens=12, n=3, seed=3)
    assert [c.index for c in r.choices] == list(range(6))
    for i, prompt in enumerate(["to be", "or not"]):
        want = engine_text(prompt, 12, 3, num_samples=3, temperature=1.0)
        assert [c.text for c in r.choices[3 * i:3 * i + 3]] == want
    assert len({c.text for c in r.choices}) == 6


def test_streamed_chunks_join_to_the_whole_text(live):
    kw = dict(model="tiny", prompt="the question", max_tokens=40, temperature=1.0, seed=11, n=2)
    whole = live.client.completions.create(**kw)
    parts, finish = {0: "", 1: ""}, {}
    events = 0
    for ev in live.client.completions.create(stream=True, **kw):
        for c in ev.choices:
            parts[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
        events += 1
    assert events > 4  # streamed in chunks, not in one piece
    assert [parts[0], parts[1]] == [c.text for c in whole.choices] and finish == {0: "length", 1: "length"}


def test_stop_ends_a_choice_at_the_string(live):
    full = live.client.completions.create(model="tiny", prompt="to", max_tokens=60, temperature=1.0, seed=5).choices[0]
    stop = full.text[10:12]  # a string the unstopped text holds
    cut = full.text[:full.text.index(stop)]
    r = live.client.completions.create(model="tiny", prompt="to", max_tokens=60, temperature=1.0, seed=5,
                                       stop=[stop, "@@"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.text for ev in live.client.completions.create(
        model="tiny", prompt="to", max_tokens=60, temperature=1.0, seed=5, stop=stop, stream=True) for c in ev.choices)
    assert streamed == cut


def test_32_concurrent_requests_equal_their_solo_results(live):
    reqs = [dict(prompt=["to be", "ROMEO", "a sea of troubles whether", "o"][i % 4], max_tokens=8 + (i * 7) % 30,
                 temperature=[0.0, 0.5, 1.0, 1.4][i % 4], top_p=[1.0, 0.8][i % 2], seed=100 + i) for i in range(32)]
    call = lambda kw: live.client.completions.create(model="tiny", **kw).choices[0].text  # noqa: E731
    solo = [call(kw) for kw in reqs]
    compiles = live.engine.compiles
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(call, reqs))
    assert together == solo
    assert live.engine.compiles == compiles  # nothing compiled after warm-up


def test_echo_and_logprobs_as_lm_eval_harness_asks(live):
    """local-completions scores a continuation with echo=True, max_tokens=1, logprobs=1, temperature 0
    and token ids as the prompt; it reads token_logprobs[ctxlen:-1] and top_logprobs[ctxlen:-1]."""
    ids = TOK.encode("to be or not")
    st, _, r = live.post({"model": "tiny", "prompt": [ids], "max_tokens": 1, "logprobs": 1, "echo": True,
                          "temperature": 0, "seed": 1234})
    assert st == 200
    lp = r["choices"][0]["logprobs"]
    assert r["choices"][0]["text"].startswith("to be or not") and len(lp["tokens"]) == len(ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    model = nnx.merge(GRAPHDEF, PARAMS)
    ref = jax.nn.log_softmax(model(jax.numpy.asarray([ids]))[0, :, :TOK.vocab_size], axis=-1)
    np.testing.assert_allclose(lp["token_logprobs"][1:len(ids)], [ref[t, ids[t + 1]] for t in range(len(ids) - 1)],
                               atol=1e-5)  # float32 prefill against the plain forward
    greedy = int(np.argmax(ref[-1]))
    assert lp["tokens"][-1] == TOK.decode([greedy]) and max(lp["top_logprobs"][-1].values()) == lp["token_logprobs"][-1]
    st, _, r0 = live.post({"prompt": "to be", "max_tokens": 0, "echo": True, "logprobs": 0})
    assert st == 200 and r0["choices"][0]["text"] == "to be" and len(r0["choices"][0]["logprobs"]["tokens"]) == 5


@pytest.mark.parametrize("body, param", [
    ({"prompt": "to", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "to", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "to", "max_tokens": 64}, "max_tokens"),  # 2 + 64 > block_size 64
    ({"prompt": "to", "temperature": 3}, "temperature"),
    ({"prompt": "to", "temperature": True}, "temperature"),
    ({"prompt": "to", "top_p": 0}, "top_p"),
    ({"prompt": "to", "top_k": -2}, "top_k"),
    ({"prompt": "to", "n": 0}, "n"),
    ({"prompt": "to", "stop": 5}, "stop"),
    ({"prompt": "to", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "to", "seed": 1.5}, "seed"),
    ({"prompt": "to", "stream": "yes"}, "stream"),
    ({"prompt": "to", "logprobs": 9}, "logprobs"),
    ({"prompt": "to", "echo": 1}, "echo"),
    ({"prompt": "to", "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"prompt": "to", "temprature": 0.5}, "temprature"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x" * 70}, "prompt"),
    ({"prompt": "to be \u2603"}, "prompt"),  # a character the char tokenizer does not have
    ({"prompt": [[1, 2, 10 ** 6]]}, "prompt"),
    ({"max_tokens": 5}, "prompt"),
])
def test_bad_requests_are_400_naming_the_field(live, body, param):
    status, _, r = live.post(body)
    assert status == 400 and r["error"]["param"] == param and r["error"]["type"] == "invalid_request_error"
    assert param in r["error"]["message"] or param == "prompt"
    if "prompt" in body:  # and the official client raises its usual error
        with pytest.raises(openai.BadRequestError):
            live.client.completions.create(model="tiny", prompt=body["prompt"],
                                           extra_body={k: v for k, v in body.items() if k != "prompt"})


def test_malformed_json_is_a_400_and_never_a_500(live):
    for raw in (b"{not json", b"\xff\xfe", b"[1, 2]", b""):
        status, _, r = live.post(None, raw=raw)
        assert status == 400 and "error" in r, raw
    with urllib.request.urlopen(live.url + "/health", timeout=10) as h:
        assert json.loads(h.read())["status"] == "ok"
    status, _, _ = (lambda: (live.post({"prompt": "to", "max_tokens": 2})))()
    assert status == 200


def test_full_queue_is_429_with_retry_after():
    s = Live(slots=1, chunk=2, queue=1, step_delay=0.05)
    try:
        body = {"prompt": "to", "max_tokens": 40, "temperature": 0}  # 40 tokens: >= 1 s in flight
        with ThreadPoolExecutor(6) as pool:
            first = pool.submit(s.post, body)
            while s.health()["busy"] == 0:  # the first one holds the only slot
                time.sleep(0.01)
            second = pool.submit(s.post, body)
            while s.health()["queued"] == 0:  # the second one waits in the queue (size 1)
                time.sleep(0.01)
            more = [pool.submit(s.post, body) for _ in range(4)]  # while both are in flight: a full queue
            results = [f.result() for f in [first, second] + more]
        codes = [st for st, _, _ in results]
        assert codes[:2] == [200, 200] and codes[2:] == [429] * 4, codes
        for st, headers, r in results:
            if st == 429:
                assert int(headers["Retry-After"]) >= 1 and r["error"]["type"] == "rate_limit_error"
            else:
                assert r["choices"][0]["finish_reason"] == "length"
    finally:
        s.close()


def test_a_client_that_goes_away_frees_its_slot():
    s = Live(slots=2, chunk=1, step_delay=0.02)
    try:
        stream = s.client.completions.create(model="tiny", prompt="to", max_tokens=60, stream=True)
        next(iter(stream))
        assert s.health()["busy"] == 1
        stream.close()  # the client goes away after its first event; 60 tokens would take >= 1.2 s more
        t0 = time.time()
        while s.health()["busy"] and time.time() - t0 < 10:
            time.sleep(0.02)
        h = s.health()
        assert h["busy"] == 0 and h.get("disconnected") == 1 and time.time() - t0 < 1.0, h
    finally:
        s.close()


def test_what_was_built_before_serving_is_kept_out_of_full_collections():
    """The heap the server starts with (jax, the model, its programs) is frozen while it serves, so
    that a full garbage collection does not stop every thread to scan it; given back at the end."""
    before = gc.get_freeze_count()
    s = Live()
    try:
        assert gc.get_freeze_count() > before
        assert s.post({"prompt": "to", "max_tokens": 2, "seed": 1})[0] == 200
    finally:
        s.close()
    assert gc.get_freeze_count() == 0


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    from jaxgpt.config import parse_args
    from jaxgpt.trainer import train

    tmp = tmp_path_factory.mktemp("serve")
    corpus = tmp / "corpus.txt"
    corpus.write_text(make_corpus(), encoding="utf-8")
    cfg = parse_args(tiny_args(tmp, str(corpus), max_iters=10, block_size=32))
    train(cfg, log=lambda s: None)
    return cfg.out_dir


def test_serve_py_serves_a_run_and_drains_on_sigterm(char_run):
    """serve.py --out_dir=RUN: the completion equals sample.py's text; SIGTERM while a request is in
    flight: it finishes whole, a new connection is refused, the process exits 0."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "serve.py", f"--out_dir={char_run}", f"--port={port}", "--slots=2",
                             "--chunk=1"], cwd=ROOT, env=subprocess_env(JAX_PLATFORMS="cpu"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() - t0 < 240, proc.stderr.read() if proc.poll() else "timeout"
                time.sleep(0.3)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        r = client.completions.create(model="x", prompt="to be", max_tokens=20, temperature=0.8, seed=1337,
                                      extra_body={"top_k": 200})
        out = run_python(["sample.py", f"--out_dir={char_run}", "--start=to be", "--num_samples=1",
                          "--max_new_tokens=20"], env=subprocess_env(JAX_PLATFORMS="cpu"), timeout=300)
        assert out.stdout.split("\n---------------")[0] == "to be" + r.choices[0].text
        stream = client.completions.create(model="x", prompt="to", max_tokens=30, stream=True, seed=2)
        it = iter(stream)
        text = next(it).choices[0].text
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(OSError):  # refused: the server no longer listens
            urllib.request.urlopen(url + "/health", timeout=2)
        for ev in it:
            text += "".join(c.text for c in ev.choices)
        assert len(text) == 30  # the request in flight finished whole
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
