import json

import jax
import pytest

import bench as bench_script
from conftest import ROOT, subprocess_env
from helpers import run_script

from jaxgpt.benchmark import PEAK_FLOPS, device_peak, flops_per_token, summarize
from jaxgpt.model import ModelConfig


def test_flops_per_token_is_the_palm_estimate():
    cfg = ModelConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    n_params = 804096  # the laptop recipe's GPT, wpe (64 x 128) included
    assert flops_per_token(cfg, n_params) == 6 * (n_params - 64 * 128) + 12 * 4 * 4 * 32 * 64


def test_lora_flops_skip_the_frozen_weights_gradient():
    """Every weight costs 2 FLOPs forward and 2 for the activations' gradient; only trained ones
    (the adapters) cost 2 more for their own gradient."""
    cfg = ModelConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    n_params, n_adapters = 804096 + 40960, 40960
    n = n_params - 64 * 128
    assert flops_per_token(cfg, n_params, n_adapters) == 4 * n + 2 * n_adapters + 12 * 4 * 4 * 32 * 64
    assert flops_per_token(cfg, n_params, n_params) == flops_per_token(cfg, n_params)
    bigram = ModelConfig(model_type="bigram", vocab_size=65)
    assert flops_per_token(bigram, 65 * 65) == 6 * 65 * 65


def test_summarize_uses_the_median():
    res = summarize([0.1, 0.2, 0.9], tokens_per_iter=1000, fpt=1e6, peak=1e10)
    assert res["ms_per_iter"] == 200.0 and res["tokens_per_s"] == 5000.0
    assert abs(res["mfu"] - 1e6 * 1000 / 0.2 / 1e10) < 1e-12


def gpt_params(V, T, L, C):
    """A GPT without biases: wte + wpe + per layer (2 LayerNorm scales + c_attn, c_proj, c_fc, mlp.c_proj) + ln_f."""
    return V * C + T * C + L * (2 * C + 3 * C * C + C * C + 4 * C * C + 4 * C * C) + C


def check_figures(res, tokens_per_iter, V, T, L, H, C, peak):
    assert res["params"] == gpt_params(V, T, L, C)
    assert res["ms_per_iter"] > 0 and res["compile_s"] > 0
    # tokens/s and MFU are the step's tokens and FLOPs over the median step time
    assert abs(res["tokens_per_s"] * res["ms_per_iter"] / 1000 / tokens_per_iter - 1) < 1e-9
    fpt = 6 * (res["params"] - T * C) + 12 * L * H * (C // H) * T
    assert abs(res["mfu"] / (fpt * res["tokens_per_s"] / peak) - 1) < 1e-9 and 0 < res["mfu"] < 1


@pytest.mark.slow
def test_bench_honours_vocab_size_and_gradient_accumulation(capsys):
    args = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=8", "--batch_size=2", "--steps=3",
            "--vocab_size=50", "--gradient_accumulation_steps=3"]
    assert bench_script.main(args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["steps"] == 3 and res["devices"] == 1 and res["dtype"] == "float32"
    dev = jax.devices()[0]
    peak, source = device_peak("float32", [dev])  # bench.py's: cached in this process, the same value
    check_figures(res, 3 * 2 * 8, V=50, T=8, L=1, H=2, C=16, peak=peak)
    # the peak is the table's for a known accelerator (H100, H200, A100, TPUs), else measured here
    in_table = any(name in dev.device_kind.lower() for name, _ in PEAK_FLOPS)
    assert res["peak_source"] == source and res["peak_source"].startswith("table:" if in_table else "measured:")


@pytest.mark.slow  # bench.py as a process
def test_bench_on_two_cpu_devices():
    """--cpu_devices=2 splits the CPU into two devices (a fresh process: JAX fixes its device count at start)."""
    env = subprocess_env(JAX_PLATFORMS="cpu")
    r = run_script("bench.py", "--cpu_devices=2", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=8",
                   "--batch_size=4", "--steps=3", "--vocab_size=40", cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["devices"] == 2 and res["sharding"] == "dp"
    assert res["peak_source"].startswith("measured:") and "on 2 cpu device(s)" in res["peak_source"]
    peak = float(res["peak_source"].split("= ")[1].split(" GFLOP/s")[0]) * 1e9
    assert res["params"] == gpt_params(40, 8, 1, 16)
    fpt = 6 * (res["params"] - 8 * 16) + 12 * 1 * 2 * 8 * 8
    # the peak is printed to 0.1 GFLOP/s, so it is known to 0.05e9 / peak
    assert abs(res["mfu"] / (fpt * res["tokens_per_s"] / peak) - 1) <= 0.05e9 / peak + 1e-9
    assert abs(res["tokens_per_s"] * res["ms_per_iter"] / 1000 / (4 * 8) - 1) < 1e-9
