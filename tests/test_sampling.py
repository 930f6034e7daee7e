"""The decoding engine, through its public generate(): every request length, against the plain
uncached model.

The engine's rule past the context window, restated here independently of its code: the token
at buffer index n is drawn from the model's logits over the window ids[start:n]. The window
starts at max(0, P - block_size) for a prompt of P tokens; when it would grow past block_size,
it restarts at n - window_keep (window_keep = block_size by default: nanoGPT's crop to the last
block_size tokens).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt.errors import UserError
from jaxgpt.model import ModelConfig, build_model
from jaxgpt.sampling import Engine, find_stop, generate, sample_token

CFG = ModelConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16)
# float32 logits of the cache and of the plain forward agree to rounding on CPU; a GPU computes
# float32 matmuls in TF32 unless asked, so the comparisons run at 'highest' precision
TOL = dict(atol=1e-5, rtol=1e-5)
pytestmark = pytest.mark.usefixtures("exact_f32")


MODELS = {kind: nnx.split(build_model(ModelConfig(**{**CFG.to_dict(), "model_type": kind}), 0), nnx.Param)
          for kind in ("gpt", "bigram")}


@pytest.fixture(scope="module")
def model():
    return MODELS["gpt"]


@functools.cache
def forward(graphdef):
    """The plain model (no cache), jitted: logits (B, T, V) for ids (B, T)."""
    return jax.jit(lambda params, ids: nnx.merge(graphdef, params)(ids))


def windows(P: int, n_new: int, block: int, keep: int):
    """(start, n) of the window each new token is drawn from, by the rule in the docstring."""
    start, out = max(0, P - block), []
    for n in range(P, P + n_new):
        if n - start > block:
            start = n - keep
        out.append((start, n))
    return out


def uncached_greedy(graphdef, params, prompt, n_new, block, keep):
    """Greedy decoding with a full forward pass over each window: (tokens, logits per token)."""
    ids, logits = list(prompt), []
    for start, n in windows(len(prompt), n_new, block, keep):
        row = forward(graphdef)(params, jnp.asarray([ids[start:n]]))[0, -1]
        logits.append(np.asarray(row))
        ids.append(int(jnp.argmax(row)))
    return ids[len(prompt):], np.stack(logits)


@functools.cache
def shared_engine(kind):
    """One engine per model for the whole grid: its programs compile once, and each request also
    checks that nothing of the requests before it is left in the engine."""
    return Engine(*MODELS[kind], CFG.block_size, chunk=4)


# Prompt lengths from 1 to past 2 x block_size, new tokens from 1 to several windows, every
# window_keep class (1, inside, the whole block); chunk 4 puts chunk edges inside windows.
# The bigram's next token depends on the current one only: a few cases cover its cache.
GRID = [("gpt", *c) for c in itertools.product([1, 3, 7, 8, 9, 21], [1, 2, 5, 8, 19], [0, 1, 5])]
GRID += [("bigram", 1, 19, 0), ("bigram", 9, 5, 5), ("bigram", 21, 2, 1), ("bigram", 3, 8, 0)]


@pytest.mark.parametrize("kind, P, n_new, keep", GRID)
@pytest.mark.slow
def test_every_request_length_matches_uncached_greedy(kind, P, n_new, keep):
    graphdef, params = MODELS[kind]
    block = CFG.block_size
    prompt = [int(t) for t in np.random.default_rng(P).integers(0, CFG.vocab_size, P)]
    result = shared_engine(kind).generate(prompt, max_new_tokens=n_new, num_samples=2, temperature=0.0,
                                          key=jax.random.key(0), window_keep=keep, logits=True)
    ref_tokens, ref_logits = uncached_greedy(graphdef, params, prompt, n_new, block, keep or block)
    assert result.tokens.shape == (2, n_new) and result.decoded == n_new
    assert result.lengths.tolist() == [n_new, n_new] and result.tokens_generated == 2 * n_new
    for row, logits in zip(result.tokens, result.logits):
        assert row.tolist() == ref_tokens
        np.testing.assert_allclose(logits, ref_logits, **TOL)


@pytest.mark.parametrize("chunk", [1, 3, 32])
@pytest.mark.slow
def test_chunk_size_changes_nothing(model, chunk):
    """Sampled (not greedy) tokens past the window, for any chunking of the same request."""
    graphdef, params = model
    kw = dict(max_new_tokens=30, num_samples=3, temperature=1.0, top_k=5, key=jax.random.key(3))
    ref = Engine(graphdef, params, CFG.block_size, chunk=5).generate([1, 2], **kw).tokens
    np.testing.assert_array_equal(Engine(graphdef, params, CFG.block_size, chunk=chunk).generate([1, 2], **kw).tokens,
                                  ref)


@pytest.mark.slow
def test_sampled_tokens_follow_the_documented_keys(model):
    """Token n of sample i is serving.draw_rows(fold_in(key_i, n), logits / temperature) (a draw from
    softmax(logits / temperature), jax.random.categorical's distribution), the logits being the
    model's over the token's window: checked by redrawing every token by hand."""
    from jaxgpt.serving import draw_rows

    graphdef, params = model
    keys = jax.random.split(jax.random.key(11), 2)
    prompt, T = [4, 1, 7], 0.7
    result = Engine(graphdef, params, CFG.block_size, chunk=4).generate(
        prompt, max_new_tokens=20, keys=keys, temperature=T, logits=True)
    for i in range(2):
        ids = list(prompt)
        for j, (start, n) in enumerate(windows(len(prompt), 20, CFG.block_size, CFG.block_size)):
            logits = forward(graphdef)(params, jnp.asarray([ids[start:n]]))[0, -1]
            np.testing.assert_allclose(result.logits[i, j], logits, **TOL)
            ids.append(int(draw_rows(jax.random.fold_in(keys[i], n)[None], (logits / T)[None])[0]))
        assert result.tokens[i].tolist() == ids[len(prompt):]


@pytest.mark.slow  # the fast tier's budget: among its longest (--durations, 2026-12-02)
def test_greedy_forms_agree_past_block_size(model):
    ref, _ = uncached_greedy(*model, [1, 2, 3], 40, CFG.block_size, CFG.block_size)  # 43 tokens > block 8
    for kw in ({"top_k": 1}, {"temperature": 0.0}, {"top_p": 1e-6}):
        got = generate(*model, [1, 2, 3], max_new_tokens=40, key=jax.random.key(0), block_size=CFG.block_size, **kw)
        np.testing.assert_array_equal(got[0], ref, err_msg=str(kw))


@pytest.mark.slow
def test_top_p_below_one_filters_and_one_does_not(model):
    """top_p=1.0 draws the same tokens as plain sampling; a top_p that keeps only the most
    likely token is greedy; one in between changes some draws but stays inside top_p's set."""
    graphdef, params = model
    kw = dict(max_new_tokens=30, num_samples=4, key=jax.random.key(4), logits=True)
    engine = Engine(graphdef, params, CFG.block_size)
    plain = engine.generate([1, 2, 3], top_p=1.0, temperature=1.0, **kw)
    assert np.array_equal(plain.tokens, engine.generate([1, 2, 3], temperature=1.0, **kw).tokens)
    nucleus = engine.generate([1, 2, 3], top_p=0.5, temperature=1.0, **kw)
    assert not np.array_equal(plain.tokens, nucleus.tokens)
    for row, logits in zip(nucleus.tokens, nucleus.logits):
        for tok, lg in zip(row, logits):
            p = np.exp(lg - lg.max())
            p /= p.sum()
            assert p[p > p[tok]].sum() < 0.5  # the tokens more likely than the drawn one hold < top_p


@pytest.mark.slow  # the fast tier's budget: among its longest (--durations, 2026-12-02)
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


@pytest.mark.parametrize("n_new", [20, 4])  # past the block (the windowed path); within it (the slots)
@pytest.mark.slow
def test_prompts_in_one_bucket_share_a_compilation(model, n_new):
    engine = Engine(*model, CFG.block_size)
    engine.generate([1, 2, 3], max_new_tokens=n_new, key=jax.random.key(0))
    n = len(engine._compiled) + sum(e.compiles for e in engine._slots.values())
    assert engine.compile_seconds > 0
    engine.generate([4, 5, 6, 7], max_new_tokens=n_new, key=jax.random.key(0), temperature=0.5, top_p=0.9)
    assert len(engine._compiled) + sum(e.compiles for e in engine._slots.values()) == n
    assert engine.compile_seconds == 0.0


def test_top_k_and_top_p_restrict_choices():
    logits = jnp.log(jnp.array([0.05, 0.5, 0.3, 0.05, 0.1]))
    keys = jax.random.split(jax.random.key(0), 300)
    draw = lambda **kw: set(np.asarray(jax.vmap(lambda k: sample_token(k, logits, 1.0, **kw))(keys)).tolist())
    assert draw(top_k=2) == {1, 2}
    assert draw(top_p=0.75) == {1, 2}  # 0.5 < 0.75, 0.5 + 0.3 reaches it
    assert draw(top_p=0.85) == {1, 2, 4}
    assert draw() == {0, 1, 2, 3, 4}


@pytest.mark.slow
def test_padded_vocabulary_ids_are_never_drawn(model):
    graphdef, params = model
    out = Engine(graphdef, params, CFG.block_size, vocab_size=4).generate(
        [1], max_new_tokens=40, num_samples=4, temperature=2.0, key=jax.random.key(0))
    assert out.tokens.max() < 4 and len(set(out.tokens.ravel().tolist())) > 1


@pytest.mark.parametrize("row, stop, at", [([5, 1, 2, 3, 1, 2], [1, 2], 1), ([1, 1, 2], [1, 2], 1),
                                           ([3, 4, 5], [5], 2), ([3, 4, 5], [4, 6], -1), ([1], [1, 2], -1),
                                           ([], [1], -1), ([2, 2, 2], [2, 2], 0)])
def test_find_stop(row, stop, at):
    assert find_stop(np.asarray(row, np.int32), stop) == at


@pytest.mark.slow
def test_stop_ends_each_sample_and_generation_early(model):
    """Greedy decoding of this model repeats itself: stop at a token it is known to produce."""
    graphdef, params = model
    engine = Engine(graphdef, params, CFG.block_size, chunk=4)
    full = engine.generate([1], max_new_tokens=64, num_samples=2, temperature=0.0, key=jax.random.key(0))
    stop_tok = int(full.tokens[0, 2])
    first = full.tokens[0].tolist().index(stop_tok)
    result = engine.generate([1], max_new_tokens=64, num_samples=2, temperature=0.0, key=jax.random.key(0),
                             stop=[stop_tok])
    assert result.lengths.tolist() == [first, first]
    assert result.decoded < 64 and result.decoded % 4 == 0 and result.decoded > first  # ended at a chunk edge
    assert result.tokens_generated == 2 * result.decoded
    np.testing.assert_array_equal(result.tokens[:, :result.decoded], full.tokens[:, :result.decoded])
    never = engine.generate([1], max_new_tokens=12, num_samples=2, temperature=0.0, key=jax.random.key(0),
                            stop=[CFG.vocab_size + 1])
    assert never.lengths.tolist() == [12, 12] and never.decoded == 12


@pytest.mark.slow
def test_streaming_sees_every_chunk_in_order(model):
    graphdef, params = model
    seen = []
    result = Engine(graphdef, params, CFG.block_size, chunk=4).generate(
        [1, 2], max_new_tokens=10, num_samples=2, key=jax.random.key(5), on_chunk=lambda t: seen.append(t.copy()))
    assert [s.shape[1] for s in seen] == [4, 8, 10]
    for s in seen:
        np.testing.assert_array_equal(s, result.tokens[:, :s.shape[1]])


def test_bad_sampling_arguments(model):
    for kw, msg in [({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": 5, "temperature": -1.0}, "temperature"),
                    ({"max_new_tokens": 5, "top_k": 0}, "top_k"), ({"max_new_tokens": 5, "top_p": 0.0}, "top_p"),
                    ({"max_new_tokens": 5, "top_p": 1.5}, "top_p"), ({"max_new_tokens": 5, "prompt": []}, "empty"),
                    ({"max_new_tokens": 5, "window_keep": 9}, "window_keep")]:
        with pytest.raises(UserError, match=msg):
            generate(*model, kw.pop("prompt", [1, 2, 3]), key=jax.random.key(0), block_size=CFG.block_size, **kw)
