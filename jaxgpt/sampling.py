"""The decoding engine: prefill the prompt once, then decode with a per-layer KV cache.

    engine = Engine(graphdef, params, block_size)
    result = engine.generate(prompt_ids, max_new_tokens=500, num_samples=5, temperature=0.8,
                             top_k=200, top_p=0.95, key=jax.random.key(1337))
    result.tokens  # (num_samples, max_new_tokens) numpy array

Two paths. A request whose prompt and new tokens fit in block_size runs in the slots of a
serving.SlotEngine (one slot per sample), the continuous-batching engine the server
(jaxgpt.server) runs: sample.py and the server draw the same tokens for the same seed.
Longer requests, and requests for the logits, take the windowed path described next.

How it runs. The prompt is padded to a power-of-two bucket and prefilled in one pass, so
prompts of similar length share one compilation. Decoding runs in jit-compiled chunks of
`chunk` tokens (a lax.fori_loop), all samples of a batch at once; the host only dispatches
chunks, and reads them back when streaming or looking for a stop string.

Context past block_size. GPT has learned absolute positions, so a full cache cannot slide:
moving the window changes every token's position and so every cached key and value. When
the cache is full, the engine re-prefills it from the last `window_keep` tokens. With
`window_keep = block_size` (the default) every token is predicted from exactly the last
block_size tokens, as nanoGPT's crop does and as the uncached model gives; each token past
the window then costs one full-window forward pass. A smaller `window_keep` re-prefills only
once every (block_size - window_keep + 1) tokens, much cheaper, at the price of a context
that shrinks to window_keep tokens after each refill.

Randomness. Sample i of a batch draws the token at buffer index n with
fold_in(keys[i], n): a batch of samples equals the same samples generated one at a time
with their keys, and a seed fixes the output.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.config import rng
from jaxgpt.errors import UserError
from jaxgpt.serving import SlotEngine, bucket, sample_rows  # noqa: F401  (bucket: this module's before)

F32 = jnp.float32
# the rules of the sampling arguments (jaxgpt.config's mechanism; sample.py's flags share them)
SAMPLING_RULES = {
    "max_new_tokens": rng(1),  # the bound is the buffer's int32 index, checked in generate
    "temperature": rng(0, note="(0 means greedy)"),
    "top_k": lambda key, v: v is None or rng(1, note="(or 0 for no limit)")(key, v),  # None: no limit
    "top_p": rng(0, 1, lo_open=True),
}
# a request may use this share of the free memory (the rest: compiled programs, fragmentation)
MEMORY_SHARE = 0.9


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float = 1.0) -> None:
    for key, value in (("max_new_tokens", max_new_tokens), ("temperature", temperature), ("top_k", top_k),
                       ("top_p", top_p)):
        SAMPLING_RULES[key](key, value)


def available_memory() -> tuple[int, str]:
    """(bytes free for a new request, what they are): the accelerator's free memory where JAX
    reports it, else the host's available memory (/proc/meminfo's MemAvailable)."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        if "bytes_limit" in stats:
            return stats["bytes_limit"] - stats.get("bytes_in_use", 0), f"free memory on the {dev.device_kind}"
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kb * 1024, "available host memory"
    except (OSError, StopIteration, ValueError, IndexError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free host memory"


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def check_fits(need: int, num_samples: int, max_new_tokens: int, memory: tuple[int, str] | None = None) -> None:
    """Refuses a request whose arrays need more than MEMORY_SHARE of the free memory, before
    anything is allocated or compiled, naming a num_samples that would fit."""
    free, what = memory or available_memory()
    budget = int(MEMORY_SHARE * free)
    if need <= budget:
        return
    gib = lambda n: f"{n / 2**30:.1f} GiB"  # noqa: E731
    fit = budget * num_samples // need  # the arrays grow linearly with num_samples
    fix = (f"pass num_samples={fit} or fewer, or a smaller max_new_tokens" if fit >= 1 else
           f"even num_samples=1 does not fit; pass a smaller max_new_tokens "
           f"(about {max(1, budget * max_new_tokens // max(1, need * num_samples)):,})")
    raise UserError(f"the request (num_samples={num_samples} x max_new_tokens={max_new_tokens}) needs about "
                    f"{gib(need)} for its KV cache, token buffer and logits, more than the {gib(budget)} it may use "
                    f"of the {gib(free)} of {what}; {fix}")


def sample_token(key, logits, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0):
    """Draws one token from logits (V,) in float32: serving.sample_rows for one row. temperature 0
    is greedy argmax; top_k keeps the k most likely tokens; top_p keeps the smallest set whose
    probability reaches top_p."""
    row = lambda v, dt: jnp.full((1,), v, dt)  # noqa: E731
    return sample_rows(key[None], logits[None], row(temperature, F32), row(top_k or 0, jnp.int32),
                       row(top_p, F32))[0]


@dataclass
class Result:
    tokens: np.ndarray  # (num_samples, max_new_tokens); past an early stop, zeros
    lengths: np.ndarray  # (num_samples,) tokens kept: up to a stop string, else all
    decoded: int  # tokens decoded per sample (< max_new_tokens when every sample stopped early)
    seconds: float  # prefill and decoding, without compilation
    compile_seconds: float
    logits: np.ndarray | None = None  # (num_samples, decoded, V) with logits=True: what each token was drawn from

    @property
    def tokens_generated(self) -> int:
        """Tokens actually decoded, all samples together (what tokens/s should count)."""
        return int(self.tokens.shape[0] * self.decoded)


class Engine:
    """Batched, jit-compiled generation with a KV cache for a model (GPT or Bigram).

    vocab_size: the tokenizer's vocabulary when the model's is padded (50304 for 50257 BPE
    tokens): the padded ids, which no text decodes to, are never sampled.

    The host plans the request, since every sample grows by one token a step: while the cache
    has room, `extend` chunks run plain cached steps (no branch in the loop); when it is full,
    `refill` steps re-prefill from the last window_keep tokens. Each kind is compiled once per
    request shape, with the number of steps as an argument, and only if the request needs it.
    """

    def __init__(self, graphdef, params, block_size: int, chunk: int = 32, vocab_size: int | None = None):
        self.graphdef, self.params, self.block_size, self.chunk = graphdef, params, block_size, chunk
        self.vocab_size = vocab_size
        self._compiled: dict = {}
        self._slots: dict[int, SlotEngine] = {}  # a serving engine per num_samples (requests within the block)
        self.compile_seconds = 0.0

    # -- the three compiled pieces -----------------------------------------------------------

    def _prefill_fn(self, N: int, Tb: int, S: int, with_logits: bool):
        """Fills a cache of S slots from buf[start:start+Tb] (padded past P); returns the carry."""
        graphdef = self.graphdef

        def prefill(params, buf, prompt_len, start):
            model = nnx.merge(graphdef, params)
            window = jax.lax.dynamic_slice(buf, (0, start), (N, Tb))  # (N, Tb)
            logits, cache = model.decode(window, model.init_cache(N, S), 0, last=prompt_len - 1 - start)
            carry = {"buf": buf, "cache": cache, "n": prompt_len, "logits": logits}  # logits (N, V) for token n
            if with_logits:
                carry["out"] = jnp.zeros(buf.shape + logits.shape[-1:], F32)  # (N, L, V)
            return carry

        return prefill

    def _loop_fn(self, kind: str, N: int, keep: int):
        """`steps` decoding steps of one kind. Each samples the token at buffer index n from the
        carried logits (key fold_in(key_i, n)), writes it, then computes the logits for n + 1:
        'extend' by one cached step at cache slot n - start; 'refill' by a fresh prefill of the
        last `keep` tokens (the window moved, so every position changed)."""
        graphdef, V = self.graphdef, self.vocab_size

        def run(params, carry, keys, settings, start, steps):  # settings: temperature, top_k, top_p (N,)
            model = nnx.merge(graphdef, params)

            def step(_, c):
                n = c["n"]
                logits = c["logits"] if V is None else c["logits"][:, :V]  # (N, V)
                step_keys = jax.vmap(lambda k: jax.random.fold_in(k, n))(keys)
                tok = sample_rows(step_keys, logits, *settings)
                c = {**c, "buf": jax.lax.dynamic_update_slice(c["buf"], tok[:, None].astype(jnp.int32), (0, n))}
                if "out" in c:
                    c["out"] = jax.lax.dynamic_update_slice(c["out"], c["logits"][:, None].astype(F32), (0, n, 0))
                if kind == "extend":
                    logits, cache = model.decode(tok[:, None].astype(jnp.int32), c["cache"], n - start, last=0)
                else:
                    window = jax.lax.dynamic_slice(c["buf"], (0, n - keep + 1), (N, keep))  # (N, keep)
                    cache = jax.tree.map(jnp.zeros_like, c["cache"])
                    logits, cache = model.decode(window, cache, 0, last=keep - 1)
                return {**c, "cache": cache, "n": n + 1, "logits": logits}

            return jax.lax.fori_loop(0, steps, step, carry)

        return run

    def _compile(self, name, static, fn, *args, donate=()):
        """AOT-compiles once per signature and reports the compile time separately."""
        sig = (name, static) + tuple((a.shape, a.dtype) for a in jax.tree.leaves(args))
        if sig not in self._compiled:
            t0 = time.perf_counter()
            self._compiled[sig] = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
            self.compile_seconds += time.perf_counter() - t0
        return self._compiled[sig]

    # -- the public call ---------------------------------------------------------------------

    def generate(self, prompt: list[int], *, max_new_tokens: int, num_samples: int = 1,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
                 key: jax.Array | None = None, keys: jax.Array | None = None, window_keep: int = 0,
                 stop: list[int] | None = None, on_chunk: Callable[[np.ndarray], None] | None = None,
                 logits: bool = False) -> Result:
        """Generates max_new_tokens tokens after `prompt` for each sample.

        keys: one PRNG key per sample, (num_samples,); or `key`, from which sample i gets
        fold_in(key, i). stop: token ids; a sample's tokens from its first occurrence on are
        dropped (`lengths`) and generation ends early once every sample has stopped.
        on_chunk(tokens so far) is called after each decoded chunk (streaming). logits=True
        also returns the logits every new token was drawn from.
        """
        check_sampling_args(max_new_tokens, temperature, top_k, top_p)
        if not prompt:
            raise UserError("the prompt is empty; give at least one token (e.g. --start='\\n')")
        block = self.block_size
        keep = window_keep or block
        if not 1 <= keep <= block:
            raise UserError(f"window_keep must be in 1..block_size ({block}), got {window_keep}")
        if keys is None and key is None:
            raise UserError("generate needs a PRNG key: pass key= (or keys=, one per sample)")
        N, P, chunk = num_samples if keys is None else keys.shape[0], len(prompt), self.chunk
        rng(1)("num_samples", N)
        if not logits and P + max_new_tokens <= block:  # fits in the block: the serving engine's slots
            if keys is None:
                keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(N))
            return self._in_slots(prompt, max_new_tokens, keys, (temperature, top_k, top_p), stop, on_chunk)
        # The buffer holds prompt + new tokens; its length is bucketed, so that similar requests
        # share compilations. The cache needs no more slots than the buffer has tokens.
        L = bucket(P, 1 << 30) + -(-max_new_tokens // chunk) * chunk
        if L > 2**31 - 1:  # buffer positions are int32
            raise UserError(f"max_new_tokens={max_new_tokens} after a {P}-token prompt is more than one request can "
                            f"hold (2**31 - 1 tokens); ask for fewer")
        S = min(block, L)
        n, start = P, max(0, P - block)  # the cache holds buf[start:n]
        Tb = bucket(P - start, block)  # prefill window, padded to a power of two
        i32 = jnp.int32
        prefill_fn = self._prefill_fn(N, Tb, S, logits)
        # what the request holds (cache, buffer, logits: the loop's carry), known before anything is
        # allocated or compiled; twice, for the carry in and out of a step, plus the host's copy
        carry = jax.eval_shape(prefill_fn, self.params, jax.ShapeDtypeStruct((N, L), jnp.int32), i32(P), i32(start))
        check_fits(2 * nbytes(carry) + N * max_new_tokens * 4, N, max_new_tokens)
        if keys is None:
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(N))
        buf = jnp.zeros((N, L), jnp.int32).at[:, :P].set(jnp.asarray(prompt, jnp.int32))
        self.compile_seconds = 0.0
        prefill = self._compile("prefill", (N, Tb, S, logits), prefill_fn, self.params, buf, i32(P), i32(start))
        static = (N,)  # the settings are arrays: a new one compiles nothing
        settings = (jnp.full(N, temperature, F32), jnp.full(N, top_k or 0, i32), jnp.full(N, top_p, F32))
        loops = {}

        def loop(kind):
            if kind not in loops:
                k = keep if kind == "refill" else 0  # extend steps do not depend on window_keep
                loops[kind] = self._compile(kind, static + (k,), self._loop_fn(kind, *static, k), self.params, carry,
                                            keys, settings, i32(0), i32(0), donate=(1,))
            return loops[kind]

        # compile what this request will use before the clock starts
        loop("extend")
        if P - start + max_new_tokens - 1 > S:  # a token before the last finds the cache full
            loop("refill")

        t0 = time.perf_counter()
        carry = prefill(self.params, buf, i32(P), i32(start))
        done = 0
        while done < max_new_tokens:
            room = S - (n - start)
            if room > 0 or done == max_new_tokens - 1:  # cached steps until the cache is full
                # (the last token needs no logits after it: its step may find the cache full,
                # its forward then writes into the clamped last slot, and nothing reads either)
                steps = min(max(room, 1), max_new_tokens - done, chunk - done % chunk)
                carry = loop("extend")(self.params, carry, keys, settings, i32(start), i32(steps))
            else:  # full: each step re-prefills; with keep < block only one is needed per fill
                steps = min(max_new_tokens - done, chunk - done % chunk) if keep == block else 1
                carry = loop("refill")(self.params, carry, keys, settings, i32(start), i32(steps))
                start = n + steps - keep
            n, done = n + steps, done + steps
            if (on_chunk is not None or stop) and (done % chunk == 0 or done == max_new_tokens):
                new = np.asarray(carry["buf"][:, P:P + done])
                if on_chunk is not None:
                    on_chunk(new)
                if stop and all(find_stop(row, stop) >= 0 for row in new):
                    break
        tokens = np.zeros((N, max_new_tokens), np.int32)
        tokens[:, :done] = np.asarray(carry["buf"][:, P:P + done])
        out = np.asarray(carry["out"][:, P:P + done]) if logits else None
        seconds = time.perf_counter() - t0
        lengths = np.full(N, done)
        if stop:
            lengths = np.array([at if (at := find_stop(row[:done], stop)) >= 0 else done for row in tokens])
        return Result(tokens, lengths, done, seconds, self.compile_seconds, out)


    def _in_slots(self, prompt, max_new_tokens, keys, settings, stop, on_chunk) -> Result:
        """A request that fits in block_size, one sample per slot of a serving.SlotEngine (the
        server's engine: sample.py and the server draw the same tokens for the same keys)."""
        N, P, chunk = keys.shape[0], len(prompt), self.chunk
        cache = jax.eval_shape(lambda: nnx.merge(self.graphdef, self.params).init_cache(N, self.block_size))
        check_fits(2 * nbytes(cache) + N * max_new_tokens * 4, N, max_new_tokens)
        engine = self._slots.get(N)
        if engine is None:
            engine = self._slots[N] = SlotEngine(self.graphdef, self.params, self.block_size, slots=N, chunk=chunk,
                                                 vocab_size=self.vocab_size)
        temperature, top_k, top_p = settings
        c0, t0 = engine.compile_seconds, time.perf_counter()
        key_data = np.asarray(jax.random.key_data(keys))
        slots = engine.join_many([dict(prompt=prompt, key_data=key_data[i], temperature=temperature, top_k=top_k,
                                       top_p=top_p) for i in range(N)])  # prefilled together
        tokens = np.zeros((N, max_new_tokens), np.int32)
        done = 0
        try:
            while done < max_new_tokens:
                out = engine.step()
                take = min(chunk, max_new_tokens - done)
                tokens[:, done:done + take] = out.tokens[slots, :take]
                done += take
                if on_chunk is not None:
                    on_chunk(tokens[:, :done])
                if stop and all(find_stop(row[:done], stop) >= 0 for row in tokens):
                    break
        finally:
            for s in slots:
                engine.leave(s)
        compile_seconds = self.compile_seconds = engine.compile_seconds - c0
        lengths = np.full(N, done)
        if stop:
            lengths = np.array([at if (at := find_stop(row[:done], stop)) >= 0 else done for row in tokens])
        return Result(tokens, lengths, done, time.perf_counter() - t0 - compile_seconds, compile_seconds)


def find_stop(row: np.ndarray, stop: list[int]) -> int:
    """Index of the first occurrence of the token sequence `stop` in row, or -1."""
    m = len(stop)
    if m == 0:
        return -1
    hits = np.flatnonzero(np.asarray(row) == stop[0])
    for i in hits:
        if i + m <= len(row) and list(row[i:i + m]) == list(stop):
            return int(i)
    return -1


def cut_at_stop(text: str, stop: str) -> str:
    """text up to (not including) the first occurrence of stop; all of it when stop is ''."""
    return text[:text.index(stop)] if stop and stop in text else text


class TextStream:
    """Turns a growing sample (token ids) into the text to print next, never showing what the
    final text will not hold: nothing at or past the stop string, no characters that might
    still become the stop string, no half-decoded UTF-8 character at the end.

        stream = TextStream(tok.decode, stop="\n\n")
        print(stream.update(tokens), end="")   # after each chunk
        print(stream.update(tokens, final=True))  # once, when generation ended
    """

    def __init__(self, decode: Callable[[np.ndarray], str], stop: str = ""):
        self.decode, self.stop, self.shown = decode, stop, ""

    def update(self, tokens: np.ndarray, final: bool = False) -> str:
        text = self.decode(tokens)
        full = cut_at_stop(text, self.stop)
        if not final and len(full) == len(text):  # no stop yet: hold back what may still change
            hold = next((k for k in range(min(len(self.stop) - 1, len(full)), 0, -1)
                         if full.endswith(self.stop[:k])), 0)
            full = full[:len(full) - hold].rstrip("\ufffd")
        new = full[len(self.shown):] if full.startswith(self.shown) else ""
        self.shown += new
        return new


class ChatSession:
    """A conversation with a chat-tuned model (jaxgpt.chat's template): the history, kept within the
    context window, and one streamed reply per user message.

        session = ChatSession(engine, Template.from_meta(meta), block_size, system="be brief")
        text = session.reply("reverse apple", on_text=lambda t: print(t, end=""))

    The prompt is the newest messages that fit the context less the reply's room, min(max_new_tokens,
    block_size / 4) tokens (the system message kept while it fits: jaxgpt.chat.Template.fit); a reply
    ends at <|end|>, after max_new_tokens, or at the end of the context. Turn i samples with fold_in(key, i)."""

    def __init__(self, engine: Engine, template, block_size: int, *, system: str = "", max_new_tokens: int = 256,
                 temperature: float = 0.8, top_k: int | None = 200, top_p: float = 1.0, key: jax.Array | None = None):
        self.engine, self.template, self.block_size = engine, template, block_size
        self.messages = [{"role": "system", "content": system}] if system.strip() else []
        self.max_new, self.room = max_new_tokens, max(1, min(max_new_tokens, block_size // 4))
        self.settings = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.key = jax.random.key(0) if key is None else key
        self.turn, self.dropped = 0, 0

    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """The model's answer to one user message (streamed to on_text as it comes); both join the history."""
        asked = self.messages + [{"role": "user", "content": text}]
        prompt, self.dropped = self.template.fit(asked, self.block_size - self.room)  # a UserError: history unchanged
        self.messages = asked
        end = self.template.ids["end"]
        stream = TextStream(lambda t: self.template.decode(t[:at] if (at := find_stop(t, [end])) >= 0 else t))
        show = (lambda tokens: on_text(stream.update(tokens[0]))) if on_text else None  # noqa: E731
        result = self.engine.generate(prompt, max_new_tokens=min(self.max_new, self.block_size - len(prompt)),
                                      key=jax.random.fold_in(self.key, self.turn), stop=[self.template.ids["end"]],
                                      on_chunk=show, **self.settings)
        self.turn += 1
        tokens = result.tokens[0, :int(result.lengths[0])]
        answer = self.template.decode(tokens)
        if on_text:
            on_text(stream.update(tokens, final=True))
        self.messages.append({"role": "assistant", "content": answer})
        self.last = result
        return answer


def generate(graphdef, params, prompt: list[int], *, max_new_tokens: int, num_samples: int = 1,
             temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
             key: jax.Array, block_size: int, window_keep: int = 0) -> np.ndarray:
    """One-call convenience: (num_samples, max_new_tokens) new token ids continuing `prompt`."""
    return Engine(graphdef, params, block_size).generate(
        prompt, max_new_tokens=max_new_tokens, num_samples=num_samples, temperature=temperature,
        top_k=top_k, top_p=top_p, key=key, window_keep=window_keep).tokens
