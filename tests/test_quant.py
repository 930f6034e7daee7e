"""Quantized frozen kernels (jaxgpt/quant.py): NF4 and int8 round trips and their error bounds,
the packed layout and its byte count, padding, jit/pytree behaviour, gradients through qdense,
and the memory properties (one layer decoded at a time, one float layer loaded at a time)."""

import math
import weakref
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt import quant
from jaxgpt.quant import NF4, QTensor, dequantize, qdense, quantize, quantize_stream, quantize_tree


def normal(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def unpacked_codes(q: QTensor) -> np.ndarray:
    """The (C_pad, C_out) codebook indices, unpacked here by the documented layout: row 2i in
    the low nibble, row 2i + 1 in the high one."""
    c = np.asarray(q.codes)
    out = np.empty((2 * c.shape[0], c.shape[1]), np.uint8)
    out[0::2], out[1::2] = c & 0xF, c >> 4
    return out


# ----------------------------------------------------------------------------- the NF4 codebook

def test_codebook_is_the_published_nf4():
    """NF4 as bitsandbytes builds it (create_normal_map): the normal quantiles of 8 evenly spaced
    probabilities from 0.9677083 to 0.5 (exclusive) for the positive side, 7 for the negative
    side, and 0, divided by the largest. Rebuilt in float64 here, so within 3e-7."""
    ppf, offset = NormalDist().inv_cdf, 0.9677083
    pos = [ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    neg = [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    built = np.sort(np.array(pos + [0.0] + neg))
    np.testing.assert_allclose(NF4, built / built.max(), rtol=0, atol=3e-7)
    assert NF4.dtype == np.float32 and (NF4[0], NF4[7], NF4[15]) == (-1.0, 0.0, 1.0)


def test_codebook_values_round_trip_exactly():
    """A block with absmax 1 that holds every codebook value (in a different order in each
    column) comes back bit for bit, with code i for value i."""
    perms = np.stack([np.random.default_rng(j).permutation(16) for j in range(8)], axis=1)  # (16, 8)
    w = np.zeros((64, 8), np.float32)
    w[:16] = NF4[perms]
    q = quantize(w)
    np.testing.assert_array_equal(np.asarray(q.scale), 1.0)
    np.testing.assert_array_equal(unpacked_codes(q)[:16], perms)
    np.testing.assert_array_equal(np.asarray(dequantize(q)), w)


def test_ties_go_to_the_lower_entry():
    """A value exactly halfway between two entries (as float32) takes the lower entry's code."""
    w = np.zeros((64, 1), np.float32)
    w[0] = 1.0  # absmax 1, so w / absmax is w itself
    w[1:16, 0] = quant.NF4_MIDPOINTS
    codes = unpacked_codes(quantize(w))[1:16, 0]
    np.testing.assert_array_equal(codes, np.arange(15))


# ----------------------------------------------------------------------------- NF4 round trip

def test_block_absmax_is_preserved_exactly():
    """The scale is each (64-row block, column)'s absmax, and the element where |w| is largest
    decodes to itself: it is +-absmax and the codebook holds +-1."""
    w = normal((256, 96))
    q = quantize(w)
    blocks = w.reshape(4, 64, 96)
    absmax = np.abs(blocks).max(axis=1)  # (4, 96)
    np.testing.assert_array_equal(np.asarray(q.scale), absmax)
    where = np.abs(blocks).argmax(axis=1)  # (4, 96)
    d = np.asarray(dequantize(q)).reshape(4, 64, 96)
    picked = lambda a: np.take_along_axis(a, where[:, None, :], axis=1)
    np.testing.assert_array_equal(picked(d), picked(blocks))


def nearest_code_error(u: np.ndarray) -> np.ndarray:
    """|u - nearest NF4 entry| for u in [-1, 1], found by brute force."""
    return np.abs(u[..., None] - NF4).min(axis=-1)


def predicted_nf4_relative_rms(block: int = 64) -> float:
    """The expected relative RMS error ||W - W_hat|| / ||W|| of NF4 with absmax blocks on
    N(0, 1) weights, derived rather than measured.

    In a block of n = `block` values the largest |w|, M, has density n F(m)^(n-1) f(m), with
    F(m) = erf(m / sqrt 2) and f(m) = 2 phi(m) the distribution of |w|. That element decodes
    exactly; the other n - 1 are N(0, 1) given |w| < M, and w = M u decodes to M q(u), q the
    nearest codebook entry. So
        E[e^2] = (n - 1) / n * E_M[ int_{-1}^{1} (M (q(u) - u))^2 phi(M u) M du / F(M) ],
    and E[w^2] = 1: the relative RMS error is sqrt(E[e^2]). Integrated on grids (M up to 6.5:
    P(M > 6.5) < 1e-8)."""
    m = np.linspace(0.5, 6.5, 1201)[:, None]  # (Gm, 1)
    u = np.linspace(-1.0, 1.0, 4001)[None, :]  # (1, Gu)
    erf = np.vectorize(math.erf)
    phi = lambda x: np.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    F = erf(m / math.sqrt(2))
    density_m = block * F ** (block - 1) * 2 * phi(m)
    err = nearest_code_error(u.astype(np.float32)).astype(np.float64)
    mse_given_m = np.trapezoid((m * err) ** 2 * phi(m * u) * m, u, axis=1)[:, None] / F
    mse = (block - 1) / block * np.trapezoid((density_m * mse_given_m)[:, 0], m[:, 0])
    return math.sqrt(mse)


@pytest.mark.slow
def test_nf4_error_within_the_derived_bounds():
    """Per element: |w - w_hat| <= absmax * (largest gap between neighbouring entries) / 2, the
    gap between -1 and -0.696 (0.152 * absmax), and each code is that of a nearest entry (by
    brute force, up to float32 rounding at the midpoints). Overall: the relative RMS error matches the value
    derived in predicted_nf4_relative_rms (0.0920 for blocks of 64) within 2% on 2M weights."""
    w = normal((2048, 1024), seed=1)
    q = quantize(w)
    d = np.asarray(dequantize(q))
    absmax = np.repeat(np.asarray(q.scale), 64, axis=0)  # (C_in, C_out)
    err = np.abs(d - w)
    half_gap = np.diff(NF4).max() / 2
    assert half_gap == pytest.approx(0.1519, abs=1e-4)
    assert np.all(err <= absmax * half_gap * (1 + 1e-6))
    # in float64, exact for float32 inputs: a code may differ from the argmin only where u lies
    # within float32 rounding of a midpoint (both entries then equally near)
    dist = np.abs((w / absmax).astype(np.float64)[..., None] - NF4.astype(np.float64))  # (C_in, C_out, 16)
    ours = np.take_along_axis(dist, unpacked_codes(q)[..., None].astype(np.int64), axis=-1)[..., 0]
    assert np.all(ours <= dist.min(axis=-1) + 1e-7)
    predicted = predicted_nf4_relative_rms()
    assert predicted == pytest.approx(0.092, abs=0.001)
    assert np.linalg.norm(d - w) / np.linalg.norm(w) == pytest.approx(predicted, rel=0.02)


def test_packed_layout_and_byte_count():
    """nf4: one byte per two weights, row 2i in the low nibble; one float32 scale per 64 weights:
    exactly 4.5 bits per parameter. int8: one byte per weight and a float32 scale per column."""
    c_in, c_out = 1024, 4096
    w = normal((c_in, c_out))
    q = quantize(w)
    assert q.codes.dtype == np.uint8 and q.codes.shape == (c_in // 2, c_out)
    assert q.scale.dtype == np.float32 and q.scale.shape == (c_in // 64, c_out)
    assert q.codes.nbytes == c_in * c_out // 2 and q.scale.nbytes == c_in * c_out // 64 * 4
    assert q.nbytes == 2_359_296 and q.bits_per_param == 4.5
    # the nibble order, read independently of dequantize: codes of rows 0 and 1 of column 0
    u = w[:2, 0] / np.abs(w[:64, 0]).max()
    nearest = np.abs(u[:, None] - NF4).argmin(axis=1)
    assert int(q.codes[0, 0]) == nearest[0] | (nearest[1] << 4)
    q8 = quantize(w, "int8")
    assert q8.codes.dtype == np.int8 and q8.codes.shape == (c_in, c_out) and q8.scale.shape == (1, c_out)
    assert q8.nbytes == c_in * c_out + 4 * c_out and q8.bits_per_param == 8 + 32 / c_in


# ----------------------------------------------------------------------------- int8, shapes, errors

def test_int8_round_trip_within_half_a_step():
    """Symmetric absmax per column: scale = absmax / 127, codes in [-127, 127], the absmax
    element on +-127, every element within absmax / 254 (half a step) of where it was."""
    w = normal((768, 300), seed=2)
    q = quantize(w, "int8")
    absmax = np.abs(w).max(axis=0)
    np.testing.assert_allclose(np.asarray(q.scale)[0], absmax / 127, rtol=1e-7)
    codes = np.asarray(q.codes)
    assert codes.min() >= -127 and codes.max() <= 127
    np.testing.assert_array_equal(np.abs(codes[np.abs(w).argmax(axis=0), np.arange(300)]), 127)
    err = np.abs(np.asarray(dequantize(q)) - w)
    assert np.all(err <= absmax / 254 * (1 + 1e-5))
    assert np.sqrt(np.mean(err ** 2) / np.mean(w ** 2)) < 0.01


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("c_in", [100, 33, 32])
def test_c_in_not_a_multiple_of_the_block_is_padded(kind, c_in):
    """C_in is padded with zero rows to a multiple of the block; the padding decodes to zero and
    is dropped, so the result is the padded kernel's, cut back to C_in rows."""
    w = normal((c_in, 48), seed=3)
    q = quantize(w, kind, block=64)
    c_pad = -(-c_in // 64) * 64
    assert q.shape == (c_in, 48) and q.scale.shape == (c_pad // 64, 48)
    assert q.codes.shape == ((c_pad // 2) if kind == "nf4" else c_pad, 48)
    padded = quantize(np.pad(w, ((0, c_pad - c_in), (0, 0))), kind, block=64)
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(padded.codes))
    d = np.asarray(dequantize(q))
    assert d.shape == (c_in, 48)
    np.testing.assert_array_equal(d, np.asarray(dequantize(padded))[:c_in])
    np.testing.assert_array_equal(np.asarray(dequantize(padded))[c_in:], 0.0)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown quantization kind"):
        quantize(normal((64, 4)), "int4")
    with pytest.raises(ValueError, match="2-D"):
        quantize(normal((2, 64, 4)))
    with pytest.raises(ValueError, match="even"):
        quantize(normal((64, 4)), block=63)


def test_zero_blocks_decode_to_zero():
    for kind in ("nf4", "int8"):
        np.testing.assert_array_equal(np.asarray(dequantize(quantize(np.zeros((128, 8)), kind))), 0.0)


# ----------------------------------------------------------------------------- jit and pytrees

@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_jit_device_put_and_tree_leaves(kind):
    """Quantizing and dequantizing inside jit give what they give outside; a QTensor's leaves are
    its two plain arrays, and device_put with a sharding keeps the type and metadata."""
    w = normal((128, 64))
    q = quantize(w, kind)
    qj = jax.jit(lambda w: quantize(w, kind))(w)
    np.testing.assert_array_equal(np.asarray(qj.codes), np.asarray(q.codes))
    np.testing.assert_array_equal(np.asarray(jax.jit(dequantize)(q)), np.asarray(dequantize(q)))
    assert [x.dtype for x in jax.tree.leaves(q)] == [q.codes.dtype, np.float32]
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("model",))
    placed = jax.device_put(q, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "model")))
    assert isinstance(placed, QTensor) and (placed.kind, placed.shape, placed.block) == (kind, (128, 64), q.block)
    np.testing.assert_array_equal(np.asarray(dequantize(placed)), np.asarray(dequantize(q)))


def test_qdense_is_x_at_the_dequantized_kernel_in_x_dtype():
    w, x, b = normal((96, 40)), normal((2, 5, 96), seed=1), normal((40,), seed=2)
    for kind in ("nf4", "int8"):
        q = quantize(w, kind)
        y = jax.jit(qdense)(x, q, b)
        np.testing.assert_allclose(np.asarray(y), x @ np.asarray(dequantize(q)) + b, rtol=1e-5, atol=1e-5)
        y16 = jax.jit(qdense)(x.astype(jnp.bfloat16), q)
        assert y16.dtype == jnp.bfloat16 and y16.shape == (2, 5, 40)


def test_an_inf_or_nan_input_changes_only_its_own_row():
    """qdense ties the decode to x's first element (see dequantize's `after`); that tie must not
    change the kernel when the element is inf or NaN."""
    w = normal((128, 64))
    for kind in ("nf4", "int8"):
        q = quantize(w, kind)
        ref = normal((3, 128), seed=1) @ np.asarray(dequantize(q))
        for bad in (np.nan, np.inf, -np.inf):
            x = normal((3, 128), seed=1)
            x[0, 0] = bad
            y = np.asarray(jax.jit(qdense)(x, q))
            np.testing.assert_array_equal(y[1:], ref[1:])


# ----------------------------------------------------------------------------- LoRA over a quantized base

def lora_mlp(adapters, base, x, dense):
    """A 2-layer MLP with rank-4 adapters on both layers: the shape of a LoRA step over a frozen
    base. `dense(x, kernel)` applies a base kernel (quantized or plain)."""
    h = x
    for (a, b), k in zip(adapters, base):
        h = jnp.tanh(dense(h, k) + (h @ a) @ b * 2.0)
    return jnp.mean((h - 0.1) ** 2)


def tiny_lora(kind):
    shapes = [(64, 128), (128, 64)]
    base = [quantize(normal(s, seed=i) * 0.1, kind) for i, s in enumerate(shapes)]
    adapters = [(jnp.asarray(normal((s[0], 4), seed=10 + i) * 0.1), jnp.asarray(normal((4, s[1]), seed=20 + i) * 0.1))
                for i, s in enumerate(shapes)]
    return adapters, base, jnp.asarray(normal((16, 64), seed=30))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.slow
def test_gradients_reach_the_adapters_and_not_the_codes(kind):
    adapters, base, x = tiny_lora(kind)
    loss = lambda ad, base: lora_mlp(ad, base, x, qdense)
    g_ad, g_base = jax.grad(loss, argnums=(0, 1), allow_int=True)(adapters, base)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_ad))
    for g in g_base:
        assert g.codes.dtype == jax.dtypes.float0  # integers take no gradient
        assert not np.any(np.asarray(g.scale))  # and the frozen scales none either


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_one_step_equals_the_step_on_the_dequantized_float32_kernel(kind):
    """One Adam step on the adapters over the quantized base equals the same step with the base
    dequantized up front into plain float32 kernels. Both compute x @ W with the same float32
    W, so they may differ only by XLA's operation order: tolerance 1e-6 relative, 1e-7
    absolute (float32 epsilon is 1.2e-7)."""
    adapters, base, x = tiny_lora(kind)
    plain = [dequantize(q) for q in base]
    opt = optax.adam(1e-2)

    def step(dense, base):
        loss, g = jax.value_and_grad(lambda ad: lora_mlp(ad, base, x, dense))(adapters)
        updates, _ = opt.update(g, opt.init(adapters), adapters)
        return loss, g, optax.apply_updates(adapters, updates)

    got = jax.jit(lambda base: step(qdense, base))(base)
    want = jax.jit(lambda base: step(lambda h, w: h @ w, base))(plain)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert float(got[0]) > 0 and float(jnp.abs(got[1][0][0]).max()) > 0  # the step did something


# ----------------------------------------------------------------------------- memory

def compiled_temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_a_step_decodes_one_layer_at_a_time():
    """XLA's temporary memory for a forward and a backward pass through 8 quantized layers stays
    within one float32 layer (plus 1 MiB) of the same pass over float32 kernels held as
    arguments, instead of holding all 8 decoded layers (what `x @ dequantize(q)` costs on
    XLA:CPU, also checked, so that this test can tell the two apart)."""
    C, L = 256, 8
    base = [quantize(normal((C, C), seed=i) * 0.05) for i in range(L)]
    adapters = [(jnp.full((C, 4), 0.01), jnp.full((4, C), 0.01)) for _ in range(L)]
    x = jnp.asarray(normal((64, C)))
    one_layer = C * C * 4

    def temp(dense, base):
        return (compiled_temp_bytes(lambda b, x: lora_mlp(adapters, b, x, dense), base, x),
                compiled_temp_bytes(jax.grad(lambda ad, b: lora_mlp(ad, b, x, dense)), adapters, base))

    floor = temp(lambda h, w: h @ w, [dequantize(q) for q in base])
    ours = temp(qdense, base)
    untied = temp(lambda h, q: h @ dequantize(q), base)
    for f, o, u in zip(floor, ours, untied):
        assert o <= f + one_layer + 2**20, (o, f)
        assert u >= f + (L - 1) * one_layer, (u, f)


class Tracked(np.ndarray):
    """An ndarray that can be weakly referenced, to see when a loaded layer is let go."""


def test_quantize_stream_lets_each_layer_go_before_loading_the_next():
    """The loader finds every earlier float layer released when it loads the next. 32 layers:
    handing numpy straight to the quantizer left a layer referenced in 13-29% of calls."""
    alive = []

    def loader():
        for i in range(32):
            assert all(ref() is None for ref in alive), f"layer {i - 1} still alive while layer {i} loads"
            kernel = normal((128, 64), seed=i).view(Tracked)
            alive.append(weakref.ref(kernel))
            yield ("h", str(i), "kernel"), kernel
            del kernel
            yield ("h", str(i), "bias"), np.zeros(64, np.float32)

    tree = quantize_stream(loader(), lambda path, x: path[-1] == "kernel")
    assert sorted(tree["h"], key=int) == [str(i) for i in range(32)]
    assert isinstance(tree["h"]["31"]["kernel"], QTensor) and tree["h"]["31"]["bias"].shape == (64,)


def test_quantize_tree_replaces_only_the_selected_leaves():
    params = {"wte": {"embedding": normal((50, 32))},
              "h": {"0": {"attn": {"c_attn": {"kernel": normal((32, 96)), "bias": normal((96,))}},
                          "ln_1": {"scale": np.ones(32, np.float32)}}}}
    out = quantize_tree(params, lambda path, x: path[-1] == "kernel", kind="int8")
    assert isinstance(out["h"]["0"]["attn"]["c_attn"]["kernel"], QTensor)
    assert out["h"]["0"]["attn"]["c_attn"]["kernel"].kind == "int8"
    assert out["wte"]["embedding"] is params["wte"]["embedding"]
    assert out["h"]["0"]["ln_1"]["scale"] is params["h"]["0"]["ln_1"]["scale"]
    assert jax.tree.structure(jax.jit(lambda t: t)(out)) == jax.tree.structure(out)
