"""The output head's loss without the full logits: the lm_head matmul and the cross-entropy in
chunks of the sequence, so a train step never holds the (B, T, V) float32 logits, their softmax
or their gradient (at GPT-2 124M, B=12, T=1024, V=50304: 2.47 GB each).

    loss = head_loss(x, w, targets, tied=True, softcap=0.0)   # x (B, T, C), targets (B, T)

Small logits (the laptop recipes': 12 x 64 x 65) take the plain path, one matmul and optax's
cross-entropy: chunking them would only add a loop. Above CHUNK_BYTES the sequence is cut into
chunks of tc positions (all B rows of each: a batch sharded over devices stays sharded), and a
jax.custom_vjp computes, chunk by chunk, the logits (float32 accumulation), the float32 softmax
and loss, and already the gradients: dlogits = softmax - onehot(target) gives dx for the chunk and
adds to dw. The backward pass then only scales them by the incoming cotangent. So the matmuls are
the three of the plain head (logits, dx, dw), none is recomputed, and the memory of the head is
one chunk's logits plus dx (B, T, C) and dw (the head's shape). Evaluation (no gradient) runs the
loop without the gradient matmuls.

logit_softcap (cap * tanh(z / cap)) is applied to each chunk's float32 logits, and its derivative
(1 - (capped / cap)^2) to dlogits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

F32 = jnp.float32
# The float32 logits of one chunk stay under this; logits no larger than this are not chunked
CHUNK_BYTES = 64 << 20


def chunk_len(B: int, T: int, V: int, budget: int | None = None) -> int:
    """Positions per chunk (tc) for logits (B, T, V): T (no chunking) when the float32 logits fit
    the budget; else the largest tc with B * tc * V * 4 bytes in the budget, moved down to a
    divisor of T when one is at least half as large (no padding), and at least 1."""
    budget = CHUNK_BYTES if budget is None else budget
    if B * T * V * 4 <= budget:
        return T
    tc = max(1, budget // (B * V * 4))
    divisor = next(d for d in range(tc, 0, -1) if T % d == 0)
    return divisor if 2 * divisor >= tc else tc


def logits_of(x, w, tied: bool, softcap: float):
    """x (N, C) in the compute dtype, w the head's weight ((V, C) tied, (C, V) untied; cast to the
    compute dtype here) -> float32 logits (N, V), soft-capped when softcap > 0."""
    w = w.astype(x.dtype)
    spec = "nc,vc->nv" if tied else "nc,cv->nv"
    z = jnp.einsum(spec, x, w, preferred_element_type=F32)
    return softcap * jnp.tanh(z / softcap) if softcap > 0 else z


def head_loss(x, w, targets, *, tied: bool, softcap: float = 0.0, tc: int | None = None, masked: bool = False):
    """Mean next-token cross-entropy of the head on hidden states x (B, T, C): float32 softmax and
    loss. tc: positions per chunk (default: chunk_len's rule); tc >= T computes the whole (B, T, V)
    logits at once, as the model's forward does. masked (chat data): targets < 0 are not trained
    on, and the mean is over the others (0 when there are none)."""
    B, T, C = x.shape
    V = w.shape[0] if tied else w.shape[1]
    tc = chunk_len(B, T, V) if tc is None else min(tc, T)
    if tc >= T:
        logits = logits_of(x.reshape(B * T, C), w, tied, softcap)  # (B*T, V)
        if masked:
            return masked_mean(logits, targets.reshape(-1))
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets.reshape(-1)).mean()
    return _chunked_loss(x, w, targets, tc, tied, float(softcap), masked)


def masked_mean(logits, targets):
    """Mean cross-entropy of float32 logits (N, V) over the rows whose target is >= 0 (0 if none)."""
    valid = targets >= 0
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, targets, 0))
    return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(jnp.sum(valid), 1).astype(F32)


def n_counted(targets, masked: bool):
    """The positions the mean is over: every one, or (masked) those with a target >= 0, at least 1."""
    B, T = targets.shape
    return jnp.maximum(jnp.sum(targets >= 0), 1).astype(F32) if masked else B * T


def _padded(x, targets, tc: int):
    """x (B, T, C), targets (B, T) padded along T to a multiple of tc, and the chunk count."""
    T = x.shape[1]
    n = -(-T // tc)
    pad = n * tc - T
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    return x, targets, n


def _chunk(x, targets, i, tc: int, T: int, masked: bool = False):
    """Chunk i: hidden states (B*tc, C), targets (B*tc,), and which rows are real positions (B*tc,)
    (masked: and have a target >= 0, which is then made a valid index)."""
    B, _, C = x.shape
    xc = jax.lax.dynamic_slice_in_dim(x, i * tc, tc, axis=1).reshape(B * tc, C)
    tcs = jax.lax.dynamic_slice_in_dim(targets, i * tc, tc, axis=1).reshape(B * tc)
    real = jnp.broadcast_to(i * tc + jnp.arange(tc) < T, (B, tc)).reshape(B * tc)
    if masked:
        real, tcs = real & (tcs >= 0), jnp.maximum(tcs, 0)
    return xc, tcs, real


def _row_losses(z, t):
    """Cross-entropy of each row of float32 logits z (N, V) at targets t (N,), and the logsumexp."""
    lse = jax.nn.logsumexp(z, axis=-1)
    return lse - jnp.take_along_axis(z, t[:, None], axis=-1)[:, 0], lse


def _loss_only(x, w, targets, tc, tied, softcap, masked=False):
    B, T, _ = x.shape
    xp, tp, n = _padded(x, targets, tc)
    wc = w.astype(x.dtype)  # once, not per chunk

    def body(total, i):
        xc, tcs, real = _chunk(xp, tp, i, tc, T, masked)
        losses, _ = _row_losses(logits_of(xc, wc, tied, softcap), tcs)
        return total + jnp.sum(jnp.where(real, losses, 0.0)), None

    total, _ = jax.lax.scan(body, jnp.zeros((), F32), jnp.arange(n))
    return total / n_counted(targets, masked)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _chunked_loss(x, w, targets, tc, tied, softcap, masked=False):
    return _loss_only(x, w, targets, tc, tied, softcap, masked)


def _chunked_loss_fwd(x, w, targets, tc, tied, softcap, masked=False):
    """The loss and, in the same pass over the chunks, its gradients dx and dw."""
    B, T, C = x.shape
    xp, tp, n = _padded(x, targets, tc)
    wc = w.astype(x.dtype)  # once, not per chunk
    count = n_counted(targets, masked)
    scale = 1.0 / count  # d(mean)/d(row loss)

    def body(carry, i):
        total, dx, dw = carry
        xc, tcs, real = _chunk(xp, tp, i, tc, T, masked)
        z = logits_of(xc, wc, tied, softcap)  # (B*tc, V) float32
        losses, lse = _row_losses(z, tcs)
        total = total + jnp.sum(jnp.where(real, losses, 0.0))
        # dloss/dz = softmax(z) - onehot(target), per real row, / (B*T)
        dz = jnp.exp(z - lse[:, None])
        dz = dz.at[jnp.arange(dz.shape[0]), tcs].add(-1.0) * jnp.where(real, scale, 0.0)[:, None]
        if softcap > 0:
            dz = dz * (1.0 - jnp.square(z / softcap))  # z is capped: tanh' = 1 - tanh^2
        dz = dz.astype(x.dtype)
        if tied:  # w (V, C): z = x wᵀ
            dxc = jnp.einsum("nv,vc->nc", dz, wc, preferred_element_type=F32)
            dw = dw + jnp.einsum("nv,nc->vc", dz, xc, preferred_element_type=F32)
        else:  # w (C, V): z = x w
            dxc = jnp.einsum("nv,cv->nc", dz, wc, preferred_element_type=F32)
            dw = dw + jnp.einsum("nc,nv->cv", xc, dz, preferred_element_type=F32)
        dx = jax.lax.dynamic_update_slice_in_dim(dx, dxc.reshape(B, tc, C).astype(x.dtype), i * tc, axis=1)
        return (total, dx, dw), None

    init = (jnp.zeros((), F32), jnp.zeros(xp.shape, x.dtype), jnp.zeros(w.shape, F32))
    (total, dx, dw), _ = jax.lax.scan(body, init, jnp.arange(n))
    return total / count, (dx[:, :T], dw.astype(w.dtype))


def _chunked_loss_bwd(tc, tied, softcap, masked, res, g):
    dx, dw = res
    return (dx * g.astype(dx.dtype), dw * g.astype(dw.dtype), None)


_chunked_loss.defvjp(_chunked_loss_fwd, _chunked_loss_bwd)


def target_logprobs(x, w, targets, *, tied: bool, softcap: float = 0.0, vocab: int | None = None,
                    tc: int | None = None):
    """log p(target) at every position of hidden states x (B, T, C): (B, T) float32, for evaluation
    (no gradient). The log-softmax is float32 and runs over the first `vocab` entries of the head
    (the tokenizer's: a padded vocabulary's extra rows are left out), in chunks of tc positions
    (default: chunk_len's rule), so the (B, T, V) logits are never held whole."""
    B, T, _ = x.shape
    if vocab is not None:
        w = w[:vocab] if tied else w[:, :vocab]
    V = w.shape[0] if tied else w.shape[1]
    tc = chunk_len(B, T, V) if tc is None else min(tc, T)
    xp, tp, n = _padded(x, targets, tc)
    wc = w.astype(x.dtype)  # once, not per chunk

    def body(carry, i):
        xc, tcs, _ = _chunk(xp, tp, i, tc, T)
        losses, _ = _row_losses(logits_of(xc, wc, tied, softcap), tcs)  # (B*tc,)
        return carry, -losses.reshape(B, tc)

    _, lp = jax.lax.scan(body, None, jnp.arange(n))  # (n, B, tc)
    return lp.transpose(1, 0, 2).reshape(B, n * tc)[:, :T]
