"""The chunked loss head (jaxgpt.head): the same loss and gradients as the cross-entropy of the
full logits, without holding them (the compiled step's temporary memory shrinks by more than the
logits' size), and the rule that keeps small logits on the plain path."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt import head as head_lib
from jaxgpt import step as step_lib
from jaxgpt.config import Config
from jaxgpt.model import ModelConfig, build_model
from jaxgpt.step import cross_entropy

CFG = ModelConfig(vocab_size=97, block_size=24, n_layer=1, n_head=2, n_embd=16)


def loss_and_grads(model, x, y, chunk):
    """(loss, gradients of every parameter): the full logits' cross-entropy (chunk=None) or the
    model's loss with `chunk` positions per chunk."""
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
        m = nnx.merge(graphdef, params)
        return cross_entropy(m(x), y) if chunk is None else m.loss(x, y, chunk=chunk)

    return jax.jit(jax.value_and_grad(loss))(params)


# chunk 8 divides T=24; 5 pads it to 25 (the last chunk part padding); 1 is one position a chunk
@pytest.mark.parametrize("options, chunk", [({}, 8), ({}, 5), ({"untied_head": True}, 1), ({"logit_softcap": 3.0}, 5),
                                            ({"untied_head": True, "logit_softcap": 3.0, "bias": True}, 8)])
@pytest.mark.slow
def test_chunked_head_gives_the_full_heads_loss_and_gradients(options, chunk, exact_f32):
    model = build_model(dataclasses.replace(CFG, **options), 0)
    idx = jax.random.randint(jax.random.key(1), (3, 25), 0, CFG.vocab_size)
    x, y = idx[:, :-1], idx[:, 1:]
    (l_ref, g_ref), (l, g) = loss_and_grads(model, x, y, None), loss_and_grads(model, x, y, chunk)
    # float32 throughout; only the order of the sums differs (dw is summed chunk by chunk)
    np.testing.assert_allclose(l, l_ref, rtol=1e-6)
    for path, a in jax.tree_util.tree_leaves_with_path(g):
        b = dict(jax.tree_util.tree_leaves_with_path(g_ref))[path]
        np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
    # without a gradient (evaluation) the loop computes the loss alone: the same value
    graphdef, params = nnx.split(model, nnx.Param)
    np.testing.assert_allclose(jax.jit(lambda p: nnx.merge(graphdef, p).loss(x, y, chunk=chunk))(params), l_ref,
                               rtol=1e-6)


@pytest.mark.slow
def test_chunked_head_in_bfloat16_matches_within_bfloat16_rounding():
    model = build_model(dataclasses.replace(CFG, dtype="bfloat16"), 0)
    idx = jax.random.randint(jax.random.key(2), (3, 25), 0, CFG.vocab_size)
    (l_ref, g_ref), (l, g) = (loss_and_grads(model, idx[:, :-1], idx[:, 1:], c) for c in (None, 5))
    np.testing.assert_allclose(l, l_ref, rtol=1e-3)  # the same bf16 matmul inputs; float32 loss
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=2e-3, rtol=5e-2)  # dlogits rounded to bf16 for the matmuls


def test_the_rule_chunks_large_logits_only():
    assert head_lib.chunk_len(12, 64, 65) == 64  # the laptop recipe: 200 KB of logits, one matmul
    assert head_lib.chunk_len(64, 256, 65) == 256  # the GPU char recipe: 4 MB
    for B, T, V in [(12, 1024, 50304), (1, 1024, 50257), (4, 256, 50257), (512, 1024, 50304)]:
        tc = head_lib.chunk_len(B, T, V)
        assert 1 <= tc < T and (B * tc * V * 4 <= head_lib.CHUNK_BYTES or tc == 1)
    assert head_lib.chunk_len(12, 1024, 50304) == 16  # 27 fit; 16 divides 1024 (no padding)


@pytest.mark.slow
def test_bigram_loss_is_the_cross_entropy_of_its_table():
    model = build_model(ModelConfig(model_type="bigram", vocab_size=11), 0)
    idx = jax.random.randint(jax.random.key(3), (2, 9), 0, 11)
    np.testing.assert_allclose(model.loss(idx[:, :-1], idx[:, 1:]), cross_entropy(model(idx[:, :-1]), idx[:, 1:]),
                               rtol=1e-6)


@pytest.mark.slow
def test_train_step_with_lora_and_dropout_is_the_same_with_a_chunked_head(monkeypatch, exact_f32):
    """A whole train step (LoRA adapters, dropout, two micro-batches) with the head chunked (a tiny
    CHUNK_BYTES) gives the state of the step with the full logits."""
    mcfg = dataclasses.replace(CFG, dropout=0.1, lora_rank=2)
    cfg = Config(finetune_method="lora", gradient_accumulation_steps=2, batch_size=2, block_size=24,
                 learning_rate=1e-2, warmup_iters=0)
    idx = jax.random.randint(jax.random.key(4), (2, 2, 25), 0, CFG.vocab_size)
    batch = (idx[..., :-1], idx[..., 1:])

    def step():
        graphdef, state, opt = step_lib.init_state(mcfg, cfg, jax.random.key(0))
        assert state.frozen  # the base is frozen: only the adapters train
        return make(graphdef, opt)(state, batch, jax.random.key(5))

    make = lambda g, o: step_lib.make_train_step(g, o, cfg)  # noqa: E731
    full_state, full_metrics = step()
    monkeypatch.setattr(head_lib, "CHUNK_BYTES", 2 * 24 * CFG.vocab_size * 4 // 3)  # 8 positions per chunk
    assert head_lib.chunk_len(2, 24, CFG.vocab_size) == 8
    state, metrics = step()
    np.testing.assert_allclose(metrics["loss"], full_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], full_metrics["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(full_state.params)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_the_chunked_head_never_holds_the_logits(exact_f32):
    """XLA's memory analysis of the compiled loss-and-gradient: the chunked head's temporary memory
    is smaller than the full head's by more than the float32 logits (B, T, V)."""
    B, T, C, V = 4, 256, 32, 4096  # 16 MiB of logits
    x = jax.ShapeDtypeStruct((B, T, C), jnp.float32)
    w = jax.ShapeDtypeStruct((V, C), jnp.float32)
    y = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def temp(tc):
        f = jax.grad(lambda x, w, y: head_lib.head_loss(x, w, y, tied=True, tc=tc), argnums=(0, 1))
        return jax.jit(f).lower(x, w, y).compile().memory_analysis().temp_size_in_bytes

    full, chunked = temp(T), temp(16)
    assert full - chunked >= B * T * V * 4, (full, chunked)


SHARDED = r"""
import json, sys
import jax, numpy as np
from jaxgpt import parallel, head as head_lib
from jaxgpt.config import Config
from jaxgpt.model import ModelConfig
from jaxgpt.step import abstract_state, init_state, make_train_step
mcfg = ModelConfig(vocab_size=97, block_size=24, n_layer=1, n_head=2, n_embd=16, untied_head=True)
out = {}
for sharding in ("dp", "fsdp"):
    for budget in (64 << 20, 100):  # the full logits; one position a chunk
        head_lib.CHUNK_BYTES = budget
        cfg = Config(batch_size=4, block_size=24, sharding=sharding, learning_rate=1e-2, warmup_iters=0)
        mesh = parallel.make_mesh(cfg.sharding, cfg.mesh_shape)
        graphdef, abstract, opt = abstract_state(mcfg, cfg)
        sh = parallel.state_shardings(abstract, mesh)
        state = jax.jit(lambda k: init_state(mcfg, cfg, k)[1], out_shardings=sh)(jax.random.key(0))
        step = make_train_step(graphdef, opt, cfg, sh, parallel.batch_sharding(mesh, 3), parallel.replicated(mesh))
        idx = jax.random.randint(jax.random.key(1), (1, 4, 25), 0, 97)
        batch = jax.device_put((idx[..., :-1], idx[..., 1:]), parallel.batch_sharding(mesh, 3))
        state, m = step(state, batch, jax.random.key(2))
        out[f"{sharding}-{budget}"] = {"loss": float(m["loss"]), "params": [np.asarray(p).tolist() for p in
                                                                           jax.tree.leaves(state.params)]}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_chunked_head_under_data_parallel_and_fsdp_shardings():
    """On a CPU split into 2 devices, a train step with the head chunked gives the full head's
    result with the batch sharded (dp) and with the parameters sharded (fsdp)."""
    import json
    import subprocess
    import sys

    from conftest import ROOT, subprocess_env

    r = subprocess.run([sys.executable, "-c", SHARDED], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=subprocess_env(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    ref = out["dp-67108864"]
    for name, res in out.items():
        np.testing.assert_allclose(res["loss"], ref["loss"], rtol=1e-6, err_msg=name)
        for a, b in zip(res["params"], ref["params"]):
            np.testing.assert_allclose(a, b, atol=1e-6, err_msg=name)  # float32; measured <= 2e-7
