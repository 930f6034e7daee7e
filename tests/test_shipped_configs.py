"""Every config in configs/ runs: a couple of steps (or its evaluation) on this machine with tiny
model and batch overrides, its own other settings kept (dropout, LoRA, tokenizer, include globs,
eval_only, ...). What a config starts from is given locally: a tiny GPT-2-format directory for
GPT-2 weights, and the run of the config that writes the out_dir another config starts from."""

import glob
import math
import os

import pytest

from conftest import ROOT, make_corpus
from jaxgpt import runtime
from jaxgpt.config import parse_args
from jaxgpt.model import pick_attention
from jaxgpt.config import GPT2_SIZES
from jaxgpt.trainer import train

CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))
# the model and the amount of work, nothing else: small enough for a CPU in seconds
TINY = dict(model_size="", n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=2, max_iters=2, eval_iters=1)


def config(name, *flags):
    return parse_args(["--config", os.path.join(ROOT, "configs", name), *flags])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A text file and a directory of .py files (for configs with include globs)."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "corpus.txt").write_text(make_corpus(), encoding="utf-8")
    (d / "src" / "pkg").mkdir(parents=True)
    for i in range(3):
        (d / "src" / "pkg" / f"m{i}.py").write_text(make_corpus(2000, seed=i), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory, inputs, request):
    """run(name) trains config `name` tiny once per module and returns its summary and out_dir."""
    done, root = {}, tmp_path_factory.mktemp("runs")

    def run(name):
        if name in done:
            return done[name]
        cfg = config(name)
        over = dict(TINY, out_dir=str(root / name / "out"), data_dir=str(root / name / "data"),
                    input_file=str(inputs / ("src" if cfg.include else "corpus.txt")),
                    gradient_accumulation_steps=min(cfg.gradient_accumulation_steps, 2))
        if cfg.init_from in GPT2_SIZES:  # OpenAI's weights: a local GPT-2-format directory instead
            over["init_from"] = str(request.getfixturevalue("tiny_gpt2_dir"))
        elif cfg.init_from not in ("scratch", "resume"):  # another config's out_dir: train that one first
            base = [c for c in CONFIGS if config(c).out_dir == cfg.init_from]
            assert base, f"{name}: no config writes init_from={cfg.init_from}"
            over["init_from"] = run(base[0])[1]
        elif cfg.tokenizer == "gpt2":  # GPT-2's BPE files are not fetched offline: the directory's
            over["tokenizer_dir"] = str(request.getfixturevalue("tiny_gpt2_dir"))
        cfg = config(name, *[f"--{k}={v}" for k, v in over.items()])
        done[name] = (train(cfg, log=lambda s: None), cfg.out_dir)
        return done[name]

    return run


@pytest.mark.slow  # 13 configs trained: minutes together; the fast tier's budget: among its longest (--durations, 2026-12-02)
@pytest.mark.parametrize("name", CONFIGS)
def test_config_runs_on_this_machine(name, runs):
    cfg = config(name)
    summary, _ = runs(name)
    assert math.isfinite(summary["val_loss"]), summary
    if not cfg.eval_only:
        assert summary["iter"] == TINY["max_iters"] and math.isfinite(summary["train_loss"])


@pytest.mark.parametrize("name", CONFIGS)
def test_config_needs_no_flags_on_cpus_or_gpus(name):
    """The dtype and attention a config asks for resolve on a CPU and on a GPU (cuDNN granted):
    bfloat16 on the GPU, float32 on the CPU unless the config says otherwise."""
    cfg = config(name).validate()
    head_size = cfg.n_embd // cfg.n_head
    for platform in ("cpu", "gpu"):
        dtype = runtime.resolve_dtype(cfg.dtype, platform)
        pick_attention(cfg.attn_impl, dtype, head_size, platform=platform, probe=lambda d, h: None)
    if cfg.dtype == "auto":
        assert runtime.resolve_dtype(cfg.dtype, "gpu") == "bfloat16"
        assert runtime.resolve_dtype(cfg.dtype, "cpu") == "float32"
