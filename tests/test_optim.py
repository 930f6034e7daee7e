"""The optimizer: nanoGPT's learning-rate schedule, AdamW's weight-decay mask, gradient clipping,
and the learning rate a step logs being the one it applies (also after skipped steps).

Expected values are computed here from the recipe's formulas, never by calling the code under test.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxgpt import step as step_lib
from jaxgpt.config import parse_args
from jaxgpt.model import ModelConfig, build_model
from jaxgpt.optim import lr_schedule, make_optimizer

LR, MIN_LR, WARMUP, DECAY = 1e-3, 1e-4, 10, 110


def cfg(**kw):
    base = dict(learning_rate=LR, min_lr=MIN_LR, warmup_iters=WARMUP, lr_decay_iters=DECAY)
    base.update(kw)
    return parse_args([f"--{k}={v}" for k, v in base.items()])


def cosine(ratio):
    return MIN_LR + 0.5 * (1 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


# (step, lr): linear warm-up from lr / (warmup + 1), the peak at warmup_iters, cosine to min_lr at
# lr_decay_iters, min_lr after it
SCHEDULE = [(0, LR * 1 / 11), (4, LR * 5 / 11), (9, LR * 10 / 11), (10, LR), (35, cosine(0.25)),
            (60, (LR + MIN_LR) / 2), (85, cosine(0.75)), (110, MIN_LR), (111, MIN_LR), (5000, MIN_LR)]


def test_lr_schedule_warms_up_decays_by_cosine_and_floors_at_min_lr():
    schedule = lr_schedule(cfg())
    got = [float(schedule(it)) for it, _ in SCHEDULE]
    # float32 arithmetic: 1e-6 relative
    np.testing.assert_allclose(got, [lr for _, lr in SCHEDULE], rtol=1e-6)
    assert abs(cosine(0.25) - (MIN_LR + 0.8535533905932737 * (LR - MIN_LR))) < 1e-15  # the formula itself


def test_decay_lr_false_keeps_the_learning_rate():
    schedule = lr_schedule(cfg(decay_lr=False))
    assert [float(schedule(it)) for it in (0, 5, 10, 200)] == [np.float32(LR)] * 4


def test_the_optimizer_applies_the_schedule():
    """With a constant gradient Adam's normalised step is sign(g) (bias correction makes m / sqrt(v) exact),
    so the size of each update is the learning rate applied at that step."""
    opt = make_optimizer(cfg(weight_decay=0.0, grad_clip=0.0))
    params = {"w": jnp.zeros((4, 3))}
    grads = {"w": jnp.full((4, 3), 1e3)}  # eps = 1e-8 is 1e-11 of |g|
    state = opt.init(params)
    update = jax.jit(opt.update)
    applied = []
    for _ in range(DECAY + 2):
        u, state = update(grads, state, params)
        applied.append(-float(u["w"][0, 0]))
    expected = dict(SCHEDULE)
    np.testing.assert_allclose([applied[it] for it in expected if it < len(applied)],
                               [lr for it, lr in expected.items() if it < len(applied)], rtol=1e-6)


@pytest.mark.slow
def test_weight_decay_applies_to_matrices_and_embeddings_only():
    """One AdamW step with a zero gradient moves only the weight decay: p -> p (1 - lr wd) for the
    embeddings and Linear kernels, nothing for biases and LayerNorm parameters."""
    model_cfg = ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, bias=True)
    params = nnx.to_pure_dict(nnx.state(build_model(model_cfg, 0), nnx.Param))
    params["ln_f"]["bias"] = jnp.full_like(params["ln_f"]["bias"], 0.5)  # nonzero, so a decay would show
    opt = make_optimizer(cfg(weight_decay=0.1, warmup_iters=0, decay_lr=False))
    new = jax.jit(lambda p: optax.apply_updates(p, opt.update(jax.tree.map(jnp.zeros_like, p), opt.init(p), p)[0]))(params)
    decayed, kept = set(), set()
    for (path, p), q in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(new)):
        name = "/".join(str(k.key) for k in path)
        if np.array_equal(np.asarray(q), np.asarray(p)):
            kept.add(name)
        else:
            np.testing.assert_allclose(q, np.asarray(p) * (1 - LR * 0.1), rtol=1e-6, err_msg=name)
            decayed.add(name)
    assert decayed == {"wte/embedding", "wpe/embedding", "h/0/attn/c_attn/kernel", "h/0/attn/c_proj/kernel",
                       "h/0/mlp/c_fc/kernel", "h/0/mlp/c_proj/kernel"}
    assert kept == {"ln_f/scale", "ln_f/bias"} | {f"h/0/{m}/{b}" for m in ("ln_1", "ln_2") for b in ("scale", "bias")} \
        | {f"h/0/{m}/bias" for m in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")}


def adam_mu(opt_state):
    """Adam's first moment (what a step's gradient enters Adam as: after one step, (1 - beta1) g)."""
    return optax.tree_utils.tree_get(opt_state, "mu")


@pytest.mark.parametrize("clip, norm, scale", [(1.0, 10.0, 0.1), (1.0, 0.5, 1.0), (0.0, 10.0, 1.0)])
@pytest.mark.slow
def test_grad_clip_scales_the_global_norm_down_to_grad_clip(clip, norm, scale):
    """Adam's first step is sign(g) whatever |g|, so clipping shows in its first moment: the gradient
    of global norm `norm` enters Adam scaled to grad_clip when larger, unchanged otherwise or with
    grad_clip=0."""
    opt = make_optimizer(cfg(grad_clip=clip, weight_decay=0.0))
    g = {"a": jnp.array([3.0, 4.0]) * norm / 5 / math.sqrt(2), "b": jnp.array([[4.0, 3.0]]) * norm / 5 / math.sqrt(2)}
    params = jax.tree.map(jnp.zeros_like, g)
    _, state = opt.update(g, opt.init(params), params)
    for name in g:
        np.testing.assert_allclose(adam_mu(state)[name], 0.1 * np.asarray(g[name]) * scale, rtol=1e-6)


@pytest.mark.slow
def test_logged_lr_is_the_applied_lr_after_skipped_steps(monkeypatch):
    """Steps 2 and 3 have a NaN loss and are skipped; step i still logs and applies lr_schedule(i) (nanoGPT's
    get_lr(iter)). The applied rate is measured from the weights: with no weight decay a step moves p by
    -lr * m_hat / (sqrt(v_hat) + eps), Adam's moments bias-corrected over the steps actually taken."""
    real = step_lib.model_loss
    vocab = 11
    # a target id of vocab - 1 marks a batch whose loss is NaN
    monkeypatch.setattr(step_lib, "model_loss", lambda model, x, targets, key, remat="", masked=False: real(model, x, targets, key, remat, masked)
                        * jnp.where((targets == vocab - 1).any(), jnp.nan, 1.0))
    c = cfg(learning_rate=1e-2, min_lr=1e-3, warmup_iters=2, lr_decay_iters=8, weight_decay=0.0, grad_clip=0.0)
    model_cfg = ModelConfig(vocab_size=vocab, block_size=8, n_layer=1, n_head=2, n_embd=8)
    graphdef, state, opt = step_lib.init_state(model_cfg, c, jax.random.key(0))
    train_step = step_lib.make_train_step(graphdef, opt, c)
    expected_lr = {0: 1e-2 / 3, 1: 2e-2 / 3, 4: 1e-3 + 0.75 * 9e-3, 5: 1e-3 + 0.5 * 9e-3}
    taken = 0
    for it in range(6):
        x = jax.random.randint(jax.random.key(it), (1, 2, 9), 0, vocab - 1)
        if it in (2, 3):
            x = x.at[0, 0, 5].set(vocab - 1)
        before = jax.tree.map(np.asarray, state.params)
        state, metrics = train_step(state, (x[..., :-1], x[..., 1:]), jax.random.key(1))
        assert int(state.skipped) == (it >= 2) + (it >= 3)
        if it in (2, 3):
            continue
        taken += 1
        b1, b2 = c.beta1, c.beta2
        mu, nu = adam_mu(state.opt_state), optax.tree_utils.tree_get(state.opt_state, "nu")
        direction = jax.tree.map(lambda m, v: (m / (1 - b1 ** taken)) / (np.sqrt(v / (1 - b2 ** taken)) + 1e-8), mu, nu)
        rates = [-(np.asarray(a) - b)[np.abs(d) > 0.5] / np.asarray(d)[np.abs(d) > 0.5]
                 for a, b, d in zip(jax.tree.leaves(state.params), jax.tree.leaves(before), jax.tree.leaves(direction))]
        applied = np.concatenate(rates)
        assert applied.size > 100
        # float32: weights near 1 move by ~lr, so the measured rate carries ~1e-5 relative rounding
        np.testing.assert_allclose(applied, expected_lr[it], rtol=1e-3, err_msg=f"applied lr at iter {it}")
        np.testing.assert_allclose(float(metrics["lr"]), expected_lr[it], rtol=1e-6, err_msg=f"logged lr at iter {it}")
