"""Train a GPT (or the lecture's bigram model) on text: characters or GPT-2's BPE, from scratch or
from weights (GPT-2, a Hugging Face directory, a nanoGPT ckpt.pt, another run; full, LoRA, QLoRA).

    python train.py --config configs/shakespeare_char_cpu.py [--key=value ...]
    python train.py --help                      # every key, its default and what it allows

Checkpoints, metrics.jsonl, config.json and loss.png go to out_dir; continue with --init_from=resume.
"""

import sys

from jaxgpt.cli import run_cli
from jaxgpt.config import parse_args
from jaxgpt.parallel import maybe_initialize_distributed, set_cpu_devices
from jaxgpt.trainer import train


def train_main(argv):
    cfg = parse_args(argv).validate()
    set_cpu_devices(cfg.cpu_devices)  # before JAX starts its backends
    maybe_initialize_distributed()  # several processes (a pod slice, GPU nodes): one program
    summary = train(cfg)  # prints the config it resolved (process 0)
    import jax
    if "best_val_loss" in summary and jax.process_index() == 0:
        print(f"done: iter {summary['iter']}, best val loss {summary['best_val_loss']:.4f}; "
              f"sample with: python sample.py --out_dir={cfg.out_dir}")
    return 0


def main(argv):
    return run_cli(train_main, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
