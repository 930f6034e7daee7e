"""Sample from a trained jaxgpt checkpoint (needs nothing but the out_dir) or from GPT-2 weights.

    python sample.py --out_dir=out-shakespeare-char-cpu --start="ROMEO:" --num_samples=3 \
        --max_new_tokens=500 --temperature=0.8 --top_k=200 --seed=1337
    python sample.py --init_from=gpt2 --start="The meaning of life is"   # or a directory / ckpt.pt

--start=FILE:prompt.txt reads the prompt from a file; --top_p=0.9 nucleus sampling;
--stream prints the first sample as it is generated; --stop=STRING ends each sample at
STRING; --which=latest samples from the latest checkpoint instead of the best one.
Statistics go to stderr: tokens generated, tokens/s of prefill and decoding (compilation
excluded), compilation seconds, and the wall time from the script's start.
"""

import time

T_START = time.perf_counter()  # before the imports: the wall time sample.py reports starts here

import sys
from dataclasses import dataclass

import jax
import numpy as np

from jaxgpt.config import parse_args
from jaxgpt.errors import UserError, check_choice, run_cli
from jaxgpt.parallel import maybe_initialize_distributed
from jaxgpt.run import load
from jaxgpt.sampling import Engine, TextStream, check_sampling_args, cut_at_stop

SEPARATOR = "---------------"


@dataclass
class SampleConfig:
    init_from: str = "resume"  # 'resume' = the out_dir's checkpoint; or a GPT-2 name, directory, ckpt.pt
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


def read_prompt(start: str) -> str:
    if start.startswith("FILE:"):
        path = start[5:]
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise UserError(f"cannot read prompt file {path}: {e.strerror}") from None
    return start


def sample_main(argv):
    sc = parse_args(argv, SampleConfig)
    maybe_initialize_distributed()  # under a launcher, process 0 samples and prints; the others are done
    if jax.process_index() > 0:
        return 0
    check_choice("which", sc.which, ("best", "latest"))
    top_k = sc.top_k or None
    check_sampling_args(sc.max_new_tokens, sc.temperature, top_k, sc.top_p)
    resume = sc.init_from == "resume"
    graphdef, params, model_cfg, tok, _ = load(sc.out_dir if resume else sc.init_from, sc.which, run=resume)
    prompt_text = read_prompt(sc.start)
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
