"""Test helpers shared by several test files (and the subprocesses some tests start): the shipped
configs with their models shrunk, and the model each one trains."""

import dataclasses
import glob
import os

from conftest import ROOT
from jaxgpt.config import GPT2_SIZES, parse_args
from jaxgpt.model import ModelConfig, model_config

CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))
GPT2_VOCAB, BPE_PADDED, CHAR_VOCAB = 50257, 50304, 65


def shipped(name: str, *flags: str):
    return parse_args(["--config", os.path.join(ROOT, "configs", name), *flags]).validate(paths=False)


def tiny(name: str, *flags: str):
    """The config with its model shrunk: one layer, two heads of its own head size (what the
    dtype and attention choices look at), 128 positions; at most 2 micro-batches; then `flags`."""
    cfg = shipped(name)
    if cfg.init_from in GPT2_SIZES:
        _, n_head, n_embd = GPT2_SIZES[cfg.init_from]
        head_size = n_embd // n_head
    else:
        head_size = cfg.n_embd // cfg.n_head
    return shipped(name, "--model_size=", "--n_layer=1", "--n_head=2", f"--n_embd={2 * head_size}",
                   "--block_size=128", f"--gradient_accumulation_steps={min(cfg.gradient_accumulation_steps, 2)}",
                   *flags)


def base_model(name: str) -> ModelConfig:
    """The model a config trains, as jaxgpt.start.setup builds it (dtype and attention still the
    config's requests): from scratch; OpenAI's GPT-2 layout for a GPT-2 name; the model of the
    config that writes its init_from out_dir; with the config's LoRA adapters and quantized base."""
    cfg = tiny(name)
    if cfg.init_from in GPT2_SIZES:
        m = ModelConfig(vocab_size=GPT2_VOCAB, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                        n_embd=cfg.n_embd, bias=True, gelu="tanh", dropout=cfg.dropout)
    elif cfg.init_from not in ("scratch", "resume"):
        base = [c for c in CONFIGS if shipped(c).out_dir == cfg.init_from]
        assert base, f"{name}: no config writes init_from={cfg.init_from}"
        m = dataclasses.replace(base_model(base[0]), dropout=cfg.dropout, lora_rank=0, base_quant="")
    else:
        m = model_config(cfg, CHAR_VOCAB if cfg.tokenizer == "char" else BPE_PADDED, log=lambda s: None,
                         platform="cpu")
    if cfg.adapters:
        m = dataclasses.replace(m, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                lora_targets=cfg.lora_targets, base_quant=cfg.base_quant)
    return m
