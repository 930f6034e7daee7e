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


@pytest.mark.slow
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


@pytest.mark.slow
def test_splash_is_causal(interpret):
    """A change at token t changes no output before t."""
    q, k, v = jax.random.normal(jax.random.key(1), (3, 1, 256, 2, 32))
    f = jax.jit(lambda q, k, v: attention(q, k, v, "splash"))
    t = 200
    out1 = f(q, k, v)
    out2 = f(q.at[:, t:].add(1.0), k.at[:, t:].add(1.0), v.at[:, t:].add(1.0))
    np.testing.assert_array_equal(out1[:, :t], out2[:, :t])
    assert not np.allclose(out1[:, t:], out2[:, t:])


@pytest.mark.slow
def test_splash_in_bfloat16_matches_within_bfloat16_rounding(interpret):
    q, k, v = jax.random.normal(jax.random.key(2), (3, 2, 256, 2, 64))
    ref = causal_attention(q, k, v)
    b = lambda t: t.astype(jnp.bfloat16)  # noqa: E731
    out = jax.jit(lambda q, k, v: attention(q, k, v, "splash"))(b(q), b(k), b(v))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=3e-2)  # bf16 inputs: 8-bit mantissa


@pytest.mark.slow
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


SHARDED = r"""
import json
import jax, numpy as np
from jaxgpt import lowering, parallel
from jaxgpt import model as model_lib
from jaxgpt.config import Config
from jaxgpt.model import ModelConfig
from jaxgpt.step import abstract_state, init_state, make_train_step
model_lib.SPLASH_INTERPRET = True
out = {}
for sharding in ("dp", "fsdp"):
    for impl in ("explicit", "splash"):
        m = ModelConfig(vocab_size=50, block_size=128, n_layer=1, n_head=2, n_embd=64, attn_impl=impl)
        cfg = Config(batch_size=4, block_size=128, sharding=sharding, learning_rate=1e-2, warmup_iters=0)
        mesh = parallel.make_mesh(cfg.sharding, cfg.mesh_shape)
        graphdef, abstract, opt = abstract_state(m, cfg)
        sh = parallel.state_shardings(abstract, mesh)
        step = make_train_step(graphdef, opt, cfg, sh, parallel.batch_sharding(mesh, 3), parallel.replicated(mesh))
        state = jax.jit(lambda k: init_state(m, cfg, k)[1], out_shardings=sh)(jax.random.key(0))
        idx = jax.random.randint(jax.random.key(1), (1, 4, 129), 0, 50)
        batch = jax.device_put((idx[..., :-1], idx[..., 1:]), parallel.batch_sharding(mesh, 3))
        state, metrics = step(state, batch, jax.random.key(2))
        out[f"{sharding}-{impl}"] = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"])}
    model_lib.SPLASH_INTERPRET = False  # the TPU kernel itself, lowered for a TPU with this sharding
    step = make_train_step(graphdef, opt, cfg, sh, parallel.batch_sharding(mesh, 3), parallel.replicated(mesh))
    tok = jax.ShapeDtypeStruct((1, 4, 128), jax.numpy.int32)
    out[f"{sharding}-lowering"] = lowering.check({"train_step": (step, (abstract, (tok, tok), jax.random.key(0)))},
                                                 ["tpu"])
    model_lib.SPLASH_INTERPRET = True
print(json.dumps(out))
"""


@pytest.mark.slow
def test_splash_on_several_devices_runs_per_device_and_lowers_for_tpu():
    """XLA cannot partition a Mosaic kernel ('Mosaic kernels cannot be automatically partitioned'
    when a step over several devices is lowered for a TPU): the steps trace under their mesh and
    splash runs per device with shard_map. On a CPU split into 2 devices, with the batch sharded
    (dp) and the parameters sharded (fsdp): a train step with splash (interpret mode) gives the
    explicit attention's loss and gradient norm, and the step with the TPU kernel lowers for tpu."""
    import json
    import subprocess
    import sys

    from conftest import ROOT, subprocess_env

    r = subprocess.run([sys.executable, "-c", SHARDED], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=subprocess_env(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for sharding in ("dp", "fsdp"):
        assert out[f"{sharding}-lowering"] == []
        ref, got = out[f"{sharding}-explicit"], out[f"{sharding}-splash"]
        # float32: online softmax against one softmax
        np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
        np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-4)
