"""Serve a model over HTTP: OpenAI's completions API with continuous batching, and a page to try it.

    python serve.py --out_dir=out-shakespeare-char-cpu          # a run (full, LoRA or QLoRA)
    python serve.py --init_from=gpt2                             # or a Hugging Face directory, a nanoGPT ckpt.pt
    open http://127.0.0.1:8000/                                  # the page; the API is at /v1/completions

Every flag is checked before the model loads; then every program the server can run is compiled
(warm-up), and only then does it listen: no request compiles anything. SIGTERM or Ctrl-C: new
requests are refused, the ones in flight finish, the server exits. See docs/serving.md.
"""

import os
import sys
import time
from dataclasses import dataclass

from jaxgpt.cli import run_cli
from jaxgpt.config import ANY, ModelSource, choice, group, nonempty, parse_args, rng, validate_fields

_what = group("the model")  # beside ModelSource's keys
_where = group("where to listen")
_how = group("batching and limits")


@dataclass(frozen=True)
class ServeConfig(ModelSource):
    """Serves a trained jaxgpt run (its out_dir alone), GPT-2 weights, a Hugging Face GPT-2 directory or a nanoGPT
    ckpt.pt over OpenAI's completions API, with a page to try it at /."""

    model_name: str = _what("", ANY, "the model's id in /v1/models and responses ('' = the out_dir or source name)")
    host: str = _where("127.0.0.1", nonempty("give an address, e.g. 127.0.0.1 or 0.0.0.0"),
                       "the address to listen on (0.0.0.0: every interface)")
    port: int = _where(8000, rng(1, 65535), "the port to listen on")
    slots: int = _how(16, rng(1, 4096), "requests decoded together (each choice of a request takes one)")
    chunk: int = _how(8, rng(1, 1024), "tokens decoded between joins and leaves (and between streamed events)")
    queue: int = _how(64, rng(0, 1 << 20), "choices that may wait for a slot; more get 429 with Retry-After")
    max_prompt_tokens: int = _how(0, rng(0, note="(0 = block_size)"), "longest prompt accepted, in tokens")
    max_tokens: int = _how(0, rng(0, note="(0 = block_size)"), "largest max_tokens accepted")


def serve_main(argv):
    sc = parse_args(argv, ServeConfig)
    validate_fields(sc)
    from jaxgpt import server
    from jaxgpt.chat import Template, has_chat
    from jaxgpt.loading import load
    from jaxgpt.serving import SlotEngine

    t0 = time.perf_counter()
    resume = sc.init_from == "resume"
    source = sc.out_dir if resume else sc.init_from
    graphdef, params, model_cfg, tok, meta = load(source, sc.which, run=resume, meta_pkl=sc.meta_pkl)
    # a chat-tuned model: POST /v1/chat/completions renders with the template it was trained with
    template = Template.from_meta(meta["tokenizer"]) if has_chat(meta.get("tokenizer")) else None
    engine = SlotEngine(graphdef, params, model_cfg.block_size, slots=sc.slots, chunk=sc.chunk,
                        vocab_size=(template or tok).vocab_size)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    log(f"loaded {source} in {time.perf_counter() - t0:.1f} s; compiling (warm-up)...")
    seconds = engine.warm_up()
    name = sc.model_name or os.path.basename(os.path.normpath(source))
    srv = server.Server(engine, tok, model_name=name, queue_size=sc.queue, max_prompt=sc.max_prompt_tokens,
                        max_tokens=sc.max_tokens, log=log, template=template)
    log(f"warm-up: {engine.compiles} programs in {seconds:.1f} s; serving {name} ({sc.slots} slots, context "
        f"{model_cfg.block_size}) at http://{sc.host}:{sc.port}/")
    server.run(srv, sc.host, sc.port, log)
    log("stopped")
    return 0


def main(argv):
    return run_cli(serve_main, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
