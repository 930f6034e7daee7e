"""The continuous-batching engine (jaxgpt.serving.SlotEngine): a request draws the same tokens
alone or beside any others, as Engine.generate (sample.py's path) draws them, greedy equals the
plain uncached model, echo's prompt logprobs are the model's, and after warm_up no request
(any temperature, top_k, top_p, prompt length) compiles anything."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt.model import ModelConfig, build_model
from jaxgpt.sampling import Engine
from jaxgpt.serving import SlotEngine

CFG = ModelConfig(vocab_size=29, block_size=32, n_layer=2, n_head=2, n_embd=32)
GRAPHDEF, PARAMS = nnx.split(build_model(CFG, 0), nnx.Param)
VOCAB = 27  # the tokenizer's: ids 27, 28 are padding and never drawn
TOL = dict(atol=1e-5, rtol=1e-5)  # float32 logprobs of the prefill against the plain forward
pytestmark = pytest.mark.usefixtures("exact_f32")

COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: COMPILES.append(kw.get("fun_name")) if event.endswith("backend_compile_duration") else None)

# (prompt, settings, seed, new tokens): mixed lengths (three prompt buckets), temperatures, filters
REQUESTS = [
    ([1, 2, 3], dict(temperature=0.8, top_k=5), 1, 20),
    ([4] * 17, dict(temperature=1.0, top_p=0.9), 2, 9),
    ([7, 8], dict(temperature=0.0), 3, 25),
    (list(range(20)), dict(temperature=1.3), 4, 12),
    ([5, 6, 7, 8, 9], dict(temperature=0.7, top_k=3, top_p=0.5), 5, 16),
]


def engine(slots=4, chunk=4):
    e = SlotEngine(GRAPHDEF, PARAMS, CFG.block_size, slots=slots, chunk=chunk, vocab_size=VOCAB, min_bucket=8)
    e.warm_up()
    return e


def serve(e, requests, arrive=None):
    """Runs requests through e, request i joining before chunk arrive[i] (when a slot is free),
    leaving when it has its tokens; returns each one's tokens."""
    arrive = arrive or [0] * len(requests)
    out, slot_of, waiting, step = {}, {}, list(range(len(requests))), 0
    while waiting or slot_of:
        for i in list(waiting):
            if arrive[i] <= step and e.free:
                prompt, kw, seed, _ = requests[i]
                slot_of[i] = e.join(prompt, e.key(seed, 0), **kw)[0]
                out[i] = []
                waiting.remove(i)
        if slot_of:
            step_and_collect(e, requests, slot_of, out)
        step += 1
    return [out[i] for i in range(len(requests))]


def step_and_collect(e, requests, slot_of, out):
    """One decode chunk: each running request (index -> slot in slot_of) gets its tokens in out;
    one that has its max tokens (requests[i][3]) leaves its slot."""
    chunk = e.step()
    for i, s in list(slot_of.items()):
        out[i] += chunk.tokens[s].tolist()
        if len(out[i]) >= requests[i][3]:
            out[i] = out[i][:requests[i][3]]
            e.leave(slot_of.pop(i))


@pytest.fixture(scope="module")
def solo():
    e = engine()
    return [serve(e, [r])[0] for r in REQUESTS]


@pytest.mark.slow
def test_a_request_draws_the_same_tokens_in_any_batch(solo):
    """Alone, all together, joining at different chunks (more requests than slots: some wait for a
    free slot), with another number of slots and another chunk: the same tokens."""
    assert serve(engine(), REQUESTS) == solo
    assert serve(engine(), REQUESTS, arrive=[0, 2, 1, 5, 3]) == solo
    assert serve(engine(slots=7, chunk=3), REQUESTS[::-1])[::-1] == solo
    for toks in solo:
        assert max(toks) < VOCAB
    assert len({tuple(t) for t in solo}) == len(solo)


def serve_together(e, requests):
    """Runs requests through e, all waiting ones that fit joining together (one join_many) before
    each chunk, as the server's scheduler admits them; returns each one's tokens."""
    out, slot_of, waiting = {}, {}, list(range(len(requests)))
    while waiting or slot_of:
        admit, waiting = waiting[:len(e.free)], waiting[len(e.free):]
        slots = e.join_many([dict(prompt=requests[i][0], key_data=e.key(requests[i][2], 0), **requests[i][1])
                             for i in admit])
        slot_of.update(zip(admit, slots))
        out.update({i: [] for i in admit})
        step_and_collect(e, requests, slot_of, out)
    return [out[i] for i in range(len(requests))]


@pytest.mark.slow
def test_prompts_prefilled_together_draw_what_they_draw_alone(solo):
    """join_many prefills the waiting prompts together (one compiled call per prompt bucket, rows in
    blocks, padding rows writing nothing): each request's tokens are the ones it draws alone, and its
    slot's cache and logits are the same bits as after a join of its own."""
    assert serve_together(engine(), REQUESTS) == solo
    assert serve_together(engine(slots=7, chunk=3), REQUESTS[::-1])[::-1] == solo
    many, one = engine(slots=7), engine(slots=7)
    reqs = [dict(prompt=p, key_data=many.key(seed, 0), **kw) for p, kw, seed, _ in REQUESTS]
    assert many.join_many(reqs) == [one.join(**r)[0] for r in reqs]
    for a, b in zip(jax.tree.leaves(many.state), jax.tree.leaves(one.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_engine_generate_is_the_same_draw(solo):
    """Engine.generate (what sample.py calls) with key(seed): its sample 0 is the request's tokens."""
    for (prompt, kw, seed, n), toks in zip(REQUESTS, solo):
        res = Engine(GRAPHDEF, PARAMS, CFG.block_size, vocab_size=VOCAB, chunk=8).generate(
            prompt, max_new_tokens=n, num_samples=2, key=jax.random.key(seed), **kw)
        assert res.tokens[0].tolist() == toks


@pytest.mark.slow
def test_greedy_equals_the_uncached_model(solo):
    prompt, _, _, n = REQUESTS[2]
    ids = list(prompt)
    # one compiled forward over the whole context, the sequence so far at its start: attention is
    # causal, so the logits at its last token do not depend on what pads the rest (run op by op,
    # each new length compiled every op again: a minute)
    logits = jax.jit(lambda x: nnx.merge(GRAPHDEF, PARAMS)(x)[0, :, :VOCAB])
    for _ in range(n):
        x = np.zeros((1, CFG.block_size), np.int32)
        x[0, :len(ids)] = ids
        ids.append(int(jnp.argmax(logits(x)[len(ids) - 1])))
    assert solo[2] == ids[len(prompt):]


@pytest.mark.slow
def test_echo_logprobs_are_the_models():
    e = engine()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    slot, pre = e.join(prompt, e.key(0, 0), echo=True, logprobs=True)
    lp = jax.nn.log_softmax(nnx.merge(GRAPHDEF, PARAMS)(jnp.asarray([prompt]))[0, :, :VOCAB], axis=-1)
    np.testing.assert_allclose(pre.logprobs, [lp[t, prompt[t + 1]] for t in range(len(prompt) - 1)], **TOL)
    np.testing.assert_allclose(pre.top_logprobs, np.sort(np.asarray(lp[:-1]), axis=-1)[:, ::-1][:, :5], **TOL)
    chunk = e.step()  # the drawn tokens' logprobs: of the logits they were drawn from
    first = chunk.tokens[slot, 0]
    np.testing.assert_allclose(chunk.logprobs[slot, 0], lp[-1, first], **TOL)
    e.leave(slot)


@pytest.mark.slow
def test_no_compilation_after_warm_up():
    e = engine()
    before = len(COMPILES)
    rng = np.random.default_rng(0)
    requests = [([int(t) for t in rng.integers(0, VOCAB, int(rng.integers(1, 25)))],
                 dict(temperature=float(rng.choice([0.0, 0.3, 1.0, 1.7])), top_k=int(rng.choice([0, 1, 5, 40])),
                      top_p=float(rng.choice([1.0, 0.9, 0.2])), echo=bool(rng.integers(2)),
                      logprobs=bool(rng.integers(2))), int(rng.integers(1 << 31)), 4) for _ in range(12)]
    serve(e, requests, arrive=list(range(12)))
    assert COMPILES[before:] == [], f"compiled after warm-up: {COMPILES[before:]}"
    assert e.compiles == len(e.buckets) * 3 + 2  # prefill with and without echo and a chunk per bucket, init, key


def test_keys_of_many_draws_are_sample_scripts_keys():
    """The server derives every request's key in one call per N draws: each is fold_in(key(seed),
    choice), what sample.py --seed=seed uses for its sample `choice`, across block edges and seeds."""
    e = SlotEngine(GRAPHDEF, PARAMS, CFG.block_size, slots=4, chunk=4, vocab_size=VOCAB, min_bucket=8)
    draws = [(s, i) for s in (0, 1, 1337, 2**31 + 5, 2**32 - 1) for i in (0, 1, 3)]  # 15 draws: 4 calls of 4 rows
    want = [jax.random.key_data(jax.random.fold_in(jax.random.key(np.uint32(s)), i)) for s, i in draws]
    np.testing.assert_array_equal(e.keys(draws), np.stack(want))
    np.testing.assert_array_equal(e.key(7, 2), e.keys([(5, 0), (7, 2)])[1])
    assert e.keys([]).shape == (0,) + tuple(want[0].shape)


def kept_by_sorting(row: np.ndarray, k: int, p: float) -> np.ndarray:
    """The reference filter, by sorting: the top k values (ties with the k-th kept), then the
    smallest set of the most likely whose probability reaches p (ties at its edge kept)."""
    V = row.size
    keep = np.ones(V, bool)
    if 0 < k < V:
        keep &= row >= np.sort(row)[::-1][k - 1]
    if p < 1.0:
        probs = np.where(keep, np.exp(row - row[keep].max()), 0.0)
        probs /= probs.sum()
        above = np.array([probs[row > v].sum() for v in row])  # mass of the more likely tokens
        keep &= row >= row[keep & (above < p)].min()
    return keep


@pytest.mark.parametrize("V", [29, 300, 700])
def test_the_bisection_filter_keeps_what_sorting_keeps(V):
    """serving.filter_rows finds top_p's thresholds, and top_k's past TOP_K_SORTED (256), by
    bisection over the values' order instead of a sort, and top_k's up to it from lax.top_k: it
    keeps exactly the tokens a sort-based filter keeps, ties and negative, -inf and repeated values
    included, with rows of both kinds of top_k in one batch."""
    from jaxgpt.serving import filter_rows

    rng = np.random.default_rng(V)
    rows = (rng.standard_normal((24, V)) * rng.choice([0.3, 3.0, 12.0], (24, 1))).astype(np.float32)
    rows[3, :10] = rows[3, 10]  # a tie at the edge
    rows[5] = np.round(rows[5])  # many ties
    rows[7, ::3] = -np.inf
    ks = rng.choice([0, 1, 2, 5, 17, 255, 256, 257, 400, V - 1, V, V + 4], 24).astype(np.int32)
    ks[:2] = [256, 257] if V > 257 else ks[:2]  # both ways of finding top_k's threshold in one call
    ps = rng.choice([1.0, 0.95, 0.5, 0.1, 1e-3], 24).astype(np.float32)
    got = np.isfinite(np.asarray(filter_rows(jnp.asarray(rows), jnp.where(ks > 0, ks, V), jnp.asarray(ps))))
    for i in range(24):
        want = kept_by_sorting(rows[i], int(ks[i]), float(ps[i])) & np.isfinite(rows[i])
        np.testing.assert_array_equal(got[i], want, err_msg=f"row {i}: k={ks[i]}, p={ps[i]}")


def wilson_hilferty(dof: int, z: float = 4.75) -> float:
    """The chi-square quantile of `dof` degrees of freedom at the normal's z (4.75: 1e-6 one-sided)."""
    return dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3


@pytest.mark.parametrize("V", [300, 1500])
@pytest.mark.parametrize("case", ["sparse", "dense", "filtered"])
def test_draws_follow_the_distribution(case, V):
    """sample_rows draws token i with probability softmax(scaled, filtered logits)_i (serving.draw_rows,
    two-level inverse CDF: V 300 makes 18 blocks of 17, V 1500 39 of 39): the counts of 200,000 draws
    pass a chi-square test at significance 1e-6, and a token of probability 0 (-inf, filtered out) is
    never drawn. The keys are fixed, so the test gives the same counts every run."""
    from jaxgpt.serving import sample_rows

    N, batch = 200_000, 20_000 if V < 1000 else 5_000
    rng = np.random.default_rng(1)
    if case == "sparse":  # a few tokens spread over the blocks, one rare
        row = np.full(V, -np.inf, np.float32)
        at = rng.choice(V, 12, replace=False)
        row[at] = np.log(np.r_[0.002, rng.uniform(0.2, 1.0, 11)]).astype(np.float32)
        t, k, p = 1.0, 0, 1.0
    else:
        row = (rng.standard_normal(V) * (0.6 if V < 1000 else 0.3)).astype(np.float32)  # every count >= 5
        t, k, p = (0.7, 0, 1.0) if case == "dense" else (1.3, 40, 0.6)
    scaled = row.astype(np.float64) / t
    keep = kept_by_sorting(row / np.float32(t), k, p) & np.isfinite(row)
    probs = np.where(keep, np.exp(scaled - scaled[keep].max()), 0.0)
    probs /= probs.sum()
    settings = [jnp.full(batch, v, d) for v, d in ((t, jnp.float32), (k, jnp.int32), (p, jnp.float32))]
    draw = jax.jit(lambda keys: sample_rows(keys, jnp.broadcast_to(jnp.asarray(row), (batch, V)), *settings))
    base = jax.random.key(7)
    counts = np.zeros(V)
    for b in range(N // batch):
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(b * batch, (b + 1) * batch))
        counts += np.bincount(np.asarray(draw(keys)), minlength=V)
    assert counts[~keep].sum() == 0, f"drew tokens of probability 0: {np.flatnonzero(counts * ~keep)}"
    expected = probs[keep] * N
    assert expected.min() >= 5  # the chi-square test's condition
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    assert chi2 < wilson_hilferty(int(keep.sum()) - 1), f"chi-square {chi2:.1f} over {keep.sum() - 1} dof"

