"""Models in Flax NNX: the bigram baseline and GPT, with GPT-2 parameter names.

Shape letters: B batch, T time (sequence), C channels (n_embd), V vocabulary, H heads,
hs head size (C // H). Both models map token ids (B, T) to float32 logits (B, T, V).

Randomness is explicit: dropout draws from a `dropout_key` argument (None = no dropout),
so the model holds nothing but parameters and a train step stays a pure function.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxgpt.config import Config, ModelKeys
from jaxgpt.errors import UserError
from jaxgpt.head import head_loss, logits_of, masked_mean, target_logprobs
from jaxgpt.layers import Linear, dropout
from jaxgpt.lora import LoRALinear, count
from jaxgpt.runtime import resolve_dtype

F32 = jnp.float32


@dataclass(frozen=True)
class ModelConfig(ModelKeys):
    """A model as built: the keys that shape it (config.ModelKeys, declared once there) and what a
    run resolved for it. A checkpoint records it."""
    vocab_size: int = 65  # V: from the data's tokenizer (a BPE vocabulary padded to a multiple of 64)
    dtype: str = "float32"  # the compute dtype, resolved (never 'auto'); parameters are always float32
    attn_impl: str = "explicit"  # 'explicit' | 'xla' | 'cudnn' | 'splash', resolved for these devices: see attention()
    gelu: str = "exact"  # 'exact' (nanoGPT's nn.GELU) | 'tanh' (OpenAI GPT-2's approximation)
    lora_rank: int = 0  # LoRA adapters on lora_targets (0 = none): see jaxgpt.lora
    # QLoRA: the frozen base's Linear kernels are stored quantized ('nf4' | 'int8'; '' = float32);
    # the model is built as usual and the train state's frozen tree holds QTensors (jaxgpt.quant)
    base_quant: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def non_gpt2_options(self) -> list[str]:
        """The options this model uses that GPT-2's layout has no equivalent for ([] = a GPT-2)."""
        out = [f"pos_emb={self.pos_emb}"] if self.pos_emb != "learned" else []
        out += [f"norm={self.norm}"] if self.norm != "layernorm" else []
        out += ["qk_norm"] if self.qk_norm else []
        out += [f"mlp={self.mlp}"] if self.mlp != "gelu" else []
        out += ["untied_head"] if self.untied_head else []
        out += [f"logit_softcap={self.logit_softcap:g}"] if self.logit_softcap > 0 else []
        return out

    def check_gpt2_layout(self, what: str) -> None:
        """A UserError naming the options that keep this model from `what` (a GPT-2-layout job)."""
        options = self.non_gpt2_options()
        if options:
            raise UserError(f"{what} needs GPT-2's layout, but this model uses {', '.join(options)}, "
                            f"which GPT-2 has no equivalent for")


def linear(cfg: "ModelConfig", path: str, c_in: int, c_out: int, init, rngs: nnx.Rngs) -> Linear:
    """The Linear layer at `path` (e.g. 'attn.c_attn'): with LoRA adapters when cfg.lora_targets
    names it (see jaxgpt.lora), else plain. Both are called as layer(x, dropout_key)."""
    kw = dict(use_bias=cfg.bias, dtype=jnp.dtype(cfg.dtype), kernel_init=init, rngs=rngs)
    if cfg.lora_rank > 0 and path in cfg.lora_targets.split(","):
        return LoRALinear(c_in, c_out, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                          path=path, **kw)
    return Linear(c_in, c_out, **kw)


def gelu(x, kind: str = "exact"):
    """GELU. 'exact' is x * Phi(x), as nanoGPT's nn.GELU(), written with erf: XLA's CPU erfc, which
    jax.nn.gelu(approximate=False) uses, is 2x slower and costs 6 ms of a 48 ms laptop step.
    'tanh' is the approximation OpenAI's GPT-2 was trained with (Hugging Face's gelu_new):
    pretrained GPT-2 weights need it to give the reference logits."""
    if kind == "tanh":
        return jax.nn.gelu(x, approximate=True)
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


def rms_norm(x, eps: float = 1e-6):
    """x / rms(x) over the last axis, computed in float32, returned in x's dtype (no parameters)."""
    x32 = x.astype(F32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def rope(x, pos, base: float = 10000.0):
    """Rotary position embedding: x (B, T, H, hs) rotated by positions pos (T,), pairing channel i
    with i + hs/2 (GPT-NeoX's layout), angles in float32. Relative: q(t)·k(s) depends on t - s only."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-jnp.arange(half, dtype=F32) / half)  # (hs/2,)
    ang = pos.astype(F32)[:, None] * inv_freq[None, :]  # (T, hs/2)
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]  # (1, T, 1, hs/2)
    x1, x2 = x[..., :half].astype(F32), x[..., half:].astype(F32)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def mlp_width(cfg: "ModelConfig") -> int:
    """The MLP's hidden width: 4C, or for SwiGLU (two input matrices) 8C/3 rounded up to a multiple
    of 32, which keeps its three matrices near the parameters of two 4C ones."""
    return 4 * cfg.n_embd if cfg.mlp != "swiglu" else -(-8 * cfg.n_embd // 3 // 32) * 32


def norm_layer(cfg: "ModelConfig", rngs: nnx.Rngs):
    dt = jnp.dtype(cfg.dtype)
    if cfg.norm == "rmsnorm":
        return nnx.RMSNorm(cfg.n_embd, epsilon=1e-6, dtype=dt, rngs=rngs)
    return nnx.LayerNorm(cfg.n_embd, epsilon=1e-5, use_bias=cfg.bias, dtype=dt, rngs=rngs)


def _split(key: jax.Array | None, n: int):
    return [None] * n if key is None else list(jax.random.split(key, n))


def causal_attention(q, k, v, *, q_pos=None, k_pos=None, dropout_rate: float = 0.0, dropout_key=None):
    """softmax(q kᵀ / sqrt(hs) + causal mask) v, with scores and softmax in float32.

    q: (B, T, H, hs); k, v: (B, S, H, hs) -> (B, T, H, hs). Query t may attend to key s when
    k_pos[s] <= q_pos[t]; positions default to 0..T-1 and 0..S-1 (plain causal self-attention).
    With a KV cache, q_pos are the new tokens' positions and S is the cache length.
    """
    T, S, hs = q.shape[1], k.shape[1], q.shape[-1]
    q_pos = jnp.arange(T) if q_pos is None else q_pos
    k_pos = jnp.arange(S) if k_pos is None else k_pos
    att = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=F32) / math.sqrt(hs)  # (B, H, T, S)
    # an additive mask: its backward pass is the identity, unlike a select's
    att = att + jnp.where(k_pos[None, :] <= q_pos[:, None], 0.0, -jnp.inf).astype(F32)
    att = jax.nn.softmax(att, axis=-1)
    att = dropout(att, dropout_rate, dropout_key)
    return jnp.einsum("bhts,bshd->bthd", att.astype(v.dtype), v)  # (B, T, H, hs)


def cached_attention(q, k, v, pos):
    """Attention of new tokens over a KV cache, all in the (B, H, ., hs) layout.

    q: (B, H, T, hs), the tokens at positions pos..pos+T-1; k, v: (B, H, S, hs), the cache, whose
    slot s holds position s. Query t attends to slots s <= pos + t; later slots (empty or stale)
    are masked. In this layout XLA needs no transpose of the cache for either matmul, which on
    CPU makes a decode step's attention ~7x faster than in the (B, S, H, hs) training layout."""
    S, hs = k.shape[2], q.shape[-1]
    att = jnp.einsum("bhtd,bhsd->bhts", q, k, preferred_element_type=F32) / math.sqrt(hs)  # (B, H, T, S)
    q_pos = pos + jnp.arange(q.shape[2])
    att = jnp.where(jnp.arange(S)[None, :] <= q_pos[:, None], att, -jnp.inf)
    att = jax.nn.softmax(att, axis=-1)
    return jnp.einsum("bhts,bhsd->bhtd", att.astype(v.dtype), v)  # (B, H, T, hs)


def attention(q, k, v, impl: str = "explicit", *, dropout_rate: float = 0.0, dropout_key=None):
    """Causal self-attention (B, T, H, hs) -> (B, T, H, hs) by the chosen implementation.

    'xla' and 'cudnn' go through jax.nn.dot_product_attention (cudnn: flash attention on NVIDIA
    GPUs); 'splash' is Pallas splash attention, TPU flash attention (splash_attention), for
    sequence lengths it tiles (a multiple of 128), else XLA's. None has attention-weight dropout,
    so training with dropout > 0 takes the explicit path, which is also the fastest on CPU
    (measured: its backward is 1.5x faster there).
    """
    if impl == "explicit" or (dropout_key is not None and dropout_rate > 0):
        return causal_attention(q, k, v, dropout_rate=dropout_rate, dropout_key=dropout_key)
    if impl == "splash":
        if splash_fits(q.shape[1]):
            return splash_attention(q, k, v)
        impl = "xla"
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl).astype(v.dtype)


SPLASH_BLOCKS = (512, 256, 128)  # splash tiles: the largest that divides T is used (lanes: multiples of 128)
# Pallas interpret mode: splash runs as ordinary XLA operations on any backend, slowly (the tests
# compare it with XLA attention on a CPU). Never set in a run: off a TPU pick_attention refuses splash.
SPLASH_INTERPRET = False


def splash_fits(T: int) -> bool:
    """Whether splash attention tiles a causal self-attention over T tokens."""
    return T % SPLASH_BLOCKS[-1] == 0


@functools.lru_cache(maxsize=None)
def _splash_kernel(H: int, T: int, blocks: tuple[int, ...], interpret: bool):
    """A splash kernel for H heads of causal self-attention over T tokens, one sequence:
    q, k, v (H, T, hs) -> (H, T, hs). The causal mask is static, so fully masked tiles
    (above the diagonal) are skipped, forward and backward."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b = next(b for b in blocks if T % b == 0)
    blocks = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                           block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = sm.MultiHeadMask([sm.CausalMask((T, T)) for _ in range(H)])
    with jax.ensure_compile_time_eval():  # its mask tables are constants, not values of the trace that asks
        return sk.make_splash_mha_single_device(mask, block_sizes=blocks, interpret=interpret)


def splash_attention(q, k, v):
    """Causal self-attention (B, T, H, hs) -> (B, T, H, hs) by Pallas splash attention (TPU flash
    attention: scores and softmax in float32 inside the kernel, never (T, T) in memory). The kernel
    takes one sequence with heads first and unscaled scores, so q is scaled by 1/sqrt(hs) here and
    the batch is vmapped."""
    B, T, H, hs = q.shape
    kernel = jax.vmap(_splash_kernel(H, T, SPLASH_BLOCKS, SPLASH_INTERPRET))
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        # XLA cannot partition a Mosaic kernel: on several devices each runs it on its own rows of
        # the batch, which is split over every mesh axis (parallel.batch_sharding). The mesh is the
        # one the train and eval steps trace under (jaxgpt.step.tracing_mesh).
        spec = P(mesh.axis_names)
        kernel = jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    q = q * jnp.asarray(1.0 / math.sqrt(hs), q.dtype)
    qt, kt, vt = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, H, T, hs)
    return kernel(qt, kt, vt).transpose(0, 2, 1, 3).astype(v.dtype)  # (B, T, H, hs)


CUDNN_DTYPES = ("bfloat16", "float16")
SPLASH_HEAD_MULTIPLE = 128  # auto picks splash on TPUs for head sizes of this multiple (its tests: 128, 256)
CUDNN_MAX_HEAD_SIZE = 256  # cuDNN flash attention: head size a multiple of 8, <= 256 (<= 128 before Hopper)

_PROBED: dict = {}  # (probe, dtype, head size) -> None if cuDNN works, else why not


def _cudnn_limit(dtype: str, head_size: int) -> str | None:
    """Why cuDNN flash attention cannot serve this dtype and head size (with what to pass
    instead), or None if it may."""
    if dtype not in CUDNN_DTYPES:
        return (f"needs dtype=bfloat16 (cuDNN flash attention has no {dtype} kernel); pass --dtype=bfloat16, "
                f"or --attn_impl=auto for XLA attention in {dtype}")
    if head_size % 8 or head_size > CUDNN_MAX_HEAD_SIZE:
        return (f"needs a head size (n_embd / n_head) that is a multiple of 8 and at most {CUDNN_MAX_HEAD_SIZE}, "
                f"got {head_size}; pass --attn_impl=auto")
    return None


def probe_cudnn(dtype: str, head_size: int) -> str | None:
    """Compiles and runs cuDNN flash attention, forward and backward, at this dtype and head size
    and compares it with XLA's; returns None when it works, else what went wrong."""
    q, k, v, w = jax.random.normal(jax.random.key(0), (4, 2, 128, 4, head_size), F32)

    def loss(q, k, v, impl):
        out = jax.nn.dot_product_attention(*(t.astype(dtype) for t in (q, k, v)), is_causal=True,
                                           implementation=impl)
        return jnp.sum(out.astype(F32) * w), out

    try:
        f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
        (_, fast), g_fast = f(q, k, v, "cudnn")
        (_, ref), g_ref = f(q, k, v, "xla")
        err = float(jnp.max(jnp.abs(fast.astype(F32) - ref.astype(F32))))
        # bf16 rounding gives ~1e-2 on these outputs and ~5e-3 (relative) on the gradients
        g_err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(g_fast, g_ref))
        if err > 2e-2 or g_err > 5e-2:
            return f"it differs from XLA's attention by {err:.3g} (gradients: {g_err:.3g} relative)"
    except Exception as e:  # noqa: BLE001 -- any failure means: use the XLA implementation
        return f"{type(e).__name__}: {str(e)[:120]}"
    return None


def pick_attention(requested: str, dtype: str, head_size: int, *, platform: str | None = None,
                   probe=probe_cudnn, log=print) -> str:
    """The attention implementation for a model computing in `dtype` with this head size.

    'auto': the explicit form on CPUs (its backward is the fastest there); on NVIDIA GPUs cuDNN
    flash attention when it can serve the dtype (bf16/fp16, never float32) and head size and a
    probe at exactly those compiles, runs and agrees with XLA's, else XLA's; on TPUs splash
    attention (Pallas) for head sizes that are a multiple of 128 (what its tests cover), else XLA's.
    An explicit 'cudnn' or 'splash' off its device, or a 'cudnn' that cannot serve them, is a
    UserError saying what to pass instead. `platform` defaults to the current devices' ('cpu',
    'gpu', 'tpu'); the probe runs once per dtype and head size."""
    platform = platform or jax.devices()[0].platform
    if requested == "cudnn":
        why = (f"needs an NVIDIA GPU, but this run is on {platform}; pass --attn_impl=auto"
               if platform != "gpu" else _cudnn_limit(dtype, head_size))
        if why is not None:
            raise UserError(f"attn_impl=cudnn {why}")
        return "cudnn"
    if requested == "splash" and platform != "tpu":
        raise UserError(f"attn_impl=splash needs a TPU (it is a TPU kernel), but this run is on {platform}; "
                        f"pass --attn_impl=auto")
    if requested != "auto":
        return requested
    if platform == "cpu":
        return "explicit"
    if platform == "tpu":
        return "splash" if head_size % SPLASH_HEAD_MULTIPLE == 0 else "xla"
    if platform != "gpu" or _cudnn_limit(dtype, head_size) is not None:
        return "xla"
    key = (probe, dtype, head_size)
    if key not in _PROBED:
        _PROBED[key] = probe(dtype, head_size)
        if _PROBED[key] is not None:
            log(f"note: cuDNN flash attention unavailable ({_PROBED[key]}); using XLA attention")
    return "xla" if _PROBED[key] is not None else "cudnn"


def with_attention(cfg: "ModelConfig", requested: str = "auto", log=print, *, platform: str | None = None,
                   probe=probe_cudnn) -> "ModelConfig":
    """cfg with the attention implementation that serves its dtype and head size on these devices
    (a checkpoint records where it was trained; what runs here is chosen here), or on `platform`
    ('cpu', 'gpu', 'tpu'; see pick_attention)."""
    if cfg.model_type != "gpt":  # the bigram has no attention
        return dataclasses.replace(cfg, attn_impl="explicit")
    impl = pick_attention(requested, cfg.dtype, cfg.n_embd // cfg.n_head, platform=platform, probe=probe, log=log)
    return dataclasses.replace(cfg, attn_impl=impl)


def model_config(cfg: Config, vocab_size: int, log=print, *, platform: str | None = None,
                 probe=probe_cudnn) -> ModelConfig:
    """The one place a training Config becomes a ModelConfig: the model a config trains from
    scratch (every ModelKeys key as the config says), in the dtype and attention that serve it here
    (or on `platform`, see with_attention)."""
    return with_attention(ModelConfig(**model_keys(cfg), vocab_size=vocab_size, dtype=resolve_dtype(cfg.dtype, platform)),
                          cfg.attn_impl, log, platform=platform, probe=probe)


def model_keys(cfg) -> dict[str, Any]:
    """The values of the keys that shape a model (config.ModelKeys), from a Config or a ModelConfig."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelKeys)}


# the ModelConfig fields a training Config sets by the same name (the modern options)
MODERN_KEYS = ("pos_emb", "norm", "qk_norm", "mlp", "untied_head", "logit_softcap", "zero_init_proj")


def _proj_init(cfg: ModelConfig):
    """Init of the residual output projections: zero (zero_init_proj), else GPT-2's scaled normal."""
    return nnx.initializers.zeros if cfg.zero_init_proj else nnx.initializers.normal(0.02 / math.sqrt(2 * cfg.n_layer))


class CausalSelfAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.c_attn = linear(cfg, "attn.c_attn", cfg.n_embd, 3 * cfg.n_embd, init, rngs)
        self.c_proj = linear(cfg, "attn.c_proj", cfg.n_embd, cfg.n_embd, _proj_init(cfg), rngs)
        self.n_head = cfg.n_head
        self.rope, self.qk_norm = cfg.pos_emb == "rope", cfg.qk_norm
        self.dropout = cfg.dropout
        self.attn_impl = cfg.attn_impl

    def __call__(self, x, dropout_key=None, cache=None, pos=None):
        """x (B, T, C) -> (y (B, T, C), cache). With `cache` = (k, v), each (B, H, S, hs), the new
        tokens sit at positions pos..pos+T-1: their keys and values are written into the cache,
        they attend over it, and the updated cache is returned; without one, cache stays None."""
        B, T, C = x.shape
        H = self.n_head
        k_att, k_res = _split(dropout_key, 2)
        q, k, v = jnp.split(self.c_attn(x, dropout_key), 3, axis=-1)  # (B, T, 3C) -> 3 x (B, T, C)
        q, k, v = (t.reshape(B, T, H, C // H) for t in (q, k, v))  # (B, T, H, hs)
        if self.qk_norm:
            q, k = rms_norm(q), rms_norm(k)
        if self.rope:  # absolute positions: 0..T-1 in training, pos..pos+T-1 in the cache
            t_pos = jnp.arange(T) if pos is None else pos + jnp.arange(T)
            q, k = rope(q, t_pos), rope(k, t_pos)  # the cache holds rotated keys
        if cache is None:
            y = attention(q, k, v, self.attn_impl, dropout_rate=self.dropout, dropout_key=k_att)
        else:  # the cache is (B, H, S, hs): both attention matmuls then read it without a transpose
            q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, H, T, hs)
            k_cache = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, 0, pos, 0))
            v_cache = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, 0, pos, 0))
            cache = (k_cache, v_cache)
            y = cached_attention(q, k_cache, v_cache, pos).transpose(0, 2, 1, 3)  # (B, H, T, hs) -> (B, T, H, hs)
        y = dropout(self.c_proj(y.reshape(B, T, C), dropout_key), self.dropout, k_res)  # (B, T, H, hs) -> (B, T, C)
        return y, cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        width = mlp_width(cfg)
        n_in = 2 * width if cfg.mlp == "swiglu" else width  # SwiGLU: gate and value side by side
        self.c_fc = linear(cfg, "mlp.c_fc", cfg.n_embd, n_in, nnx.initializers.normal(0.02), rngs)
        self.c_proj = linear(cfg, "mlp.c_proj", width, cfg.n_embd, _proj_init(cfg), rngs)
        self.dropout = cfg.dropout
        self.gelu, self.kind = cfg.gelu, cfg.mlp

    def __call__(self, x, dropout_key=None):
        h = self.c_fc(x, dropout_key)  # (B, T, 4C), SwiGLU (B, T, 2W)
        if self.kind == "relu2":
            h = jnp.square(jax.nn.relu(h))
        elif self.kind == "swiglu":
            gate, val = jnp.split(h, 2, axis=-1)
            h = jax.nn.silu(gate) * val  # (B, T, W)
        else:
            h = gelu(h, self.gelu)
        return dropout(self.c_proj(h, dropout_key), self.dropout, dropout_key)


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.ln_1 = norm_layer(cfg, rngs)
        self.attn = CausalSelfAttention(cfg, rngs=rngs)
        self.ln_2 = norm_layer(cfg, rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, dropout_key=None, cache=None, pos=None):
        """x (B, T, C) -> (x (B, T, C), cache), as CausalSelfAttention."""
        k_attn, k_mlp = _split(dropout_key, 2)
        y, cache = self.attn(self.ln_1(x), k_attn, cache, pos)
        x = x + y
        x = x + self.mlp(self.ln_2(x), k_mlp)
        return x, cache


# Activation checkpointing (remat) of the blocks in the train step: the backward pass recomputes
# what the forward pass did not keep. 'block': only each block's input (B, T, C) is kept, the
# whole block is recomputed (the least memory, ~1/3 more compute); 'dots': the outputs of the
# Linear layers' matmuls (no batch dims) are kept too, attention and elementwise ops are recomputed.
# Values are functions so jax.checkpoint_policies is read when used.
REMAT_POLICIES = {
    "block": lambda: jax.checkpoint_policies.nothing_saveable,
    "dots": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_OFF = ("", "none")


def _remat_blocks(blocks, x, keys, policy):
    """x (B, T, C) through the blocks with activation checkpointing, as one jax.lax.scan over the
    blocks' parameters stacked along a new leading axis (L, ...), its body under jax.checkpoint.

    A scan, not a Python loop of checkpointed blocks: XLA's CPU compiler drops the optimization
    barriers that keep a checkpointed block's recomputation apart from its forward pass, merges the
    two again (CSE) and the step keeps every activation (measured: the same temporaries as without
    remat); across the iterations of a loop nothing can be merged, on any backend. The stacked copy
    of the blocks' parameters (and of its gradient) is the price: small beside the activations."""
    graphdef, _ = nnx.split(blocks[0])
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.split(b)[1] for b in blocks])  # (L, ...) leaves
    stacked_keys = None if keys[0] is None else jnp.stack(keys)  # (L,) dropout keys, or None

    @functools.partial(jax.checkpoint, policy=policy, prevent_cse=False)  # a loop body needs no CSE guard
    def body(x, layer):
        state, key = layer
        return nnx.merge(graphdef, state)(x, key)[0], None

    x, _ = jax.lax.scan(body, x, (stacked, stacked_keys))
    return x


class GPT(nnx.Module):
    """GPT-2-style decoder. Init recipe: every weight normal(0.02), the residual output
    projections (attn.c_proj, mlp.c_proj) normal(0.02 / sqrt(2 * n_layer)), biases zero,
    LayerNorm scale one; the output head is the token embedding (tied). The modern options
    (ModelConfig) change this: rope drops wpe, untied_head adds lm_head (C, V), zero_init_proj
    starts the projections at zero."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        init = nnx.initializers.normal(0.02)
        self.wte = nnx.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=init, rngs=rngs)
        if cfg.pos_emb == "learned":
            self.wpe = nnx.Embed(cfg.block_size, cfg.n_embd, embedding_init=init, rngs=rngs)
        self.h = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
        self.ln_f = norm_layer(cfg, rngs)
        if cfg.untied_head:
            self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, use_bias=False, dtype=jnp.dtype(cfg.dtype),
                                  kernel_init=init, rngs=rngs)

    def embed(self, idx, pos):
        """Token ids (B, T) at positions pos + 0..T-1 -> (B, T, C) in the compute dtype."""
        x = self.wte(idx)
        if self.config.pos_emb == "learned":
            x = x + self.wpe(pos + jnp.arange(idx.shape[1]))
        return x.astype(self.config.dtype)

    def __call__(self, idx, dropout_key=None, remat: str = ""):
        """Token ids (B, T) -> logits (B, T, V)."""
        return self.head(self.hidden(idx, dropout_key, remat))

    def hidden(self, idx, dropout_key=None, remat: str = ""):
        """Token ids (B, T) -> the final hidden states ln_f(x) (B, T, C) that the head reads. remat
        (a key of REMAT_POLICIES, '' = none): activation checkpointing of the blocks, for the train step."""
        cfg = self.config
        keys = _split(dropout_key, cfg.n_layer + 1)
        x = dropout(self.embed(idx, 0), cfg.dropout, keys[0])  # (B, T, C)
        if remat in REMAT_OFF:
            for block, k in zip(self.h, keys[1:]):
                x, _ = block(x, k)
        else:
            x = _remat_blocks(self.h, x, keys[1:], REMAT_POLICIES[remat]())
        return self.ln_f(x)

    def loss(self, idx, targets, dropout_key=None, chunk: int | None = None, remat: str = "", masked: bool = False):
        """Training and evaluation: mean next-token cross-entropy of token ids (B, T) against
        targets (B, T), float32. Large logits are never held whole: jaxgpt.head computes the head
        and the loss in chunks of `chunk` positions (default: its rule, by the logits' size).
        masked (chat data): targets < 0 are left out and the mean is over the rest."""
        w, tied = self._head_weight()
        return head_loss(self.hidden(idx, dropout_key, remat), w, targets, tied=tied,
                         softcap=self.config.logit_softcap, tc=chunk, masked=masked)

    def token_logprobs(self, idx, targets, vocab: int | None = None):
        """Evaluation: log p(targets) (B, T) float32 given token ids idx (B, T), the log-softmax over
        the first `vocab` logits (the tokenizer's vocabulary; None = all), computed in chunks of the
        sequence as the loss is (jaxgpt.head.target_logprobs)."""
        w, tied = self._head_weight()
        return target_logprobs(self.hidden(idx), w, targets, tied=tied, softcap=self.config.logit_softcap, vocab=vocab)

    def _head_weight(self):
        """(the output head's float32 weight, tied): wte's (V, C), or lm_head's kernel (C, V)."""
        if self.config.untied_head:
            return self.lm_head.kernel[...], False
        return self.wte.embedding[...], True

    def init_cache(self, batch_size: int, length: int):
        """An empty KV cache: per layer (k, v), each (B, H, S, hs) in the compute dtype."""
        cfg = self.config
        shape = (batch_size, cfg.n_head, length, cfg.n_embd // cfg.n_head)
        return tuple((jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)) for _ in range(cfg.n_layer))

    def decode(self, idx, cache, pos, last=None):
        """Cached forward: tokens (B, T) at positions pos..pos+T-1 attend to the cache and to
        each other. Returns (logits, cache); with `last` (an index into T) only the logits at
        that position, (B, V), are computed."""
        x = self.embed(idx, pos)  # (B, T, C)
        new_cache = []
        for block, layer_cache in zip(self.h, cache):
            x, layer_cache = block(x, cache=layer_cache, pos=pos)
            new_cache.append(layer_cache)
        if last is not None:
            x = jax.lax.dynamic_index_in_dim(x, last, axis=1)  # (B, 1, C)
        logits = self.head(self.ln_f(x))
        return (logits if last is None else logits[:, 0]), tuple(new_cache)

    def head(self, x):
        """Output head (tied: wte; untied: lm_head): logits (B, T, V) accumulated and returned in
        float32, soft-capped there when logit_softcap > 0."""
        lead = x.shape[:-1]
        w, tied = self._head_weight()
        logits = logits_of(x.reshape(-1, x.shape[-1]), w, tied, self.config.logit_softcap)  # (B*T, V)
        return logits.reshape(*lead, -1)  # (B*T, V) -> (B, T, V)


class Bigram(nnx.Module):
    """The lecture's first model: row `i` of a V x V table is the logits of the token after `i`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.wte = nnx.Embed(cfg.vocab_size, cfg.vocab_size,
                             embedding_init=nnx.initializers.normal(0.02), rngs=rngs)

    def __call__(self, idx, dropout_key=None, remat: str = ""):
        return self.wte(idx).astype(F32)  # (B, T) -> (B, T, V); no blocks, nothing to checkpoint

    def loss(self, idx, targets, dropout_key=None, chunk: int | None = None, remat: str = "", masked: bool = False):
        """Mean next-token cross-entropy, float32 (the table is the logits: nothing to chunk)."""
        if masked:
            return masked_mean(self(idx).reshape(-1, self.config.vocab_size), targets.reshape(-1))
        return optax.softmax_cross_entropy_with_integer_labels(self(idx), targets).mean()

    def token_logprobs(self, idx, targets, vocab: int | None = None):
        """log p(targets) (B, T) float32, over the first `vocab` logits (None = all)."""
        lp = jax.nn.log_softmax(self(idx)[..., :vocab], axis=-1)  # (B, T, V)
        return jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]

    def init_cache(self, batch_size: int, length: int):
        return ()  # the next token depends on the current one only

    def decode(self, idx, cache, pos, last=None):
        logits = self(idx)
        return (logits if last is None else jax.lax.dynamic_index_in_dim(logits, last, 1, keepdims=False)), cache


def build_model(cfg: ModelConfig, seed: int | jax.Array = 0):
    rngs = nnx.Rngs(params=seed)
    return {"gpt": GPT, "bigram": Bigram}[cfg.model_type](cfg, rngs=rngs)


def abstract_model(cfg: ModelConfig):
    """(graphdef, parameter shapes) of a model, allocating nothing: nnx.merge(graphdef, params) is
    then the model for any parameters of those shapes (loaded, merged, restored)."""
    return nnx.split(nnx.eval_shape(lambda: build_model(cfg)), nnx.Param)


def num_params(params) -> int:
    return count(params)  # a quantized kernel counts as its weights
