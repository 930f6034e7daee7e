"""QLoRA: LoRA adapters over a frozen base whose Linear kernels are quantized (nf4 | int8) as it
loads. One step equals the LoRA step on the dequantized base; only the adapters train; the base
on the devices is packed; loading streams one float layer at a time; a run resumes exactly,
samples and exports (merged into the dequantized base)."""

import dataclasses
import json
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import export as export_script
import sample as sample_script
import torch
import transformers

from conftest import tiny_args
from helpers import BASE, SEP, evaluations, leaves_equal, pure, restore_params
from jaxgpt import lora, parallel, pretrained
from jaxgpt.config import parse_args
from jaxgpt.errors import UserError
from jaxgpt.model import build_model
from jaxgpt.quant import QTensor, dequantize, quantize_tree
from jaxgpt.loading import base_params, load as load_model
from jaxgpt.sampling import Engine
from jaxgpt.step import init_state, make_train_step
from jaxgpt.trainer import train

# C = 64: every kernel's C_in (64, or 256 for mlp.c_proj) is a whole number of NF4 blocks of 64
BASE64 = dataclasses.replace(BASE, n_embd=64)
LORA64 = dataclasses.replace(BASE64, lora_rank=4, lora_alpha=8.0)
is_q = lambda t: isinstance(t, QTensor)  # noqa: E731


def run_steps(model_cfg, frozen, steps=2):
    """`steps` train steps of model_cfg's adapters (the same initial adapters for any base_quant:
    the model is built with the same key) on the frozen tree given; returns (state, losses)."""
    cfg = parse_args(["--learning_rate=1e-2", "--warmup_iters=0", "--dropout=0.0"])
    graphdef, state, opt = init_state(model_cfg, cfg, jax.random.key(2))
    assert jax.tree.structure(state.frozen, is_leaf=is_q) == jax.tree.structure(frozen, is_leaf=is_q)
    state = state.replace(frozen=jax.tree.map(jnp.copy, frozen))  # the step donates the state
    step = make_train_step(graphdef, opt, cfg)
    x = jax.random.randint(jax.random.key(3), (1, 4, 16), 0, 23)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, (x, jnp.roll(x, -1, -1)), jax.random.key(4))
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.mark.slow  # over 10 s: LoRA and QLoRA steps compiled and compared
@pytest.mark.usefixtures("exact_f32")
def test_a_qlora_step_is_the_lora_step_on_the_dequantized_base_and_trains_only_the_adapters():
    """Two steps over the NF4 base (qdense decoding inside the jitted step) against the same
    steps of plain LoRA over a float32 base that is the dequantized one: the same function, so the
    same losses and adapters up to float32 rounding (matmuls ordered differently): 1e-6 relative.
    (int8 goes through the same qdense; its decode is tested in test_quant.py.)"""
    kind = "nf4"
    base = pure(build_model(BASE64, seed=1))
    qbase = quantize_tree(base, lora.quantizable, kind)
    deq = jax.tree.map(lambda t: dequantize(t) if is_q(t) else t, qbase, is_leaf=is_q)
    q_state, q_losses = run_steps(dataclasses.replace(LORA64, base_quant=kind), qbase)
    f_state, f_losses = run_steps(LORA64, deq)
    np.testing.assert_allclose(q_losses, f_losses, rtol=1e-6)
    assert q_losses[1] < q_losses[0]  # it trains
    for a, b in zip(jax.tree.leaves(q_state.params), jax.tree.leaves(f_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # the quantized base itself is unchanged, bit for bit, and still packed
    assert leaves_equal(q_state.frozen, qbase)
    state = q_state
    # the trained tree is the adapters alone, and AdamW's moments are theirs only
    assert not lora.split(state.params)[1]
    n_adapters = lora.count(state.params)
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0) == 2 * n_adapters
    # every block kernel is an NF4 QTensor of uint8 codes: 4.5 bits per weight, scales included
    kernels = [t for t in jax.tree.leaves(state.frozen, is_leaf=is_q) if is_q(t)]
    assert len(kernels) == 8 and all(t.kind == "nf4" for t in kernels)
    assert all(isinstance(t.codes, jax.Array) and t.codes.dtype == jnp.uint8 for t in kernels)
    n_kernel = sum(np.prod(t.shape) for t in kernels)
    assert n_kernel == 2 * (64 * 192 + 64 * 64 + 2 * 64 * 256)
    assert parallel.tree_bytes(kernels) * 8 == 4.5 * n_kernel
    # what stays float32: the embeddings, norms and biases, and nothing else
    floats = [x for x in jax.tree.leaves(state.frozen) if x.dtype == jnp.float32]
    assert sum(x.size for x in floats) == lora.count(state.frozen) - n_kernel + sum(t.scale.size for t in kernels)


class SpyTable(pretrained.LazyTensors):
    """A LazyTensors that checks, at each read, that no float block kernel read before is still
    alive anywhere (weak references to each array it handed out)."""

    def __init__(self, inner):
        self.__dict__.update(inner.__dict__)
        self.handed, self.reads = [], 0

    def __getitem__(self, name):
        alive = [n for n, ref in self.handed if ref() is not None]
        assert not alive, f"reading {name} while {alive} are still in memory"
        x = super().__getitem__(name)
        self.reads += 1
        if name.endswith(pretrained.LINEARS):
            self.handed.append((name, weakref.ref(x)))
        return x


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_the_base_is_quantized_as_it_streams_one_float_layer_at_a_time(tiny_gpt2_dir, kind):
    w = pretrained.load_weights(str(tiny_gpt2_dir), lazy=True)
    assert isinstance(w.tensors, pretrained.LazyTensors)
    spy = SpyTable(w.tensors)
    params, digest = base_params(dataclasses.replace(w, tensors=spy), 64, kind)
    assert spy.reads == len(spy) and len(spy.handed) == 8  # each tensor read once, 8 block kernels
    float_params = pretrained.to_params(pretrained.load_weights(str(tiny_gpt2_dir)), 64)
    assert digest == lora.fingerprint(float_params)  # the float base's digest, as for LoRA
    for i in range(2):
        q = params["h"][i]["mlp"]["c_fc"]["kernel"]
        assert is_q(q) and q.kind == kind and q.shape == (32, 128)
        np.testing.assert_array_equal(np.asarray(dequantize(q)),
                                      np.asarray(dequantize(quantize_tree(float_params, lora.quantizable, kind)
                                                            ["h"][i]["mlp"]["c_fc"]["kernel"])))
    np.testing.assert_array_equal(params["wte"]["embedding"], float_params["wte"]["embedding"])


def qlora_args(tmp_path, hf_dir, corpus_file, **overrides):
    kw = dict(init_from=str(hf_dir), tokenizer="gpt2", finetune_method="qlora", lora_rank=4, lora_alpha=8.0,
              learning_rate=1e-2, decay_lr=False, eval_iters=1, max_iters=4, eval_interval=2, dtype="float32")
    kw.update(overrides)
    return parse_args(tiny_args(tmp_path, corpus_file, **kw))


@pytest.mark.slow  # over 10 s: a QLoRA run, resumed, sampled, exported
@pytest.mark.usefixtures("exact_f32")  # logits against transformers' at 1e-4
def test_qlora_run_resumes_exactly_samples_and_exports(tmp_path, tiny_gpt2_dir, corpus_file, capsys):
    full = train(qlora_args(tmp_path, tiny_gpt2_dir, corpus_file, out_dir=str(tmp_path / "full")), log=lambda s: None)
    assert full["n_trainable"] < 0.2 * full["n_params"]
    rows = evaluations(tmp_path / "full")
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    # interrupted at 2 and resumed (the base quantized again from its source): the same run, bit for bit
    half = str(tmp_path / "half")
    train(qlora_args(tmp_path, tiny_gpt2_dir, corpus_file, out_dir=half, max_iters=2), log=lambda s: None)
    train(qlora_args(tmp_path, tiny_gpt2_dir, corpus_file, out_dir=half, init_from="resume"), log=lambda s: None)
    resumed = evaluations(tmp_path / "half")
    assert [(r["iter"], r["train_loss"], r["val_loss"]) for r in resumed] == \
        [(r["iter"], r["train_loss"], r["val_loss"]) for r in rows]

    # loading merges the adapters into the dequantized base: W = dequantize(quantize(W0)) + s A B
    graphdef, params, model_cfg, tok, meta = load_model(str(tmp_path / "full"))
    assert meta["lora_base"]["quant"] == "nf4" and model_cfg.base_quant == "" and model_cfg.lora_rank == 0
    w0 = pretrained.to_params(pretrained.load_weights(str(tiny_gpt2_dir)), 16)
    k0 = w0["h"][1]["attn"]["c_proj"]["kernel"]
    assert not lora.split(params)[0]  # merged: no adapters left
    _, trained, _, _ = restore_params(str(tmp_path / "full"))  # the checkpoint's adapters, read directly
    ab = trained["h"][1]["attn"]["c_proj"]
    expected = np.asarray(dequantize(quantize_tree({"k": {"kernel": k0}}, lora.quantizable, "nf4")["k"]["kernel"])
                          + (ab["lora_a"] @ ab["lora_b"]) * 2.0)
    np.testing.assert_allclose(np.asarray(params["h"][1]["attn"]["c_proj"]["kernel"]), expected, atol=1e-6)
    assert np.abs(expected - k0).max() > 1e-3  # quantization moved it: the float base is not what is merged

    capsys.readouterr()
    assert sample_script.main([f"--out_dir={tmp_path / 'full'}", "--start=to be", "--num_samples=2",
                               "--max_new_tokens=10"]) == 0
    # the text is the one the library's Engine draws with sample.py's seed from the checkpoint's adapters
    # on the quantized base, unmerged (qdense decoding in each step): an independent path
    lora_graphdef, adapters, lora_cfg, _ = restore_params(str(tmp_path / "full"))
    qbase = base_params(pretrained.load_weights(str(tiny_gpt2_dir), lazy=True), 16, "nf4")[0]
    result = Engine(lora_graphdef, lora.join(adapters, qbase), 16, vocab_size=tok.vocab_size).generate(
        tok.encode("to be"), max_new_tokens=10, num_samples=2, temperature=0.8, top_k=200, key=jax.random.key(1337))
    texts = [tok.decode(row) for row in result.tokens]
    assert capsys.readouterr().out == "".join(f"to be{t}\n{SEP}" for t in texts)

    hf_out, jx_out = tmp_path / "hf", tmp_path / "standalone"
    assert export_script.main([f"--out_dir={tmp_path / 'full'}", f"--hf_dir={hf_out}", f"--jaxgpt_dir={jx_out}"]) == 0
    assert "trained against a nf4-quantized base" in capsys.readouterr().out
    assert json.load(open(hf_out / "config.json"))["jaxgpt_qlora_base"] == {"quant": "nf4", "source": str(tiny_gpt2_dir)}
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_out).eval()
    x = np.asarray(tok.encode("to be or not to be"))[None]
    with torch.no_grad():
        theirs = hf(torch.tensor(x)).logits.numpy()
    np.testing.assert_allclose(theirs, np.asarray(nnx.merge(graphdef, params)(x)), atol=1e-4, rtol=0)
    _, standalone, _, _, standalone_meta = load_model(str(jx_out))
    assert standalone_meta["qlora_base"]["quant"] == "nf4" and standalone_meta["lora_base"] is None
    assert leaves_equal(standalone, params)


def test_qlora_settings_are_checked(tmp_path, corpus_file):
    with pytest.raises(UserError, match="qlora_quant"):
        parse_args(tiny_args(tmp_path, corpus_file, finetune_method="qlora", init_from="gpt2",
                             qlora_quant="nf3")).validate()
    with pytest.raises(UserError, match="finetune_method=qlora trains adapters on a base model"):
        parse_args(tiny_args(tmp_path, corpus_file, finetune_method="qlora")).validate()
    assert parse_args(tiny_args(tmp_path, corpus_file, finetune_method="lora", qlora_quant="int8")).base_quant == ""
