"""The modern recipe's options and Muon: each model option alone (and all together) keeps the
shapes, causality and cached decoding; Muon's step is the published algorithm; a Muon run resumes
exactly; models without a GPT-2 layout refuse GPT-2 export and GPT-2-layout starts clearly."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_args
from jaxgpt.benchmark import flops_per_token
from jaxgpt.config import Config, parse_args
from jaxgpt.errors import UserError
from jaxgpt.model import ModelConfig, build_model, num_params
from jaxgpt.optim import lr_schedule, make_optimizer, muon_labels
from jaxgpt.pretrained import export_hf, weights_config
from jaxgpt.loading import load, load_weights
from jaxgpt.trainer import train

BASE = ModelConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16)
OPTIONS = {"rope": dict(pos_emb="rope"), "rmsnorm": dict(norm="rmsnorm"), "qk_norm": dict(qk_norm=True),
           "relu2": dict(mlp="relu2"), "swiglu": dict(mlp="swiglu"), "untied_head": dict(untied_head=True),
           "softcap": dict(logit_softcap=2.0), "zero_init_proj": dict(zero_init_proj=True)}
ALL = dict(pos_emb="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu", untied_head=True, logit_softcap=2.0,
           zero_init_proj=True)
pytestmark = pytest.mark.usefixtures("exact_f32")


@pytest.mark.parametrize("name", [*OPTIONS, "all"])
@pytest.mark.slow
def test_option_keeps_shapes_causality_and_cached_decoding(name):
    cfg = dataclasses.replace(BASE, **(ALL if name == "all" else OPTIONS[name]))
    model = build_model(cfg, 0)
    graphdef, params = nnx.split(model, nnx.Param)
    if cfg.zero_init_proj:  # zero projections make every block the identity at init: train a bit first
        for path in (("attn", "c_proj"), ("mlp", "c_proj")):
            for i in range(cfg.n_layer):
                assert not np.any(np.asarray(params["h"][i][path[0]][path[1]]["kernel"][...]))
        params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape), params)
        model = nnx.merge(graphdef, params)
    assert ("wpe" in params) == (cfg.pos_emb == "learned") and ("lm_head" in params) == cfg.untied_head
    idx = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
    t = 4
    changed = idx.at[:, t + 1:].set((idx[:, t + 1:] + 3) % cfg.vocab_size)
    a, b = model(idx), model(changed)
    assert a.dtype == jnp.float32 and a.shape == (2, 8, cfg.vocab_size)
    np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-6)  # no token sees the future
    assert not np.allclose(a[:, t + 1:], b[:, t + 1:])
    if cfg.logit_softcap:
        assert float(jnp.max(jnp.abs(a))) < cfg.logit_softcap
    # cached decoding: a prefill of 3 tokens, then one token and a chunk of 4 at positions 3..7
    # (rope rotates by absolute position, the cache holds rotated keys) == the full forward. The
    # engine's refill past the window is a prefill at position 0 again: the first part of this.
    cache = model.init_cache(2, cfg.block_size)
    parts = [model.decode(idx[:, :3], cache, 0)]
    parts.append(model.decode(idx[:, 3:4], parts[-1][1], 3))
    parts.append(model.decode(idx[:, 4:8], parts[-1][1], 4))
    np.testing.assert_allclose(jnp.concatenate([p[0] for p in parts], axis=1), a, atol=1e-5, rtol=1e-5)


def test_swiglu_and_untied_head_count_in_the_flops():
    classic = build_model(BASE, 0)
    modern = build_model(dataclasses.replace(BASE, mlp="swiglu", untied_head=True, pos_emb="rope"), 0)
    n_c, n_m = num_params(nnx.state(classic, nnx.Param)), num_params(nnx.state(modern, nnx.Param))
    width = 64  # 8 * 16 / 3 rounded up to a multiple of 32: c_fc (16, 2 x 64), c_proj (64, 16)
    assert n_m - n_c == BASE.n_layer * (16 * 2 * width + width * 16 - 2 * 16 * 64) + 16 * 13 - 8 * 16
    att = 12 * 2 * 2 * 8 * 8
    assert flops_per_token(BASE, n_c) == 6 * (n_c - 8 * 16) + att  # without wpe
    assert flops_per_token(modern.config, n_m) == 6 * n_m + att  # rope: no wpe to leave out


def muon_numpy(grads, beta, lr, bias_correct=False):
    """The published Muon (github.com/KellerJordan/Muon) on (in, out) kernels, float64: momentum
    lerp, Nesterov, 5 quintic Newton-Schulz steps on the Frobenius-normalised update (transposed
    when tall), scaled by sqrt(max(1, out / in)); the parameter moves by -lr x that. With
    bias_correct, the momentum and gradient are bias-corrected as optax does."""
    a, b, c = 3.4445, -4.7750, 2.0315
    buf, deltas = np.zeros_like(grads[0]), []
    for t, g in enumerate(grads, 1):
        buf = beta * buf + (1 - beta) * g
        if bias_correct:
            u = beta * buf / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta ** t)
        else:
            u = (1 - beta) * g + beta * buf
        x = u.T  # PyTorch's (out, in) layout
        tall = x.shape[0] > x.shape[1]
        x = x.T if tall else x
        x = x / (np.linalg.norm(x) + 1e-7)
        for _ in range(5):
            A = x @ x.T
            x = a * x + (b * A + c * A @ A) @ x
        x = x.T if tall else x
        deltas.append(-lr * x.T * max(1, x.shape[0] / x.shape[1]) ** 0.5)
    return deltas


@pytest.mark.parametrize("shape", [(6, 10), (10, 4)])
def test_muon_step_is_the_published_algorithm(shape):
    cfg = Config(optimizer="muon", muon_lr=0.1, muon_momentum=0.95, learning_rate=0.01, decay_lr=False, grad_clip=0.0,
                 weight_decay=0.0).validate()
    rng = np.random.default_rng(0)
    params = {"h": {0: {"attn": {"c_attn": {"kernel": jnp.asarray(rng.normal(size=shape), jnp.float32)}}}},
              "wte": {"embedding": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}}
    assert muon_labels(params) == {"h": {0: {"attn": {"c_attn": {"kernel": "muon"}}}}, "wte": {"embedding": "adamw"}}
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(3)]
    opt = make_optimizer(cfg)
    state, deltas = opt.init(params), []
    for g in grads:
        upd, state = opt.update(g, state, params)
        deltas.append(upd)
    kernel = lambda t: np.asarray(t["h"][0]["attn"]["c_attn"]["kernel"], np.float64)  # noqa: E731
    gk = [kernel(g) for g in grads]
    for ours, theirs in zip(deltas, muon_numpy(gk, 0.95, 0.1)):  # three steps: momentum included
        np.testing.assert_allclose(kernel(ours), theirs, atol=2e-5)
    # optax.contrib.muon bias-corrects the momentum: equal on step 1, not after (why we do not use it)
    from optax.contrib import muon as optax_muon
    o = optax_muon(0.1, beta=0.95, eps=1e-7)
    o_state, o_deltas = o.init({"k": gk[0]}), []
    for g in gk:
        upd, o_state = o.update({"k": jnp.asarray(g, jnp.float32)}, o_state, {"k": gk[0]})
        o_deltas.append(np.asarray(upd["k"]))
    np.testing.assert_allclose(o_deltas[0], kernel(deltas[0]), atol=2e-5)
    np.testing.assert_allclose(o_deltas[2], muon_numpy(gk, 0.95, 0.1, bias_correct=True)[2], atol=2e-5)
    assert not np.allclose(o_deltas[2], kernel(deltas[2]), atol=1e-3)
    # the embedding went to AdamW: its first step is -lr x sign(gradient)
    np.testing.assert_allclose(deltas[0]["wte"]["embedding"], -0.01 * np.sign(grads[0]["wte"]["embedding"]),
                               rtol=1e-4)


def test_trapezoid_schedule_and_muon_peak():
    cfg = Config(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=100, lr_schedule_kind="trapezoid",
                 cooldown_frac=0.4, muon_lr=0.02)
    s, m = lr_schedule(cfg), lr_schedule(cfg, cfg.muon_lr)
    assert float(s(4)) == pytest.approx(1e-3 * 5 / 11) and float(s(30)) == pytest.approx(1e-3)
    assert float(s(60)) == pytest.approx(1e-3) and float(s(80)) == pytest.approx(1e-3 - 0.5 * 9e-4)
    assert float(s(100)) == pytest.approx(1e-4) and float(s(500)) == pytest.approx(1e-4)
    assert float(m(80)) == pytest.approx(20 * float(s(80)))  # the same shape at muon_lr


@pytest.mark.parametrize("key, value, message", [("pos_emb", "alibi", "pos_emb"), ("mlp", "gelu2", "mlp"),
                                                 ("optimizer", "sgd", "optimizer"), ("muon_momentum", "1.0", "in [0, 1)"),
                                                 ("logit_softcap", "-1", ">= 0"), ("n_embd", "18", "even head size")])
def test_bad_modern_settings_are_user_errors(key, value, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_args(["--n_head=2", "--n_embd=16", "--pos_emb=rope", f"--{key}={value}"]).validate()


MODERN_FLAGS = dict(ALL, mlp="relu2", optimizer="muon", muon_lr=0.02, lr_schedule_kind="trapezoid")


@pytest.mark.slow  # over 10 s: runs trained and resumed
def test_muon_run_resumes_exactly_and_refuses_gpt2_layouts(tmp_path, corpus_file):
    run = lambda sub, **kw: train(parse_args(tiny_args(tmp_path / sub, corpus_file, eval_interval=3,  # noqa: E731
                                                       eval_iters=1, **{**MODERN_FLAGS, **kw})), log=lambda s: None)
    run("a", max_iters=6)
    run("b", max_iters=3)
    run("b", max_iters=6, init_from="resume")
    (_, pa, cfg_a, *_), (_, pb, *_) = load(str(tmp_path / "a" / "out"), "latest"), load(str(tmp_path / "b" / "out"), "latest")
    assert cfg_a.pos_emb == "rope" and cfg_a.untied_head  # the checkpoint carries the options
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(UserError, match="cannot resume: the model differs.*pos_emb"):
        run("b", max_iters=9, init_from="resume", pos_emb="learned")
    with pytest.raises(UserError, match="GPT-2's layout.*pos_emb=rope, norm=rmsnorm, qk_norm, mlp=relu2, "
                                        "untied_head, logit_softcap=2"):
        export_hf(jax.tree.map(np.asarray, pa), cfg_a, str(tmp_path / "hf"))
    # a modern run is a starting point (init_from, a LoRA base) in its own layout
    w = load_weights(str(tmp_path / "a" / "out"))
    assert w.params is not None and weights_config(w).non_gpt2_options() == cfg_a.non_gpt2_options()
    # zero_init_proj alone is only an init: such a model keeps GPT-2's layout
    assert ModelConfig(zero_init_proj=True).non_gpt2_options() == []

