"""The server under load: C concurrent streaming clients against jaxgpt.server on 127.0.0.1, and
Hugging Face transformers' batched generate (PyTorch, CPU) on the same model as the peer.

    python scripts/serve_bench.py --model=laptop            # 4 layers, 128 channels, context 64
    python scripts/serve_bench.py --model=gpt2 --new=100    # GPT-2 124M's shape, random weights

For each C in --streams: C clients start together, each streaming one completion of --new tokens
after a --prompt-token prompt (temperatures, top_p and prompt lengths mixed across clients; no stop,
so every client gets all its tokens), one warm-up round then --rounds measured ones. Prints
aggregate tokens/s (all tokens / wall time, the median round's), p50/p99
time to first token, mean time per output token after the first, and the compilations after
warm-up (jax's compile events, counted while the clients run). Then transformers' generate at
batch C with the same lengths (do_sample, top_k=0), tokens/s (the median of --rounds). Random weights: the speed of a model
does not depend on its values. The server runs in this process (uvicorn on a thread), as serve.py
would run it, minus the model loading; the clients run in a process of their own.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import socket
import statistics
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODELS = {  # ModelConfig keys; vocab: the tokenizer's (the model's is padded to a multiple of 64)
    "laptop": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab=65),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab=50257),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_one(url: str, body: dict, out: list, start: threading.Barrier):
    start.wait()
    t0 = time.perf_counter()
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    first, text = None, ""
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])["choices"]
            if chunk and chunk[0]["text"]:
                if first is None:
                    first = time.perf_counter()
                text += chunk[0]["text"]
    out.append((t0, first, time.perf_counter(), len(text)))


def client_round(url: str, C: int, prompt: int, new: int, V: int):
    """C clients streaming at once (threads; temperatures, top_p and prompt lengths mixed across
    them): each one's (start, first token, end, characters), and the round's wall time."""
    out: list = []
    start = threading.Barrier(C)
    threads = []
    for i in range(C):
        P = max(1, prompt - (i % 4) * max(1, prompt // 4))  # mixed prompt lengths
        body = {"prompt": [(7 * i + j) % V for j in range(P)], "max_tokens": new, "stream": True,
                "temperature": [0.7, 1.0, 0.0, 1.3][i % 4], "top_p": [1.0, 0.9][i % 2], "seed": i}
        threads.append(threading.Thread(target=stream_one, args=(url, body, out, start)))
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, time.perf_counter() - t0


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs)) - 1))]


def bench_server(args, spec):
    import jax
    from flax import nnx

    from jaxgpt.model import ModelConfig, build_model
    from jaxgpt.server import Server
    from jaxgpt.serving import SlotEngine
    from jaxgpt.tokenizer import CharTokenizer
    import uvicorn

    V = spec["vocab"]
    cfg = ModelConfig(n_layer=spec["n_layer"], n_head=spec["n_head"], n_embd=spec["n_embd"],
                      block_size=spec["block_size"], vocab_size=-(-V // 64) * 64)
    graphdef, params = nnx.split(build_model(cfg, 0), nnx.Param)
    tok = CharTokenizer([chr(0x4E00 + i) for i in range(V)])  # one character per token id: decoding is exact
    engine = SlotEngine(graphdef, params, cfg.block_size, slots=max(args.streams), chunk=args.chunk, vocab_size=V)
    t0 = time.perf_counter()
    engine.warm_up(echo=False)
    print(f"warm-up: {engine.compiles} programs in {time.perf_counter() - t0:.1f} s "
          f"(echo's prefills left out: this benchmark asks for no logprobs)", flush=True)
    server = Server(engine, tok, model_name=args.model, queue_size=1024, log=print)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=uv.run, daemon=True).start()
    while not uv.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/completions"
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(kw.get("fun_name")) if event.endswith("backend_compile_duration")
        else None)
    rows = {}
    # the clients run in a process of their own, as real clients do: in the server's process their
    # threads would take turns with the server's for Python's interpreter lock
    clients = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    clients.submit(time.sleep, 0).result()  # started before the rounds
    for C in args.streams:
        rounds = []
        for rep in range(1 + args.rounds):  # the first round warms the HTTP path; the others are measured
            n0 = len(compiles)
            out, wall = clients.submit(client_round, url, C, args.prompt, args.new, V).result()
            if rep:
                rounds.append(dict(tps=sum(o[3] for o in out) / wall, ttft=[o[1] - o[0] for o in out],
                                   tpot=[(o[2] - o[1]) / max(1, o[3] - 1) for o in out], compiles=len(compiles) - n0))
        ttft = [x for r in rounds for x in r["ttft"]]
        rows[C] = dict(tps=statistics.median(r["tps"] for r in rounds), p50=statistics.median(ttft), p99=pct(ttft, 99),
                       tpot=statistics.mean(x for r in rounds for x in r["tpot"]),
                       compiles=sum(r["compiles"] for r in rounds), spread=[r["tps"] for r in rounds])
        r = rows[C]
        print(f"server, {C:3d} streams: {r['tps']:9,.1f} tokens/s; time to first token p50 {r['p50'] * 1e3:7.1f} ms, "
              f"p99 {r['p99'] * 1e3:7.1f} ms; {r['tpot'] * 1e3:6.1f} ms per output token; "
              f"{r['compiles']} compilations after warm-up; rounds {', '.join(f'{x:,.0f}' for x in r['spread'])}",
              flush=True)
    clients.shutdown()
    uv.should_exit = True
    return rows


def bench_transformers(args, spec):
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    V = spec["vocab"]
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=spec["block_size"], n_embd=spec["n_embd"],
                                  n_layer=spec["n_layer"], n_head=spec["n_head"], bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    out = {}
    for C in args.streams:
        ids = torch.randint(0, V, (C, args.prompt))
        kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=True, top_k=0, pad_token_id=0,
                  attention_mask=torch.ones_like(ids))
        with torch.no_grad():
            model.generate(ids, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
            rates = []
            for _ in range(args.rounds):  # the median round, as for the server
                t0 = time.perf_counter()
                model.generate(ids, **kw)
                rates.append(C * args.new / (time.perf_counter() - t0))
        out[C] = statistics.median(rates)
        print(f"transformers generate, batch {C:3d}: {out[C]:9,.1f} tokens/s", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="laptop")
    p.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens (the longest; clients mix shorter ones)")
    p.add_argument("--new", type=int, default=0, help="new tokens per stream (0: block_size - prompt, at most 100)")
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--no_peer", action="store_true", help="leave out transformers' generate")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds per C (after one warm-up round): "
                   "tokens/s is their median, the time-to-first-token percentiles over all of them")
    args = p.parse_args()
    spec = MODELS[args.model]
    args.new = args.new or min(100, spec["block_size"] - args.prompt)
    print(f"model {args.model} ({spec}), prompt {args.prompt} tokens (mixed down to {max(1, args.prompt // 4)}), "
          f"{args.new} new tokens per stream, chunk {args.chunk}; {os.cpu_count()} CPUs", flush=True)
    rows = bench_server(args, spec)
    peer = {} if args.no_peer else bench_transformers(args, spec)
    one = rows.get(1)
    for C, r in rows.items():
        line = f"C={C}: {r['tps']:,.1f} tokens/s"
        if one and C > 1:
            line += f" = {r['tps'] / one['tps']:.1f}x one stream"
        if C in peer:
            line += f", {r['tps'] / peer[C]:.2f}x transformers' batched generate"
        line += f"; p99/p50 time to first token {r['p99'] / r['p50']:.1f}; {r['compiles']} compilations"
        print(line)


if __name__ == "__main__":
    main()
