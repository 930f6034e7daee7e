"""Sample from a trained jaxgpt checkpoint (needs nothing but the out_dir) or from GPT-2 weights.

    python sample.py --out_dir=out-shakespeare-char-cpu --start="ROMEO:" --num_samples=3 \
        --max_new_tokens=500 --temperature=0.8 --top_k=200 --seed=1337
    python sample.py --init_from=gpt2 --start="The meaning of life is"   # or a directory / ckpt.pt
    python sample.py --init_from=out-shakespeare-char/ckpt.pt --start="ROMEO:"  # nanoGPT's; --meta_pkl=PATH

--start=FILE:prompt.txt reads the prompt from a file (UTF-8, or UTF-16/32 with a byte-order mark);
--top_p=0.9 nucleus sampling;
--stream prints the first sample as it is generated; --stop=STRING ends each sample at
STRING; --which=latest samples from the latest checkpoint instead of the best one.
--chat (a chat-tuned model, docs/chat.md): a terminal chat, replies streamed, the history kept
within the context window, Ctrl-D to leave; with --start=MESSAGE it answers that one message and
exits (--system=TEXT: a system message).
Statistics go to stderr: tokens generated, tokens/s of prefill and decoding (compilation
excluded), compilation seconds, and the wall time from the script's start. Every flag is checked
(SAMPLE_RULES) and the prompt file read before the model is loaded; a request whose arrays cannot
fit in free memory is refused before anything compiles (jaxgpt.sampling.check_fits).
"""

import time

T_START = time.perf_counter()  # before the imports: the wall time sample.py reports starts here

import os
import sys
from dataclasses import dataclass

import jax
import numpy as np

from jaxgpt.config import ANY, ModelSource, allows, group, parse_args, rng, validate_fields
from jaxgpt.cli import run_cli
from jaxgpt.errors import UserError
from jaxgpt.parallel import launched_index
from jaxgpt.loading import load
from jaxgpt.chat import Template
from jaxgpt.sampling import SAMPLING_RULES, ChatSession, Engine, TextStream, cut_at_stop
from jaxgpt.tokenizer import decode_text

SEPARATOR = "---------------"


_prompt = group("the prompt and the samples")
_how = group("sampling")
_chat = group("chat")


@dataclass(frozen=True)
class SampleConfig(ModelSource):
    """Samples text from a trained jaxgpt run (its out_dir alone), or from GPT-2 weights, a Hugging Face GPT-2
    directory or a nanoGPT ckpt.pt."""

    start: str = _prompt("\n", ANY, "the prompt, or FILE:path to read it from a file")
    num_samples: int = _prompt(10, rng(1, 1 << 20), "samples, decoded together as one batch")
    max_new_tokens: int = _prompt(500, SAMPLING_RULES["max_new_tokens"], "tokens generated per sample")
    stream: bool = _prompt(False, None, "print the first sample as it is generated")
    stop: str = _prompt("", ANY, "end each sample at this string ('' = never)")
    temperature: float = _how(0.8, SAMPLING_RULES["temperature"], "softmax temperature")
    top_k: int = _how(200, allows(">= 1 (0 = no limit)")(lambda key, v: v == 0 or SAMPLING_RULES["top_k"](key, v)),
                      "sample among the k most likely tokens")
    top_p: float = _how(1.0, SAMPLING_RULES["top_p"], "nucleus sampling: the smallest set of tokens with this much "
                                                      "probability (1 = off)")
    seed: int = _how(1337, rng(0, 2**32, hi_open=True), "the sampling key derives from it")
    window_keep: int = _how(0, rng(0, note="(0 means block_size)"),
                            "past block_size, re-prefill from the last this many tokens (0 = exact crop)")
    chat: bool = _chat(False, None, "chat with a chat-tuned model (docs/chat.md): a terminal chat, or with --start "
                                    "one answer to that message")
    system: str = _chat("", ANY, "chat: a system message opening the conversation")


MAX_PROMPT_BYTES = 64 << 20


def read_prompt(start: str) -> str:
    """The prompt: `start` itself, or the text of FILE:path (UTF-8 with or without a byte-order
    mark, UTF-16 or UTF-32 with one; see jaxgpt.tokenizer.decode_text)."""
    if not start.startswith("FILE:"):
        return start
    path = start[5:]
    if os.path.isdir(path):
        raise UserError(f"cannot read prompt file {path}: it is a directory; pass --start=FILE:path/to/prompt.txt")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PROMPT_BYTES + 1)
    except OSError as e:
        raise UserError(f"cannot read prompt file {path}: {e.strerror}") from None
    if len(data) > MAX_PROMPT_BYTES:
        raise UserError(f"prompt file {path} is over {MAX_PROMPT_BYTES >> 20} MiB; a prompt is at most that")
    return decode_text(data, f"prompt file {path}")


def sample_main(argv):
    if launched_index() > 0:  # started as a job of several processes: process 0 samples (and reports) alone
        return 0
    sc = parse_args(argv, SampleConfig)
    validate_fields(sc)
    prompt_text = read_prompt(sc.start)
    top_k = sc.top_k or None
    resume = sc.init_from == "resume"
    graphdef, params, model_cfg, tok, meta = load(sc.out_dir if resume else sc.init_from, sc.which, run=resume,
                                                  meta_pkl=sc.meta_pkl)
    if sc.chat:
        return chat_main(sc, prompt_text, graphdef, params, model_cfg, meta)
    prompt = tok.encode(prompt_text)
    stop = tok.encode(sc.stop) if sc.stop else None
    engine = Engine(graphdef, params, model_cfg.block_size, vocab_size=tok.vocab_size)
    stream = TextStream(tok.decode, sc.stop)

    def show(tokens: np.ndarray):  # prints the first sample's new text as chunks arrive
        print(stream.update(tokens[0]), end="", flush=True)

    if sc.stream:
        print(prompt_text, end="", flush=True)
    result = engine.generate(prompt, max_new_tokens=sc.max_new_tokens, num_samples=sc.num_samples,
                             temperature=sc.temperature, top_k=top_k, top_p=sc.top_p,
                             key=jax.random.key(sc.seed), window_keep=sc.window_keep, stop=stop,
                             on_chunk=show if sc.stream else None)
    rows = result.tokens[:, :result.decoded]
    for i, row in enumerate(rows):
        if sc.stream and i == 0:  # already shown: finish it
            print(stream.update(row, final=True))
        else:
            print(prompt_text + cut_at_stop(tok.decode(row), sc.stop))
        print(SEPARATOR)
    n = result.tokens_generated
    print(f"generated {n} tokens ({len(rows)} samples x {result.decoded}, in parallel) in {result.seconds:.3f} s: "
          f"{n / result.seconds:,.0f} tokens/s; compilation {result.compile_seconds:.2f} s (not counted); "
          f"wall time from start {time.perf_counter() - T_START:.2f} s", file=sys.stderr)
    return 0


def chat_main(sc: SampleConfig, message: str, graphdef, params, model_cfg, meta) -> int:
    """--chat: one answer to --start (when given), else a terminal chat until Ctrl-D (EOF)."""
    tmpl = Template.from_meta(meta.get("tokenizer"))
    engine = Engine(graphdef, params, model_cfg.block_size, vocab_size=tmpl.vocab_size)
    session = ChatSession(engine, tmpl, model_cfg.block_size, system=sc.system, max_new_tokens=sc.max_new_tokens,
                          temperature=sc.temperature, top_k=sc.top_k or None, top_p=sc.top_p,
                          key=jax.random.key(sc.seed))
    show = lambda text: print(text, end="", flush=True)  # noqa: E731
    if "start" in getattr(sc, "_set", ()):  # one message, one answer: scriptable
        session.reply(message, show)
        print()
        if session.dropped:
            print(f"(the context leaves no room for the first {session.dropped} message(s): left out)", file=sys.stderr)
        r = session.last
        print(f"generated {r.tokens_generated} tokens in {r.seconds:.3f} s; compilation {r.compile_seconds:.2f} s; "
              f"wall time from start {time.perf_counter() - T_START:.2f} s", file=sys.stderr)
        return 0
    print(f"chat with {sc.out_dir if sc.init_from == 'resume' else sc.init_from} ({model_cfg.block_size}-token "
          f"context); Ctrl-D to leave", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        try:
            session.reply(line, show)
        except UserError as e:  # a message the model cannot read (e.g. a character a char model lacks): say so, go on
            print(f"error: {e}", file=sys.stderr)
            continue
        print()
        if session.dropped:
            print(f"(the oldest {session.dropped} message(s) no longer fit the context and are left out)", file=sys.stderr)


def main(argv):
    return run_cli(sample_main, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
