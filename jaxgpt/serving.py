"""Continuous batching: a fixed number of decoding slots that requests join and leave between chunks.

    engine = SlotEngine(graphdef, params, block_size, slots=16, chunk=8, vocab_size=tok.vocab_size)
    engine.warm_up()                     # compiles every program it will run: none compiles after this
    slot = engine.join(prompt_ids, key, temperature=0.8, top_k=200, top_p=0.95)[0]
    slots = engine.join_many([dict(prompt=ids, key_data=key, temperature=0.8) for ids, key in waiting])
    out = engine.step()                  # one chunk of every slot: out.tokens (slots, chunk), ...
    engine.leave(slot)                   # between chunks; the slot is free for the next request

What a slot holds. Every slot has its own rows of the KV cache, its position (the index of the
token it samples next), the logits that token is drawn from, its PRNG key and its sampling
settings (temperature, top_k, top_p): all arrays of the engine's state, so a request with new
settings or another prompt length compiles nothing. What compiles, all of it in warm_up()
(compiled, not run): per prompt-length bucket (powers of two up to block_size) one prefill of
any number of prompts and one single-prompt prefill that also returns the prompt's logprobs
(echo); one decode chunk per cache-length bucket (a chunk attends over the first
`bucket(longest active position + chunk)` cache slots, so short requests do not pay for the
whole block); the per-request key; so 3 programs per bucket, plus init and key.

Joining together. join_many prefills the prompts waiting for slots at once, one compiled call per
prompt bucket among them: the rows run in blocks of rows_per_block(Tb) (4 rows of 16 tokens,
2 of 32, one row from 64 on), the number of blocks an argument; each block is the one-row
prefill vmapped over that many rows, padding rows (slot index N) dropped by every scatter. The
block's size depends on the bucket only, never on the batch or the slots: XLA's CPU matmuls
round differently for a different number of rows, and a row must not. (join without echo is
join_many of one prompt; echo's prefill stays one prompt at a time.)

One request, any batch. A slot draws the token at index n with fold_in(key, n) (the Engine's
rule), through sample_rows, whose rows do not depend on each other (its draw: draw_rows, two
uniforms a row, softmax's distribution); the decode step is the model's cached forward vmapped
over slots, each at its own position; a prompt's prefill is the same bits in any batch (above).
So a request gives the same tokens whatever else shares the batch: tests/test_serving.py checks
it token for token. Engine.generate runs a request that fits in block_size through this engine
(one slot per sample, joined together), so sample.py and the server (jaxgpt.server) sample with
the same code.

Limits. A request's prompt plus its new tokens must fit in block_size (a slot's cache does not
slide; the Engine's windowed path serves longer requests to sample.py). Slots that are free
or finished compute along with the rest (their output is dropped): the cost of a chunk is that
of all slots.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.errors import UserError

F32, I32 = jnp.float32, jnp.int32
# prompts of bucket Tb are prefilled in blocks of rows_per_block(Tb) rows, always (a lone prompt too,
# beside padding rows), so that a row's bits do not depend on its batch; the rows of a block share
# the reading of the weights (at GPT-2 124M's shape, 16 prompts of 16 tokens: about 0.8 s in blocks
# of 4, 2.1 s one by one, and 0.3 s instead of 0.12 s for a lone prompt; 2 cores, loaded)
PREFILL_TOKENS = 64


def rows_per_block(Tb: int) -> int:
    return max(1, PREFILL_TOKENS // Tb)

TOP_N = 5  # alternatives reported per token with logprobs (OpenAI's API allows at most 5)


def _order_keys(x):
    """uint32 keys in the order of the float32 values x (-inf lowest): bisecting over keys is
    bisecting over values, exactly, in 32 halvings."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _bisect(lo, hi, ok, largest: bool):
    """Per row, the largest (largest=True) or smallest key t in [lo, hi] with ok(t), where ok is
    monotone (true below / above a point); lo, hi (B,) uint32. 32 halvings cover every key."""
    def halve(_, b):
        lo, hi = b
        gap = hi - lo
        mid = lo + gap // 2 + (gap & 1 if largest else 0)  # no overflow: gap fits in uint32
        good = ok(mid)
        if largest:
            return jnp.where(good, mid, lo), jnp.where(good, hi, mid - 1)
        return jnp.where(good, lo, mid + 1), jnp.where(good, mid, hi)
    lo, hi = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return lo


# top_k up to this reads the k-th largest value off lax.top_k (a partial sort: about 3 ms at
# (16, 50257) on 2 cores, against 9 ms for the bisection); a larger top_k bisects
TOP_K_SORTED = 256


def filter_rows(x, k, p):
    """The rows of x (B, V) with -inf outside each row's top_k (k (B,), V = no limit) and then its
    top_p (p (B,), 1 = off): thresholds found by bisection (see sample_rows), top_k's from
    lax.top_k's TOP_K_SORTED largest values when k is at most that. Each filter runs only when
    some row asks for it (a lax.cond): a row it does not apply to is left as it is."""
    V = x.shape[-1]
    keys_x = _order_keys(x)  # (B, V)
    lo, hi = jnp.min(keys_x, axis=-1), jnp.max(keys_x, axis=-1)  # (B,)
    K0 = min(TOP_K_SORTED, V)

    def top_k(keys_x):
        largest = jax.lax.top_k(x, K0)[0]  # (B, K0), descending
        direct = _order_keys(jnp.take_along_axis(largest, jnp.clip(k - 1, 0, K0 - 1)[:, None], axis=-1)[:, 0])
        count = lambda t: jnp.sum(keys_x >= t[:, None], axis=-1)  # noqa: E731
        bisected = lambda: _bisect(lo, hi, lambda t: count(t) >= k, largest=True)  # noqa: E731
        # the k-th largest value's key; a row's own k picks its way, whatever the other rows ask
        kth = jax.lax.cond(jnp.any((k > K0) & (k < V)), lambda: jnp.where(k <= K0, direct, bisected()),
                           lambda: direct)
        return jnp.where((k < V)[:, None] & (keys_x < kth[:, None]), jnp.uint32(0), keys_x), kth  # 0: below -inf

    # without a top_k row, the k-th largest of every row is its smallest (k = V)
    keys_x, kth = jax.lax.cond(jnp.any(k < V), top_k, lambda keys_x: (keys_x, lo), keys_x)
    x = jnp.where(keys_x == 0, -jnp.inf, x)

    def top_p(x):
        probs = jax.nn.softmax(x, axis=-1)
        above = lambda t: jnp.sum(jnp.where(keys_x > t[:, None], probs, 0.0), axis=-1)  # noqa: E731
        lowest = _bisect(kth, hi, lambda t: above(t) < p, largest=False)  # the least likely value kept
        return jnp.where((p[:, None] < 1.0) & (keys_x < lowest[:, None]), -jnp.inf, x)

    return jax.lax.cond(jnp.any(p < 1.0), top_p, lambda x: x, x)


def _pick(w, u):
    """Per row of w (B, n) >= 0 with some entry > 0, the index i drawn with probability
    w[i] / sum(w) from u (B,) uniform in [0, 1): the first i whose cumulative sum is above
    u * sum(w) (inverse CDF). Only entries > 0 can be picked, also when rounding puts u * sum(w)
    at or past the last cumulative sum (then: the last entry > 0)."""
    c = jnp.cumsum(w, axis=-1)
    hit = (c > (u * c[:, -1])[:, None]) & (w > 0)
    first = jnp.argmax(hit, axis=-1)
    last = w.shape[-1] - 1 - jnp.argmax((w > 0)[:, ::-1], axis=-1)
    return jnp.where(jnp.any(hit, axis=-1), first, last).astype(I32)


def draw_rows(keys, x):
    """One index per row of x (B, V) float32, drawn with probability softmax(x) (-inf: never),
    each row from its own key (keys (B,)): what jax.random.categorical draws, by a two-level
    inverse CDF that needs two uniforms per row instead of one Gumbel per entry. The row's
    exp(x - max) is cut into about sqrt(V) blocks of about sqrt(V) entries; the first uniform
    picks a block by the blocks' sums, the second an entry of that block by its own values.
    (A categorical over (16, 50257) draws 800k random numbers a step, about as long as the
    filters' bisections; this draws 32.)"""
    B, V = x.shape
    w = max(1, math.isqrt(V - 1) + 1)  # block width: ceil(sqrt(V))
    nb = -(-V // w)
    e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))  # (B, V) unnormalized probabilities, max 1
    e = jnp.pad(e, ((0, 0), (0, nb * w - V))).reshape(B, nb, w)
    u = jax.vmap(lambda key: jax.random.uniform(key, (2,), F32))(keys)  # (B, 2)
    block = _pick(jnp.sum(e, axis=-1), u[:, 0])  # (B,)
    inside = jnp.take_along_axis(e, block[:, None, None], axis=1)[:, 0]  # (B, w): the block's entries
    return block * w + _pick(inside, u[:, 1])


def sample_rows(keys, logits, temperature, top_k, top_p):
    """One token per row of logits (B, V), each row with its own settings, all arrays (B,):
    temperature (0 = greedy argmax), top_k (0 or >= V = no limit), top_p (1 = off). What
    sample_token does for one row with constant settings, as data: a new setting compiles
    nothing. Rows do not depend on each other (a row without filters is left exactly as it
    is when another row filters), so a request draws the same tokens in any batch.

    The filters find their thresholds by bisection over the values' order (32 passes of a
    count or a masked sum over V), not by sorting V: XLA's CPU sort of (16, 50257) takes about
    130 ms, the bisections about a tenth of it; a top_k up to TOP_K_SORTED reads its threshold off
    lax.top_k's largest values instead (half the bisection's time). top_k keeps the values >= the k-th largest (ties
    with it kept); top_p keeps the values whose more likely tokens hold less than top_p of the
    probability (after top_k), so the smallest set that reaches top_p, ties at its edge kept.
    The token is then drawn by draw_rows (the distribution of jax.random.categorical, from two
    uniforms per row rather than a Gumbel per entry)."""
    logits = logits.astype(F32)
    V = logits.shape[-1]
    t = jnp.where(temperature > 0, temperature, 1.0).astype(F32)
    scaled = logits / t[:, None]
    k = jnp.where((top_k > 0) & (top_k < V), top_k, V)  # (B,)
    p = jnp.asarray(top_p, F32)

    scaled = jax.lax.cond(jnp.any((k < V) | (p < 1.0)), lambda x: filter_rows(x, k, p), lambda x: x, scaled)
    drawn = draw_rows(keys, scaled)
    return jnp.where(temperature > 0, drawn, jnp.argmax(logits, axis=-1))


def bucket(n: int, cap: int) -> int:
    """The power of two >= n, at most cap (prompt lengths share compilations)."""
    return min(cap, 1 << max(0, n - 1).bit_length())


@dataclass
class Chunk:
    """What one decode chunk drew for every slot (rows of free slots are meaningless)."""
    tokens: np.ndarray  # (N, chunk) int32
    logprobs: np.ndarray | None  # (N, chunk) float32: log p(token) under the model (temperature 1, no filter)
    top_ids: np.ndarray | None  # (N, chunk, TOP_N) the most likely tokens at each step
    top_logprobs: np.ndarray | None  # (N, chunk, TOP_N)


@dataclass
class Prefill:
    """A prompt's logprobs (echo): entry t is about prompt token t + 1 (P - 1 entries)."""
    logprobs: np.ndarray  # (P - 1,)
    top_ids: np.ndarray  # (P - 1, TOP_N)
    top_logprobs: np.ndarray  # (P - 1, TOP_N)


def _row(tree):
    return jax.tree.map(lambda x: x[None], tree)


def _unrow(tree):
    return jax.tree.map(lambda x: x[0], tree)


def _top(logits, V):
    """log-softmax over the real vocabulary and its TOP_N best entries: logits (..., Vp)."""
    lp = jax.nn.log_softmax(logits[..., :V].astype(F32), axis=-1)
    vals, ids = jax.lax.top_k(lp, TOP_N)
    return lp, ids.astype(I32), vals


class SlotEngine:
    """Decoding slots for a model (GPT or Bigram). See the module docstring."""

    def __init__(self, graphdef, params, block_size: int, *, slots: int = 16, chunk: int = 8,
                 vocab_size: int | None = None, min_bucket: int = 16):
        if slots < 1 or chunk < 1:
            raise UserError(f"slots and chunk must be >= 1, got slots={slots}, chunk={chunk}")
        self.graphdef, self.params, self.S, self.N, self.chunk = graphdef, params, block_size, slots, chunk
        model = nnx.merge(graphdef, params)
        self.Vp = int(model.wte.embedding.shape[0]) if hasattr(model, "wte") else None
        self.V = vocab_size or self.Vp
        self.top_n = min(TOP_N, self.V)
        lo = min(block_size, max(1, min_bucket))
        self.buckets = sorted({bucket(n, block_size) for n in range(lo, block_size + 1)} | {lo})
        self._compiled: dict = {}
        self.compile_seconds = 0.0
        self.compiles = 0
        self.state = self._run("init", (), self._init_fn())
        self.free = list(range(slots))[::-1]  # pop() gives slot 0 first
        self.pos = np.zeros(slots, np.int64)  # host mirror: the index of the token each slot samples next
        self.active = np.zeros(slots, bool)
        self.want_logprobs = np.zeros(slots, bool)

    # -- compiled pieces -------------------------------------------------------------------------

    def _init_fn(self):
        N, S, graphdef = self.N, self.S, self.graphdef
        Vp = self.Vp

        def init(params):
            model = nnx.merge(graphdef, params)
            logits_width = Vp if Vp is not None else 1
            return {"cache": model.init_cache(N, S), "n": jnp.zeros(N, I32),
                    "logits": jnp.zeros((N, logits_width), F32),
                    "keys": jax.random.key_data(jax.vmap(jax.random.key)(jnp.zeros(N, jnp.uint32))),
                    "temperature": jnp.ones(N, F32), "top_k": jnp.zeros(N, I32), "top_p": jnp.ones(N, F32)}

        return init

    def _prefill_fn(self, Tb: int):
        """Prefills up to all slots at once, a row per slot, each row a prompt padded to Tb tokens:
        slots (R,), tokens (R, Tb), P (R,) prompt lengths, key data and settings (R,), R = the
        slots rounded up to G = rows_per_block(Tb); `blocks` (an argument: no compilation per
        count) blocks of G rows run, one after the other. A block is the one-row prefill vmapped
        over G rows, always G whatever the slots, so a row's cache and logits are the same bits
        whatever the other rows hold, how many there are, where the row sits, and how many slots
        the engine has (XLA's CPU matmuls round differently for a different number of rows). A
        row with slot index N (padding) is dropped by every scatter: it writes nothing."""
        graphdef, G = self.graphdef, rows_per_block(Tb)

        def prefill(params, state, blocks, slots, tokens, P, key_data, temperature, top_k, top_p):
            model = nnx.merge(graphdef, params)

            def one(toks, n):  # one row: the logits of its last prompt token, its cache (H, Tb, hs) per layer
                last, cache = model.decode(toks[None], model.init_cache(1, Tb), 0, last=n - 1)
                return last[0], _unrow(cache)

            def block(b, state):
                rows = [jax.lax.dynamic_slice_in_dim(a, b * G, G) for a in (slots, tokens, P, key_data, temperature,
                                                                             top_k, top_p)]
                sl, toks, n, kd, t, k, p = rows
                last, cache = jax.vmap(one)(toks, n)  # (G, Vp), per layer (G, H, Tb, hs)
                new = dict(state)
                new["cache"] = jax.tree.map(lambda big, r: big.at[(sl,) + tuple(slice(None, d) for d in r.shape[1:])]
                                            .set(r.astype(big.dtype), mode="drop"), state["cache"], cache)
                put = lambda name, v: state[name].at[sl].set(v.astype(state[name].dtype), mode="drop")  # noqa: E731
                new["n"], new["logits"], new["keys"] = put("n", n), put("logits", last), put("keys", kd)
                new["temperature"], new["top_k"], new["top_p"] = put("temperature", t), put("top_k", k), put("top_p", p)
                return new

            return jax.lax.fori_loop(0, blocks, block, state)

        return prefill

    def _echo_fn(self, Tb: int):
        """Prefills one slot from a prompt padded to Tb tokens, and returns the prompt's logprobs too."""
        graphdef, V = self.graphdef, self.V

        def prefill(params, state, slot, tokens, P, key_data, temperature, top_k, top_p):
            model = nnx.merge(graphdef, params)
            logits, cache = model.decode(tokens[None], model.init_cache(1, Tb), 0)  # (1, Tb, Vp)
            logits = logits[0]
            last = jax.lax.dynamic_index_in_dim(logits, P - 1, 0, keepdims=False)  # (Vp,)
            new = dict(state)
            new["cache"] = jax.tree.map(lambda big, row: jax.lax.dynamic_update_slice(
                big, row.astype(big.dtype), (slot,) + (0,) * (big.ndim - 1)), state["cache"], cache)
            at = lambda name, v: jax.lax.dynamic_update_index_in_dim(state[name], v, slot, 0)  # noqa: E731
            new["n"], new["logits"] = at("n", P), at("logits", last.astype(F32))
            new["keys"] = at("keys", key_data)
            new["temperature"], new["top_k"], new["top_p"] = at("temperature", temperature), at("top_k", top_k), \
                at("top_p", top_p)
            lp, ids, vals = _top(logits[:-1], V)  # (Tb - 1, V): entry t predicts token t + 1
            tok_lp = jnp.take_along_axis(lp, tokens[1:, None], axis=-1)[:, 0]
            return new, tok_lp, ids, vals

        return prefill

    def _chunk_fn(self, Sb: int):
        """`chunk` decoding steps of every slot, attending over the first Sb cache slots."""
        graphdef, V, chunk = self.graphdef, self.V, self.chunk

        def run(params, state, active, want):
            model = nnx.merge(graphdef, params)
            Vp = state["logits"].shape[-1]

            def one(tok, cache, pos):  # one slot: token () at position pos, cache rows (H, Sb, hs)
                logits, cache = model.decode(tok[None, None], _row(cache), pos, last=0)
                return logits[0], _unrow(cache)

            def step(i, c):
                n, logits = c["n"], c["logits"][:, :V]  # (N,), (N, V)
                keys = jax.random.wrap_key_data(state["keys"])
                step_keys = jax.vmap(jax.random.fold_in)(keys, n)
                tok = sample_rows(step_keys, logits, state["temperature"], state["top_k"], state["top_p"])

                def lps(_):
                    lp, ids, vals = _top(logits, V)
                    return jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0], ids, vals

                def none(_):
                    z = jnp.zeros((tok.shape[0], TOP_N), F32)
                    return jnp.zeros(tok.shape, F32), z.astype(I32), z

                tok_lp, ids, vals = jax.lax.cond(jnp.any(want), lps, none, None)
                pos = jnp.minimum(n, Sb - 1)  # free or finished slots may run past: clamp, nobody reads them
                new_logits, cache = jax.vmap(one)(tok.astype(I32), c["cache"], pos)
                if new_logits.shape[-1] != Vp:  # the Bigram's logits are (V,) too; keep the carry's width
                    new_logits = new_logits[:, :Vp]
                return {"cache": cache, "n": jnp.where(active, n + 1, n), "logits": new_logits.astype(F32),
                        "tokens": c["tokens"].at[:, i].set(tok.astype(I32)),
                        "lp": c["lp"].at[:, i].set(tok_lp), "ids": c["ids"].at[:, i].set(ids),
                        "vals": c["vals"].at[:, i].set(vals)}

            N = state["n"].shape[0]
            view = jax.tree.map(lambda x: x[:, :, :Sb], state["cache"])  # (N, H, Sb, hs) per layer
            carry = {"cache": view, "n": state["n"], "logits": state["logits"],
                     "tokens": jnp.zeros((N, chunk), I32), "lp": jnp.zeros((N, chunk), F32),
                     "ids": jnp.zeros((N, chunk, TOP_N), I32), "vals": jnp.zeros((N, chunk, TOP_N), F32)}
            c = jax.lax.fori_loop(0, chunk, step, carry)
            new = dict(state)
            new["cache"] = jax.tree.map(lambda big, v: jax.lax.dynamic_update_slice(big, v, (0,) * big.ndim),
                                        state["cache"], c["cache"])
            new["n"], new["logits"] = c["n"], c["logits"]
            return new, c["tokens"], c["lp"], c["ids"], c["vals"]

        return run

    def _program(self, name, static, fn, *args, donate=()):
        """fn AOT-compiled for these arguments, once per (name, static): compile time and count are kept."""
        sig = (name, static)
        if sig not in self._compiled:
            t0 = time.perf_counter()
            full = (self.params,) + args
            self._compiled[sig] = jax.jit(fn, donate_argnums=donate).lower(*full).compile()
            self.compile_seconds += time.perf_counter() - t0
            self.compiles += 1
        return self._compiled[sig]

    def _run(self, name, static, fn, *args, donate=()):
        return self._program(name, static, fn, *args, donate=donate)(self.params, *args)

    def _rows(self, Tb: int, rows: list[tuple[int, dict]]) -> tuple:
        """The prefill's arguments for (slot, request) rows, padded with slot N (dropped) to the
        slots rounded up to rows_per_block(Tb)."""
        key_shape, G = self.state["keys"].shape[1:], rows_per_block(Tb)
        M = -(-self.N // G) * G
        slots, P = np.full(M, self.N, np.int32), np.ones(M, np.int32)
        tokens, keys = np.zeros((M, Tb), np.int32), np.zeros((M,) + key_shape, np.uint32)
        temperature, top_k, top_p = np.ones(M, np.float32), np.zeros(M, np.int32), np.ones(M, np.float32)
        for i, (slot, r) in enumerate(rows):
            slots[i], P[i], keys[i] = slot, len(r["prompt"]), r["key_data"]
            tokens[i, :P[i]] = r["prompt"]
            temperature[i], top_k[i], top_p[i] = r["temperature"], r["top_k"] or 0, r["top_p"]
        return slots, tokens, P, keys, temperature, top_k, top_p

    def _prefill(self, Tb: int, rows: list[tuple[int, dict]]):
        """The prefill of prompt bucket Tb: compiled (rows = []) or run on these (slot, request) rows."""
        args = (self.state, np.int32(-(-len(rows) // rows_per_block(Tb)))) + self._rows(Tb, rows)
        prog = self._program("prefill", (Tb,), self._prefill_fn(Tb), *args, donate=(1,))
        if rows:
            self.state = prog(self.params, *args)

    # -- the public calls ------------------------------------------------------------------------

    def prompt_bucket(self, P: int) -> int:
        return next(b for b in self.buckets if b >= P)

    def cache_bucket(self) -> int:
        """The cache slots the next chunk attends over: enough for every active slot's chunk."""
        need = int(self.pos[self.active].max()) + self.chunk if self.active.any() else 1
        return next((b for b in self.buckets if b >= need), self.S)

    def warm_up(self, echo: bool = True) -> float:
        """Compiles every program requests can use (without running them); returns the seconds it took."""
        t0 = time.perf_counter()
        self.key(0, 0)
        for Tb in self.buckets:
            self._prefill(Tb, [])
            if echo:
                self._program("echo", (Tb,), self._echo_fn(Tb), self.state, *self._echo_args(0, [0] * Tb, {}),
                              donate=(1,))
        for Sb in self.buckets:
            self._program("chunk", (Sb,), self._chunk_fn(Sb), self.state, self.active.copy(), self.want_logprobs,
                          donate=(1,))
        return time.perf_counter() - t0

    def keys(self, draws: list[tuple[int, int]]) -> np.ndarray:
        """The key data of each (seed, index) draw: fold_in(key(seed), index), as
        Engine.generate(key=key(seed)) gives its sample `index`. One compiled call per N draws (the
        rows padded to the slots), so a batch of requests costs one dispatch, not one each."""
        def fn(params, seeds, index):
            return jax.vmap(lambda s, i: jax.random.key_data(jax.random.fold_in(jax.random.key(s), i)))(seeds, index)

        def padded(xs, dtype):
            return np.pad(np.asarray(xs, dtype), (0, self.N - len(xs)))

        prog = self._program("keys", (), fn, padded([], np.uint32), padded([], np.int32))
        out = [np.zeros((0,) + self.state["keys"].shape[1:], np.uint32)]
        for b in range(0, len(draws), self.N):
            part = draws[b:b + self.N]
            rows = prog(self.params, padded([s for s, _ in part], np.uint32), padded([i for _, i in part], np.int32))
            out.append(np.asarray(rows)[:len(part)])
        return np.concatenate(out)

    def key(self, seed: int, index: int) -> np.ndarray:
        """The key data of one draw: keys([(seed, index)])[0]."""
        return self.keys([(seed, index)])[0]

    def _request(self, prompt: list[int], key_data, temperature: float = 1.0, top_k: int | None = 0,
                 top_p: float = 1.0, logprobs: bool = False) -> dict:
        if not 1 <= len(prompt) <= self.S:
            raise UserError(f"a prompt must have 1..{self.S} tokens, got {len(prompt)}")
        return dict(prompt=prompt, key_data=key_data, temperature=temperature, top_k=top_k or 0, top_p=top_p,
                    logprobs=logprobs)

    def join_many(self, requests: list[dict]) -> list[int]:
        """Prefills a free slot for each request (a dict of join's arguments but echo: prompt, key_data,
        temperature, top_k, top_p, logprobs); returns their slots, in order. The requests of one
        prompt bucket are prefilled by one compiled call, their rows padded to a power of two;
        each row is the one-row prefill, so a request's tokens do not depend on the others."""
        requests = [self._request(**r) for r in requests]  # all checked before any slot is taken
        if len(requests) > len(self.free):
            raise RuntimeError(f"{len(requests)} requests for {len(self.free)} free slots")  # the scheduler checks first
        slots = [self.free.pop() for _ in requests]
        groups: dict[int, list[tuple[int, dict]]] = {}
        for slot, r in zip(slots, requests):
            groups.setdefault(self.prompt_bucket(len(r["prompt"])), []).append((slot, r))
        for Tb, rows in sorted(groups.items()):
            self._prefill(Tb, rows)
        for slot, r in zip(slots, requests):
            self.pos[slot], self.active[slot], self.want_logprobs[slot] = len(r["prompt"]), True, r["logprobs"]
        return slots

    def _echo_args(self, slot: int, prompt: list[int], r: dict) -> tuple:
        P = len(prompt)
        tokens = np.zeros(self.prompt_bucket(P), np.int32)
        tokens[:P] = prompt
        key_data = r.get("key_data", np.zeros(self.state["keys"].shape[1:], np.uint32))
        return (np.int32(slot), tokens, np.int32(P), np.asarray(key_data, np.uint32),
                np.float32(r.get("temperature", 1.0)), np.int32(r.get("top_k") or 0), np.float32(r.get("top_p", 1.0)))

    def join(self, prompt: list[int], key_data, *, temperature: float = 1.0, top_k: int | None = 0,
             top_p: float = 1.0, echo: bool = False, logprobs: bool = False) -> tuple[int, Prefill | None]:
        """Prefills a free slot with `prompt` and these settings; returns (slot, the prompt's
        logprobs when echo). The caller checks that prompt + new tokens fit in block_size.
        Without echo this is join_many of one request."""
        r = self._request(prompt, key_data, temperature, top_k, top_p, logprobs)
        if not echo:
            return self.join_many([r])[0], None
        if not self.free:
            raise RuntimeError("no free slot")  # the scheduler checks first
        P, Tb = len(prompt), self.prompt_bucket(len(prompt))
        slot = self.free.pop()
        self.state, lp, ids, vals = self._run("echo", (Tb,), self._echo_fn(Tb), self.state,
                                              *self._echo_args(slot, prompt, r), donate=(1,))
        pre = Prefill(np.asarray(lp)[:P - 1], np.asarray(ids)[:P - 1, :self.top_n], np.asarray(vals)[:P - 1, :self.top_n])
        self.pos[slot], self.active[slot], self.want_logprobs[slot] = P, True, logprobs
        return slot, pre

    def leave(self, slot: int) -> None:
        if self.active[slot]:
            self.active[slot] = False
            self.free.append(slot)

    def _chunk(self, Sb: int):
        out = self._run("chunk", (Sb,), self._chunk_fn(Sb), self.state, self.active.copy(),
                        self.want_logprobs & self.active, donate=(1,))
        self.state = out[0]
        return out[1:]

    def step(self) -> Chunk:
        """One decode chunk for every slot; each active slot advances `chunk` tokens."""
        tokens, lp, ids, vals = self._chunk(self.cache_bucket())
        self.pos[self.active] += self.chunk
        want = bool((self.want_logprobs & self.active).any())
        return Chunk(np.asarray(tokens), np.asarray(lp) if want else None,
                     np.asarray(ids)[..., :self.top_n] if want else None,
                     np.asarray(vals)[..., :self.top_n] if want else None)

    @property
    def busy(self) -> int:
        return int(self.active.sum())
