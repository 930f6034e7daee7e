"""Sample from a trained jaxgpt checkpoint; needs nothing but the out_dir.

    python sample.py --out_dir=out-shakespeare-char-cpu --start="ROMEO:" --num_samples=3 \
        --max_new_tokens=500 --temperature=0.8 --top_k=200 --seed=1337

--start=FILE:prompt.txt reads the prompt from a file. --which=latest samples from the latest
checkpoint instead of the best one.
"""

import sys
from dataclasses import dataclass

import jax

from jaxgpt.checkpoint import load_model
from jaxgpt.config import UserError, check_choice, parse_args
from jaxgpt.sampling import check_sampling_args, generate


@dataclass
class SampleConfig:
    out_dir: str = "out"
    start: str = "\n"  # prompt text, or FILE:path to read it from a file
    num_samples: int = 10
    max_new_tokens: int = 500
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 200  # 0 = no limit
    seed: int = 1337
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


def main(argv):
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        sc = parse_args(argv, SampleConfig)
        check_choice("which", sc.which, ("best", "latest"))
        top_k = sc.top_k or None
        check_sampling_args(sc.max_new_tokens, sc.temperature, top_k)
        graphdef, params, model_cfg, tok, meta = load_model(sc.out_dir, sc.which)
        prompt = tok.encode(read_prompt(sc.start))
        out = generate(graphdef, params, prompt, max_new_tokens=sc.max_new_tokens,
                       num_samples=sc.num_samples, temperature=sc.temperature, top_k=top_k,
                       key=jax.random.key(sc.seed), block_size=model_cfg.block_size)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    prefix = tok.decode(prompt)
    for row in jax.device_get(out):
        print(prefix + tok.decode(row))
        print("---------------")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
