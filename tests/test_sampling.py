import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt.config import UserError
from jaxgpt.model import ModelConfig, build_model
from jaxgpt.sampling import Engine, bucket, find_stop, generate, sample_token

CFG = ModelConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture(scope="module")
def model():
    return nnx.split(build_model(CFG, 0), nnx.Param)


def uncached_next_logits(graphdef, params, ids, start):
    """The plain full forward pass over ids[start:], logits of the last position."""
    return nnx.merge(graphdef, params)(jnp.asarray([ids[start:]]))[0, -1]


@pytest.mark.parametrize("model_type", ["gpt", "bigram"])
@pytest.mark.parametrize("prompt_len, keep", [(3, 0), (11, 0), (5, 5), (1, 1)])
def test_cached_logits_equal_uncached_at_every_position(prompt_len, keep, model_type):
    """Greedy decoding one token per chunk; after each token the cache's logits must equal
    the uncached model's on the engine's context window, also far past block_size."""
    cfg = ModelConfig(**{**CFG.to_dict(), "model_type": model_type})
    graphdef, params = nnx.split(build_model(cfg, 0), nnx.Param)
    engine = Engine(graphdef, params, cfg.block_size, chunk=1)
    block, keep = cfg.block_size, keep or cfg.block_size
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, cfg.vocab_size, prompt_len)]
    N, Pb = 1, bucket(prompt_len, 1 << 30)
    L = Pb + 30
    buf = jnp.zeros((N, L), jnp.int32).at[:, :prompt_len].set(jnp.asarray(prompt))
    Tb = min(bucket(prompt_len, block), block) if prompt_len <= block else block
    carry = jax.jit(engine._prefill_fn(N, L, Tb))(params, buf, jnp.int32(prompt_len))
    step = jax.jit(engine._chunk_fn(N, 0.0, None, 1.0, keep))
    keys = jax.random.split(jax.random.key(0), N)
    ids, start = list(prompt), max(0, prompt_len - block)
    for _ in range(3 * block):
        ref = uncached_next_logits(graphdef, params, ids, start)
        np.testing.assert_allclose(carry["logits"][0], ref, atol=1e-5, rtol=1e-5)
        carry = step(params, carry, keys)
        ids.append(int(carry["buf"][0, len(ids)]))
        assert ids[-1] == int(jnp.argmax(ref))
        if len(ids) - start > block:  # the engine's rule: refill from the last `keep` tokens
            start = len(ids) - keep
    if keep == block:  # the default is nanoGPT's crop: always the last block_size tokens
        assert start == len(ids) - block


def greedy_reference(graphdef, params, prompt, n):
    model = nnx.merge(graphdef, params)
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(jnp.argmax(model(jnp.asarray([ids[-CFG.block_size:]]))[0, -1])))
    return ids[len(prompt):]


def gen(model, **kw):
    graphdef, params = model
    kw.setdefault("key", jax.random.key(0))
    return np.asarray(generate(graphdef, params, kw.pop("prompt", [1, 2, 3]), block_size=CFG.block_size, **kw))


def test_greedy_forms_agree_past_block_size(model):
    ref = greedy_reference(*model, [1, 2, 3], 40)  # 43 tokens > block_size 8
    for kw in ({"top_k": 1}, {"temperature": 0.0}, {"top_p": 1e-6}):
        np.testing.assert_array_equal(gen(model, max_new_tokens=40, **kw)[0], ref, err_msg=str(kw))


def test_top_p_one_is_plain_sampling(model):
    a = gen(model, max_new_tokens=30, num_samples=3, top_p=1.0, key=jax.random.key(4))
    b = gen(model, max_new_tokens=30, num_samples=3, key=jax.random.key(4))
    np.testing.assert_array_equal(a, b)


def test_seeds_and_parallel_equals_one_at_a_time(model):
    graphdef, params = model
    engine = Engine(graphdef, params, CFG.block_size)
    keys = jax.random.split(jax.random.key(7), 4)
    batch = engine.generate([1, 2, 3], max_new_tokens=25, keys=keys).tokens
    for i in range(4):
        alone = engine.generate([1, 2, 3], max_new_tokens=25, keys=keys[i:i + 1]).tokens
        np.testing.assert_array_equal(batch[i], alone[0])
    again = engine.generate([1, 2, 3], max_new_tokens=25, keys=keys).tokens
    other = engine.generate([1, 2, 3], max_new_tokens=25, keys=jax.random.split(jax.random.key(8), 4)).tokens
    np.testing.assert_array_equal(batch, again)
    assert not np.array_equal(batch, other)
    assert len({tuple(r) for r in batch}) > 1 and batch.min() >= 0 and batch.max() < CFG.vocab_size


def test_prompts_in_one_bucket_share_a_compilation(model):
    engine = Engine(*model, CFG.block_size)
    engine.generate([1, 2, 3], max_new_tokens=5, key=jax.random.key(0))
    n = len(engine._compiled)
    engine.generate([4, 5, 6, 7], max_new_tokens=5, key=jax.random.key(0))  # 3 and 4 share bucket 4
    assert len(engine._compiled) == n and engine.compile_seconds == 0.0


def test_top_k_and_top_p_restrict_choices():
    logits = jnp.log(jnp.array([0.05, 0.5, 0.3, 0.05, 0.1]))
    keys = jax.random.split(jax.random.key(0), 300)
    draw = lambda **kw: set(np.asarray(jax.vmap(lambda k: sample_token(k, logits, 1.0, **kw))(keys)).tolist())
    assert draw(top_k=2) == {1, 2}
    assert draw(top_p=0.75) == {1, 2}  # 0.5 < 0.75, 0.5 + 0.3 reaches it
    assert draw(top_p=0.85) == {1, 2, 4}


def test_stop_sequence(model):
    graphdef, params = model
    result = Engine(graphdef, params, CFG.block_size).generate([1], max_new_tokens=64, key=jax.random.key(0),
                                                               num_samples=2, stop=[3])
    for row, n in zip(result.tokens, result.lengths):
        at = find_stop(row, [3])
        assert n == (at if at >= 0 else len(row))


def test_bad_sampling_arguments(model):
    for kw, msg in [({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": 5, "temperature": -1.0}, "temperature"),
                    ({"max_new_tokens": 5, "top_k": 0}, "top_k"), ({"max_new_tokens": 5, "top_p": 0.0}, "top_p"),
                    ({"max_new_tokens": 5, "top_p": 1.5}, "top_p"), ({"max_new_tokens": 5, "prompt": []}, "empty"),
                    ({"max_new_tokens": 5, "window_keep": 9}, "window_keep")]:
        with pytest.raises(UserError, match=msg):
            gen(model, **kw)
