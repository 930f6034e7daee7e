"""Train a GPT (any size, the classic or the modern recipe; from scratch, resumed, or finetuned from
GPT-2 weights, fully or with LoRA/QLoRA) or the bigram baseline, on character or GPT-2 BPE data.

    python train.py --config configs/shakespeare_char_cpu.py [--key=value ...]

Config keys follow nanoGPT's train.py (see jaxgpt/config.py). Checkpoints, metrics.jsonl,
config.json and loss.png go to out_dir; resume with --init_from=resume.
"""

import sys

from jaxgpt.config import format_config, parse_args
from jaxgpt.errors import run_cli
from jaxgpt.parallel import maybe_initialize_distributed, set_cpu_devices
from jaxgpt.trainer import train


def train_main(argv):
    cfg = parse_args(argv).validate()
    set_cpu_devices(cfg.cpu_devices)  # before JAX starts its backends
    maybe_initialize_distributed()  # several processes (a pod slice, GPU nodes): one program
    import jax
    main_process = jax.process_index() == 0
    if main_process:
        print("config:\n" + format_config(cfg))
    summary = train(cfg)
    if "best_val_loss" in summary and main_process:
        print(f"done: iter {summary['iter']}, best val loss {summary['best_val_loss']:.4f}; "
              f"sample with: python sample.py --out_dir={cfg.out_dir}")
    return 0


def main(argv):
    return run_cli(train_main, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
