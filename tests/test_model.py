import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxgpt.model import GPT, ModelConfig, build_model, causal_attention
from jaxgpt.step import cross_entropy

TINY = ModelConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=32)
# float32 models compared with float32 references at 1e-5..1e-6: exact float32 matmuls on any device
pytestmark = pytest.mark.usefixtures("exact_f32")


@pytest.mark.slow
def test_four_forms_of_causal_averaging_agree():
    """The lecture's build-up: each position averages itself and the positions before it."""
    B, T, C = 2, 8, 4
    x = jax.random.normal(jax.random.key(0), (B, T, C))
    # 1. an explicit loop over time steps
    loop = np.zeros((B, T, C), np.float32)
    for t in range(T):
        loop[:, t] = np.asarray(x[:, :t + 1]).mean(axis=1)
    # 2. a matmul with the row-normalised lower-triangular matrix
    w = jnp.tril(jnp.ones((T, T)))
    matmul = (w / w.sum(axis=1, keepdims=True)) @ x
    # 3. softmax over zeros masked with -inf above the diagonal
    scores = jnp.where(jnp.tril(jnp.ones((T, T))) == 1, jnp.zeros((T, T)), -jnp.inf)
    softmax = jax.nn.softmax(scores, axis=-1) @ x
    # 4. one self-attention head whose affinities are all equal (q = 0, so q kᵀ = 0)
    q = jnp.zeros((B, T, 1, C))
    head = causal_attention(q, x[:, :, None, :], x[:, :, None, :])[:, :, 0, :]
    for other in (matmul, softmax, head):
        np.testing.assert_allclose(loop, other, atol=1e-6)


@pytest.mark.parametrize("model_type", ["gpt", "bigram"])
@pytest.mark.slow
def test_causality(model_type):
    cfg = ModelConfig(**{**TINY.to_dict(), "model_type": model_type})
    model = build_model(cfg, 0)
    idx = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    t = 9
    changed = idx.at[:, t + 1:].set((idx[:, t + 1:] + 3) % cfg.vocab_size)
    a, b = model(idx), model(changed)
    assert a.dtype == jnp.float32 and a.shape == (2, 16, cfg.vocab_size)
    np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-6)
    assert not np.allclose(a[:, t + 1:], b[:, t + 1:])


@pytest.mark.parametrize("model_type", ["gpt", "bigram"])
@pytest.mark.slow
def test_initial_loss_is_log_vocab(model_type):
    cfg = ModelConfig(**{**TINY.to_dict(), "model_type": model_type, "vocab_size": 65})
    model = build_model(cfg, 0)
    idx = jax.random.randint(jax.random.key(2), (8, 16), 0, 65)
    loss = float(cross_entropy(model(idx), jnp.roll(idx, -1, axis=1)))
    assert abs(loss - math.log(65)) < 0.05, loss


@pytest.mark.slow
def test_gpt2_names_and_init_recipe():
    model = GPT(ModelConfig(vocab_size=50, block_size=16, n_layer=4, n_head=2, n_embd=64, bias=True),
                rngs=nnx.Rngs(0))
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for n in ("wte/embedding", "wpe/embedding", "h/0/ln_1/scale", "h/0/attn/c_attn/kernel",
              "h/0/attn/c_proj/kernel", "h/0/ln_2/bias", "h/3/mlp/c_fc/kernel", "h/3/mlp/c_proj/kernel",
              "ln_f/scale"):
        assert n in names, (n, sorted(names))
    std = lambda a: float(jnp.std(a[...]))
    # each std is estimated from >= 1024 draws: its standard error is <= 0.02 / sqrt(2 * 1024) = 0.00044,
    # so 0.002 is >= 4.5 standard errors and still rejects 0.022 (10% off the recipe)
    for w in (model.wte.embedding, model.wpe.embedding, model.h[0].attn.c_attn.kernel, model.h[3].attn.c_attn.kernel,
              model.h[0].mlp.c_fc.kernel):
        assert w[...].size >= 1024 and abs(std(w) - 0.02) < 0.002, (w[...].shape, std(w))
    assert abs(std(model.h[0].mlp.c_proj.kernel) - 0.02 / math.sqrt(8)) < 0.001
    assert abs(std(model.h[1].attn.c_proj.kernel) - 0.02 / math.sqrt(8)) < 0.001
    assert float(jnp.abs(model.h[0].attn.c_attn.bias[...]).max()) == 0.0


@pytest.mark.parametrize("model_type, steps, target", [("gpt", 150, 0.1), ("bigram", 300, None)])
@pytest.mark.slow
def test_overfits_one_batch(model_type, steps, target):
    cfg = ModelConfig(**{**TINY.to_dict(), "model_type": model_type})
    model = build_model(cfg, 0)
    graphdef, params = nnx.split(model, nnx.Param)
    idx = jax.random.randint(jax.random.key(5), (4, 17), 0, cfg.vocab_size)
    x, y = idx[:, :-1], idx[:, 1:]
    opt = optax.adam(1e-2 if model_type == "gpt" else 1e-1)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state):
        loss, g = jax.value_and_grad(lambda p: cross_entropy(nnx.merge(graphdef, p)(x), y))(params)
        u, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, u), opt_state, loss

    first = None
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        first = float(loss) if first is None else first
    if target is None:
        # a bigram can only reach the entropy of the batch's next-token given current-token table
        pairs = {}
        for a, b in zip(np.asarray(x).ravel(), np.asarray(y).ravel()):
            pairs.setdefault(int(a), []).append(int(b))
        target = np.mean([-np.log(ys.count(b) / len(ys)) for ys in pairs.values() for b in ys]) + 0.05
    assert float(loss) < target < first, (first, float(loss), target)


@pytest.mark.slow
def test_dropout_key_changes_output_and_none_is_deterministic():
    cfg = ModelConfig(**{**TINY.to_dict(), "dropout": 0.5})
    model = build_model(cfg, 0)
    idx = jnp.zeros((1, 8), jnp.int32)
    np.testing.assert_array_equal(model(idx), model(idx))
    a, b = model(idx, jax.random.key(1)), model(idx, jax.random.key(2))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, model(idx, jax.random.key(1)))


@pytest.mark.slow
def test_attention_implementations_agree_with_the_explicit_reference():
    from jaxgpt.model import attention, pick_attention
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 16, 4, 8))
    ref = causal_attention(q, k, v)
    np.testing.assert_allclose(attention(q, k, v, "xla"), ref, atol=1e-5)
    # what auto picks here: never cuDNN for float32 (it has no float32 kernel), the explicit form on CPUs
    assert pick_attention("auto", "float32", 8, log=lambda s: None) in (("explicit",) if jax.default_backend() == "cpu"
                                                                       else ("xla",))
    impl = pick_attention("auto", "bfloat16", 8, log=lambda s: None)
    assert impl in ("explicit", "xla", "cudnn")
    if jax.default_backend() == "cpu":
        assert impl == "explicit"
    if impl == "cudnn":  # on an NVIDIA GPU the flash path must match too (bf16 tolerance)
        b = lambda t: t.astype(jnp.bfloat16)
        np.testing.assert_allclose(attention(b(q), b(k), b(v), "cudnn").astype(jnp.float32), ref, atol=3e-2)
    # a whole model gives the same logits with either implementation
    idx = jax.random.randint(jax.random.key(1), (2, 16), 0, TINY.vocab_size)
    m_explicit = build_model(TINY, 0)
    m_xla = build_model(ModelConfig(**{**TINY.to_dict(), "attn_impl": "xla"}), 0)
    np.testing.assert_allclose(m_explicit(idx), m_xla(idx), atol=1e-5)
