import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt.config import UserError
from jaxgpt.model import ModelConfig, build_model
from jaxgpt.sampling import generate, sample_token

CFG = ModelConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture(scope="module")
def model():
    m = build_model(CFG, 0)
    return nnx.split(m, nnx.Param)


def greedy_reference(graphdef, params, prompt, n):
    """Plain full-forward greedy decoding with the context cropped to block_size."""
    model = nnx.merge(graphdef, params)
    ids = list(prompt)
    for _ in range(n):
        ctx = jnp.asarray([ids[-CFG.block_size:]])
        ids.append(int(jnp.argmax(model(ctx)[0, -1])))
    return ids[len(prompt):]


def gen(model, **kw):
    graphdef, params = model
    kw.setdefault("key", jax.random.key(0))
    return np.asarray(generate(graphdef, params, kw.pop("prompt", [1, 2, 3]), block_size=CFG.block_size, **kw))


def test_top_k_1_and_temperature_0_are_greedy_past_block_size(model):
    ref = greedy_reference(*model, [1, 2, 3], 20)  # 23 tokens > block_size 8: cropping is exercised
    np.testing.assert_array_equal(gen(model, max_new_tokens=20, top_k=1)[0], ref)
    np.testing.assert_array_equal(gen(model, max_new_tokens=20, temperature=0.0)[0], ref)


def test_same_seed_same_samples_and_parallel_equals_one_at_a_time(model):
    a = gen(model, max_new_tokens=12, num_samples=3, key=jax.random.key(7))
    b = gen(model, max_new_tokens=12, num_samples=3, key=jax.random.key(7))
    c = gen(model, max_new_tokens=12, num_samples=3, key=jax.random.key(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len({tuple(r) for r in a}) > 1  # samples in a batch differ from each other
    assert a.shape == (3, 12) and a.min() >= 0 and a.max() < CFG.vocab_size


def test_top_k_restricts_choices():
    logits = jnp.array([0.0, 5.0, 4.0, -1.0, 3.0])
    draws = jax.vmap(lambda k: sample_token(k, logits, 1.0, 2))(jax.random.split(jax.random.key(0), 200))
    assert set(np.asarray(draws).tolist()) == {1, 2}


def test_bad_sampling_arguments(model):
    for kw, msg in [({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": 5, "temperature": -1.0}, "temperature"),
                    ({"max_new_tokens": 5, "top_k": 0}, "top_k"), ({"max_new_tokens": 5, "prompt": []}, "empty")]:
        with pytest.raises(UserError, match=msg):
            gen(model, **kw)
