"""Sample from a trained jaxgpt checkpoint (needs nothing but the out_dir) or from GPT-2 weights.

    python sample.py --out_dir=out-shakespeare-char-cpu --start="ROMEO:" --num_samples=3 \
        --max_new_tokens=500 --temperature=0.8 --top_k=200 --seed=1337
    python sample.py --init_from=gpt2 --start="The meaning of life is"   # or a directory / ckpt.pt

--start=FILE:prompt.txt reads the prompt from a file; --top_p=0.9 nucleus sampling;
--stream prints the first sample as it is generated; --stop=STRING ends each sample at
STRING; --which=latest samples from the latest checkpoint instead of the best one.
Generation statistics (tokens, seconds, tokens/s without start-up and compilation) go to stderr.
"""

import sys
from dataclasses import dataclass

import jax
import numpy as np

from jaxgpt import pretrained
from jaxgpt.checkpoint import load_model
from jaxgpt.config import UserError, check_choice, parse_args, run_cli
from jaxgpt.sampling import Engine, check_sampling_args

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
    check_choice("which", sc.which, ("best", "latest"))
    top_k = sc.top_k or None
    check_sampling_args(sc.max_new_tokens, sc.temperature, top_k, sc.top_p)
    if sc.init_from == "resume":
        graphdef, params, model_cfg, tok, _ = load_model(sc.out_dir, sc.which)
    else:
        graphdef, params, model_cfg, tok = pretrained.load_model(sc.init_from)
    prompt_text = read_prompt(sc.start)
    prompt = tok.encode(prompt_text)
    stop = tok.encode(sc.stop) if sc.stop else None
    engine = Engine(graphdef, params, model_cfg.block_size, vocab_size=tok.vocab_size)
    printed = 0

    def stream(tokens: np.ndarray):  # prints the first sample's new text as chunks arrive
        nonlocal printed
        if printed == 0:
            print(prompt_text, end="")
        print(tok.decode(tokens[0, printed:]), end="", flush=True)
        printed = tokens.shape[1]

    result = engine.generate(prompt, max_new_tokens=sc.max_new_tokens, num_samples=sc.num_samples,
                             temperature=sc.temperature, top_k=top_k, top_p=sc.top_p,
                             key=jax.random.key(sc.seed), window_keep=sc.window_keep, stop=stop,
                             on_chunk=stream if sc.stream else None)
    if sc.stream:
        print("\n" + SEPARATOR)
    for i, row in enumerate(result.tokens):
        text = tok.decode(row)
        if sc.stop and sc.stop in text:
            text = text[:text.index(sc.stop)]
        if sc.stream and i == 0:
            continue  # already shown
        print(prompt_text + text)
        print(SEPARATOR)
    n = result.tokens_generated
    print(f"generated {n} tokens in {result.seconds:.3f} s: {n / result.seconds:,.0f} tokens/s "
          f"({result.tokens.shape[0]} samples in parallel; compilation {result.compile_seconds:.2f} s, not counted)",
          file=sys.stderr)
    return 0


def main(argv):
    return run_cli(sample_main, argv)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
