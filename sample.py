"""Sample from a trained jaxgpt checkpoint (needs nothing but the out_dir) or from GPT-2 weights.

    python sample.py --out_dir=out-shakespeare-char-cpu --start="ROMEO:" --num_samples=3 \
        --max_new_tokens=500 --temperature=0.8 --top_k=200 --seed=1337
    python sample.py --init_from=gpt2 --start="The meaning of life is"   # or a directory / ckpt.pt
    python sample.py --init_from=out-shakespeare-char/ckpt.pt --start="ROMEO:"  # nanoGPT's; --meta_pkl=PATH

--start=FILE:prompt.txt reads the prompt from a file (UTF-8, or UTF-16/32 with a byte-order mark);
--top_p=0.9 nucleus sampling;
--stream prints the first sample as it is generated; --stop=STRING ends each sample at
STRING; --which=latest samples from the latest checkpoint instead of the best one.
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

from jaxgpt.config import ANY, choice, nonempty, parse_args, rng, validate_fields
from jaxgpt.errors import UserError, run_cli
from jaxgpt.parallel import maybe_initialize_distributed
from jaxgpt.run import load
from jaxgpt.sampling import SAMPLING_RULES, Engine, TextStream, cut_at_stop
from jaxgpt.tokenizer import decode_text

SEPARATOR = "---------------"


@dataclass
class SampleConfig:
    init_from: str = "resume"  # 'resume' = the out_dir's checkpoint; or a GPT-2 name, directory, ckpt.pt
    meta_pkl: str = ""  # a nanoGPT character ckpt.pt's meta.pkl (default: beside it, else data/<dataset>/meta.pkl)
    out_dir: str = "out"
    start: str = "\n"  # prompt text, or FILE:path to read it from a file
    num_samples: int = 10
    max_new_tokens: int = 500
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 200  # 0 = no limit
    top_p: float = 1.0  # 1 = no nucleus filtering
    seed: int = 1337
    stream: bool = False
    stop: str = ""  # end each sample at this string
    window_keep: int = 0  # tokens kept when the context window is full; 0 = block_size (exact crop)
    which: str = "best"  # 'best' | 'latest' checkpoint


SAMPLE_RULES = {
    **SAMPLING_RULES,
    "top_k": lambda key, v: v == 0 or SAMPLING_RULES["top_k"](key, v),  # the flag's 0 is the engine's None
    "init_from": nonempty("use resume (the out_dir's checkpoint), a GPT-2 name or a path to weights"),
    "out_dir": ANY,  # load() says what is missing there
    "meta_pkl": ANY,  # checked where it is read: jaxgpt.pretrained.read_nanogpt
    "start": ANY,  # text, or FILE:path (read_prompt checks the file)
    "num_samples": rng(1, 1 << 20), "seed": rng(0, 2**32, hi_open=True),
    "stop": ANY,
    "window_keep": rng(0, note="(0 means block_size)"),  # <= block_size: checked by the engine
    "which": choice("best", "latest"),
}
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
    sc = parse_args(argv, SampleConfig)
    validate_fields(sc, SAMPLE_RULES)
    prompt_text = read_prompt(sc.start)
    maybe_initialize_distributed()  # under a launcher, process 0 samples and prints; the others are done
    if jax.process_index() > 0:
        return 0
    top_k = sc.top_k or None
    resume = sc.init_from == "resume"
    graphdef, params, model_cfg, tok, _ = load(sc.out_dir if resume else sc.init_from, sc.which, run=resume,
                                               meta_pkl=sc.meta_pkl)
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


def main(argv):
    return run_cli(sample_main, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
