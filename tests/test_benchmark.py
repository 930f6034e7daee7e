import json

from conftest import ROOT, subprocess_env
from test_train import run_script

from jaxgpt.benchmark import flops_per_token, summarize
from jaxgpt.model import ModelConfig


def test_flops_per_token_is_the_palm_estimate():
    cfg = ModelConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    n_params = 804096  # the laptop recipe's GPT, wpe (64 x 128) included
    assert flops_per_token(cfg, n_params) == 6 * (n_params - 64 * 128) + 12 * 4 * 4 * 32 * 64


def test_summarize_uses_the_median():
    res = summarize([0.1, 0.2, 0.9], tokens_per_iter=1000, fpt=1e6, peak=1e10)
    assert res["ms_per_iter"] == 200.0 and res["tokens_per_s"] == 5000.0
    assert abs(res["mfu"] - 1e6 * 1000 / 0.2 / 1e10) < 1e-12


def test_bench_script_prints_figures():
    # on the CPU, whose peak bench.py measures (accelerators' come from a table)
    r = run_script("bench.py", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=8",
                   "--batch_size=2", "--steps=3", cwd=ROOT, env=subprocess_env(JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["ms_per_iter"] > 0 and res["tokens_per_s"] > 0 and 0 < res["mfu"] < 1
    assert "measured" in res["peak_source"] and res["steps"] == 3
