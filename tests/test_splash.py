"""Splash attention (Pallas, TPU flash attention: attn_impl='splash') checked on a CPU in Pallas
interpret mode, where the kernel runs as ordinary XLA operations: forward and backward against the
explicit attention, causal masking across several tiles, the XLA fallback for sequence lengths it
does not tile, and a model that trains and decodes with it. Its lowering for TPUs is checked in
test_lowering.py; its speed on a TPU is not measured."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt import model as model_lib
from jaxgpt.model import ModelConfig, attention, build_model, causal_attention
from jaxgpt.sampling import Engine


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setattr(model_lib, "SPLASH_INTERPRET", True)


def loss_and_grads(impl, q, k, v, w):
    """sum(attention * w) and its gradients with respect to q, k, v."""
    f = lambda q, k, v: jnp.sum(attention(q, k, v, impl).astype(jnp.float32) * w)  # noqa: E731
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)


def test_splash_matches_explicit_attention_forward_and_backward(interpret):
    q, k, v, w = jax.random.normal(jax.random.key(0), (4, 2, 384, 3, 32))  # 3 x 3 tiles of 128: the causal
    # mask within the diagonal tiles and the skip of the tiles above them
    ref = causal_attention(q, k, v)
    out = jax.jit(lambda q, k, v: attention(q, k, v, "splash"))(q, k, v)
    # float32 throughout: only the order of the sums differs (online softmax); measured ~1e-6
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    (l_ref, g_ref), (l_s, g_s) = loss_and_grads("explicit", q, k, v, w), loss_and_grads("splash", q, k, v, w)
    np.testing.assert_allclose(l_s, l_ref, rtol=1e-5)
    for a, b in zip(g_s, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_splash_is_causal(interpret):
    """A change at token t changes no output before t."""
    q, k, v = jax.random.normal(jax.random.key(1), (3, 1, 256, 2, 32))
    f = jax.jit(lambda q, k, v: attention(q, k, v, "splash"))
    t = 200
    out1 = f(q, k, v)
    out2 = f(q.at[:, t:].add(1.0), k.at[:, t:].add(1.0), v.at[:, t:].add(1.0))
    np.testing.assert_array_equal(out1[:, :t], out2[:, :t])
    assert not np.allclose(out1[:, t:], out2[:, t:])


def test_splash_in_bfloat16_matches_within_bfloat16_rounding(interpret):
    q, k, v = jax.random.normal(jax.random.key(2), (3, 2, 256, 2, 64))
    ref = causal_attention(q, k, v)
    b = lambda t: t.astype(jnp.bfloat16)  # noqa: E731
    out = jax.jit(lambda q, k, v: attention(q, k, v, "splash"))(b(q), b(k), b(v))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=3e-2)  # bf16 inputs: 8-bit mantissa


def test_a_length_splash_does_not_tile_falls_back_to_xla(interpret):
    q, k, v = jax.random.normal(jax.random.key(3), (3, 2, 40, 2, 16))
    assert not model_lib.splash_fits(40) and model_lib.splash_fits(128)
    np.testing.assert_allclose(attention(q, k, v, "splash"), causal_attention(q, k, v), atol=1e-5)


CFG = ModelConfig(vocab_size=50, block_size=128, n_layer=2, n_head=2, n_embd=64)


@pytest.mark.slow
def test_a_splash_model_trains_and_decodes_as_the_explicit_one(interpret):
    """The full-sequence forward and its gradients use splash; decoding with a KV cache keeps the
    explicit cached attention (a query of one token over a cache that fills up is no causal
    self-attention of T x T tiles), so the same weights decode the same tokens."""
    m_exp, m_spl = build_model(CFG, 0), build_model(ModelConfig(**{**CFG.to_dict(), "attn_impl": "splash"}), 0)
    idx = jax.random.randint(jax.random.key(4), (2, 128), 0, CFG.vocab_size)

    def value_and_grad(model):
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(params):
            logits, targets = nnx.merge(graphdef, params)(idx), jnp.roll(idx, -1, axis=1)  # (B, T, V), (B, T)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0])

        return jax.jit(jax.value_and_grad(loss))(params)

    (l_e, g_e), (l_s, g_s) = value_and_grad(m_exp), value_and_grad(m_spl)
    np.testing.assert_allclose(l_s, l_e, rtol=1e-5)  # float32: online softmax vs one softmax
    for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_e)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-3)
    prompt = [int(t) for t in idx[0, :5]]
    tokens = []
    for m in (m_exp, m_spl):
        graphdef, params = nnx.split(m, nnx.Param)
        tokens.append(Engine(graphdef, params, CFG.block_size).generate(
            prompt, max_new_tokens=140, temperature=0, key=jax.random.key(0)).tokens)  # past the window: refills
    np.testing.assert_array_equal(tokens[0], tokens[1])
