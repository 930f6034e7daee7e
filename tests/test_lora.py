"""LoRA: adapters start as a no-op, only they train, merging is exact, runs resume and sample."""

import dataclasses
import json
import os

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
from jaxgpt import lora
from jaxgpt.benchmark import device_peak
from jaxgpt.loading import load as load_model
from jaxgpt.config import parse_args
from jaxgpt.errors import UserError
from jaxgpt.model import build_model
from jaxgpt.sampling import Engine
from jaxgpt.step import init_state, make_eval_step, make_train_step
from jaxgpt.tokenizer import tokenizer_from_meta
from jaxgpt.trainer import train

LORA = dataclasses.replace(BASE, lora_rank=4, lora_alpha=8.0)


def forward(cfg, params, x):
    graphdef = nnx.split(build_model(cfg), nnx.Param)[0]
    return nnx.merge(graphdef, params)(x)


def lora_state(steps=1, model_cfg=LORA, **cfg_overrides):
    """A LoRA train state on a random base after `steps` steps, and the base's params."""
    cfg = parse_args([f"--{k}={v}" for k, v in dict(learning_rate=1e-2, warmup_iters=0, dropout=0.0,
                                                     **cfg_overrides).items()])
    base = pure(build_model(BASE, seed=1))
    graphdef, state, opt = init_state(model_cfg, cfg, jax.random.key(2))
    state = state.replace(frozen=jax.tree.map(jnp.copy, base))  # the step donates the state
    step = make_train_step(graphdef, opt, cfg)
    x = jax.random.randint(jax.random.key(3), (1, 4, 16), 0, 23)
    for _ in range(steps):
        state, _ = step(state, (x, jnp.roll(x, -1, -1)), jax.random.key(4))
    return state, base, x[0]


@pytest.mark.slow
def test_adapters_start_as_an_exact_no_op():
    base = pure(build_model(BASE, seed=1))
    adapters, _ = lora.split(pure(build_model(LORA, seed=2)))
    bs = [v for path, v in jax.tree_util.tree_flatten_with_path(adapters)[0] if path[-1].key == "lora_b"]
    assert len(bs) == 2 * 4 and all(np.all(np.asarray(b) == 0) for b in bs)  # 4 targets in 2 layers
    x = jax.random.randint(jax.random.key(0), (2, 16), 0, 23)
    np.testing.assert_array_equal(np.asarray(forward(LORA, lora.join(adapters, base), x)),
                                  np.asarray(forward(BASE, base, x)))


@pytest.mark.usefixtures("exact_f32")  # merged and unmerged float32 models agree to 2e-5 with exact matmuls
@pytest.mark.slow
def test_a_step_changes_only_the_adapters_and_merging_is_exact():
    state, base, x = lora_state(steps=2)
    for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(state.params["h"][0]["mlp"]["c_fc"]["lora_b"])).max() > 0
    unmerged = forward(LORA, lora.join(state.params, state.frozen), x)
    merged_params, merged_cfg = lora.merge(lora.join(state.params, state.frozen), LORA)
    assert merged_cfg.lora_rank == 0 and not lora.split(merged_params)[0]
    merged = forward(merged_cfg, merged_params, x)
    assert np.abs(np.asarray(unmerged) - np.asarray(forward(BASE, base, x))).max() > 1e-3  # it did train
    np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=2e-5)


LORA_DROPOUT = dataclasses.replace(LORA, lora_dropout=0.5)


def step_with_keys(model_cfg, keys):
    """A LoRA state trained one step (key 4), so that B != 0 and dropout on the adapters' input changes
    the loss too; then one more step from it with each dropout key in turn. The model's own dropout
    is 0. Returns [(loss, adapters after the step)]."""
    cfg = parse_args(["--learning_rate=1e-2", "--warmup_iters=0", "--dropout=0.0"])
    graphdef, state, opt = init_state(model_cfg, cfg, jax.random.key(2))
    state = state.replace(frozen=pure(build_model(BASE, seed=1)))
    step = make_train_step(graphdef, opt, cfg)
    x = jax.random.randint(jax.random.key(3), (1, 4, 16), 0, 23)
    batch = (x, jnp.roll(x, -1, -1))
    state, _ = step(state, batch, jax.random.key(4))
    out = []
    for key in keys:
        new, metrics = step(jax.tree.map(jnp.copy, state), batch, key)  # the step donates its input
        out.append((float(metrics["loss"]), new.params))
    return out


@pytest.mark.slow
def test_lora_dropout_applies_when_the_models_dropout_is_zero():
    """configs/finetune_code_lora.py trains with lora_dropout=0.05 and dropout=0: the train step's
    key must reach the adapters, so different keys drop different inputs; the same key is the same step."""
    (l1, p1), (l2, p2), (l1_again, p1_again) = step_with_keys(
        LORA_DROPOUT, [jax.random.key(10), jax.random.key(11), jax.random.key(10)])
    assert l1 != l2 and not leaves_equal(p1, p2)
    assert l1 == l1_again and leaves_equal(p1, p1_again)


@pytest.mark.slow
def test_without_lora_dropout_the_key_changes_nothing():
    (l1, p1), (l2, p2) = step_with_keys(LORA, [jax.random.key(10), jax.random.key(11)])
    assert l1 == l2 and leaves_equal(p1, p2)


@pytest.mark.slow
def test_evaluation_ignores_lora_dropout():
    """The same weights evaluate to the same loss, every time, whether the model has lora_dropout 0.5 or 0."""
    state, _, x = lora_state(steps=1, model_cfg=LORA_DROPOUT)
    batch = (x, jnp.roll(x, -1, -1))
    with_dropout, without = (make_eval_step(init_state(m, parse_args([]), jax.random.key(0))[0]) for m in (LORA_DROPOUT, LORA))
    losses = [float(f(state.params, batch, state.frozen)) for f in (with_dropout, with_dropout, without)]
    assert losses[0] == losses[1] == losses[2]


@pytest.mark.parametrize("rank", [2, 8])
@pytest.mark.slow
def test_optimizer_state_is_proportional_to_the_adapters(rank):
    cfg = dataclasses.replace(LORA, lora_rank=rank)
    _, state, _ = init_state(cfg, parse_args([]), jax.random.key(0))
    n_adapters = lora.count(state.params)
    assert n_adapters == sum(rank * (i + o) for i, o in [(32, 96), (32, 32), (32, 128), (128, 32)]) * 2
    big = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert sum(x.size for x in big) == 2 * n_adapters  # AdamW's two moments, adapters only


def test_targets_choose_the_layers():
    cfg = dataclasses.replace(LORA, lora_targets="attn.c_attn")
    adapters, _ = lora.split(pure(build_model(cfg)))
    assert set(adapters["h"][0]) == {"attn"} and set(adapters["h"][0]["attn"]) == {"c_attn"}


# ----------------------------------------------------------------------------- whole runs

@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A small char model trained here: the base the LoRA runs start from."""
    from conftest import make_corpus

    d = tmp_path_factory.mktemp("base")
    corpus = d / "corpus.txt"
    corpus.write_text(make_corpus(), encoding="utf-8")
    cfg = parse_args(tiny_args(d, str(corpus), max_iters=10))
    train(cfg, log=lambda s: None)
    return cfg, str(corpus)


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def lora_args(tmp_path, base_run, name, **overrides):
    base, _ = base_run
    new_corpus = tmp_path / "new.txt"
    if not new_corpus.exists():
        from conftest import make_corpus

        new_corpus.write_text(make_corpus(seed=7)[::-1], encoding="utf-8")  # new text, the base's characters
    kw = dict(init_from=base.out_dir, finetune_method="lora", lora_rank=4, learning_rate=1e-2, decay_lr=False, eval_iters=10,
              data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / name), max_iters=12, eval_interval=6)
    kw.update(overrides)
    return parse_args(tiny_args(tmp_path, str(new_corpus), **kw))


@pytest.mark.slow  # over 10 s: a LoRA run, resumed, sampled, exported
def test_lora_run_learns_saves_little_resumes_and_samples(tmp_path, base_run, capsys):
    base, _ = base_run
    full = train(lora_args(tmp_path, base_run, "full"), log=lambda s: None)
    assert full["n_trainable"] < 0.2 * full["n_params"]
    base_params = load_model(base.out_dir)[1]  # the frozen part is exactly the base (no bias added)
    assert full["n_params"] - full["n_trainable"] == lora.count(base_params)
    rows = evaluations(tmp_path / "full")
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]  # the adapters learned the new corpus
    assert dir_bytes(tmp_path / "full" / "checkpoints") < 0.5 * dir_bytes(os.path.join(base.out_dir, "checkpoints"))
    # MFU counts LoRA's FLOPs: 4 per weight and token (forward, activation gradient), 2 more per adapter
    # weight (its own gradient), plus attention; the frozen base gets no weight gradient
    peak, _ = device_peak("float32", jax.devices()[:1])  # what train() used, cached in this process
    row, tokens_per_iter = rows[-1], 4 * 16
    fpt = row["mfu"] * peak * row["ms_per_iter"] / 1000 / tokens_per_iter
    n = full["n_params"] - 16 * 32  # without wpe
    assert abs(fpt / (4 * n + 2 * full["n_trainable"] + 12 * 2 * 2 * 16 * 16) - 1) < 1e-9

    # interrupted at 6 and resumed: the same run
    train(lora_args(tmp_path, base_run, "half", max_iters=6), log=lambda s: None)
    train(lora_args(tmp_path, base_run, "half", init_from="resume"), log=lambda s: None)
    half = evaluations(tmp_path / "half")
    assert [(r["iter"], r["val_loss"]) for r in half] == [(r["iter"], r["val_loss"]) for r in rows]

    # sampling loads base + adapters, merged into plain weights
    graphdef, params, model_cfg, tok, meta = load_model(str(tmp_path / "full"))
    assert model_cfg.lora_rank == 0 and meta["lora_base"]["source"] == os.path.abspath(base.out_dir)
    capsys.readouterr()
    assert sample_script.main([f"--out_dir={tmp_path / 'full'}", "--num_samples=2", "--max_new_tokens=20",
                               "--start=TO", "--temperature=1.0", "--top_k=0"]) == 0
    printed = capsys.readouterr().out
    # the text is the adapted model's, sampled with sample.py's seed from the checkpoint's adapters on the
    # base (not merged: an independent path); the base alone samples other text, so the adapters are in use
    lora_graphdef, adapters, lora_cfg, _ = restore_params(str(tmp_path / "full"))
    no_op = jax.tree.map(jnp.zeros_like, adapters)  # B = 0 (and A = 0): the base model, in the same program
    draw = dict(max_new_tokens=20, num_samples=2, temperature=1.0, key=jax.random.key(1337))
    adapted, base_only = (
        [tok.decode(row) for row in Engine(lora_graphdef, lora.join(a, base_params), lora_cfg.block_size,
                                           vocab_size=tok.vocab_size).generate(tok.encode("TO"), **draw).tokens]
        for a in (adapters, no_op))
    assert adapted != base_only
    assert printed == "".join(f"TO{text}\n{SEP}" for text in adapted)

    # export merges the adapters: a standalone jaxgpt out_dir that needs no base, and a HF directory
    merged_dir, hf_dir = tmp_path / "merged", tmp_path / "hf"
    assert export_script.main([f"--out_dir={tmp_path / 'full'}", f"--jaxgpt_dir={merged_dir}",
                               f"--hf_dir={hf_dir}"]) == 0
    _, standalone, standalone_cfg, _, standalone_meta = load_model(str(merged_dir))
    assert standalone_meta["lora_base"] is None and standalone_cfg == model_cfg
    for a, b in zip(jax.tree.leaves(standalone), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the char model's Hugging Face directory: transformers gives jaxgpt's logits (to 1e-4, the parity
    # tests' bound for float32 sums in another order), and jaxgpt_tokenizer.json is the same tokenizer
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    x = np.asarray(tok.encode("to be or not to"))[None]
    with torch.no_grad():
        theirs = hf(torch.tensor(x)).logits.numpy()
    np.testing.assert_allclose(theirs, np.asarray(nnx.merge(graphdef, params)(x)), atol=1e-4, rtol=0)
    exported_tok = tokenizer_from_meta(json.load(open(hf_dir / "jaxgpt_tokenizer.json", encoding="utf-8")))
    text = "ROMEO, to be.\nJULIET"
    assert exported_tok.encode(text) == tok.encode(text) and exported_tok.decode(tok.encode(text)) == text
    # and the standalone run finetunes further like any run
    more = train(parse_args(tiny_args(tmp_path, "unused", data_dir=str(tmp_path / "data"), out_dir=str(merged_dir),
                                      init_from="resume", max_iters=standalone_meta["step"] + 2)), log=lambda s: None)
    assert more["iter"] == standalone_meta["step"] + 2


def test_adapters_refuse_a_changed_base():
    base = pure(build_model(BASE, seed=1))
    ref = {"source": "somewhere", "fingerprint": lora.fingerprint(base)}
    assert lora.check_base(ref, jax.tree.map(np.asarray, base)) == ref  # the same weights, on the host
    changed = jax.tree.map(np.array, base)
    changed["h"][1]["mlp"]["c_proj"]["kernel"][3, 5] += 1e-3  # one weight of one layer
    with pytest.raises(UserError, match="not the one these LoRA adapters were trained on"):
        lora.check_base(ref, changed)


def test_lora_needs_a_base(tmp_path, corpus_file):
    with pytest.raises(UserError, match="trains adapters on a base model"):
        train(parse_args(tiny_args(tmp_path, corpus_file, finetune_method="lora")), log=lambda s: None)
    with pytest.raises(UserError, match="lora_targets"):
        parse_args(tiny_args(tmp_path, corpus_file, finetune_method="lora", init_from="gpt2",
                             lora_targets="attn.c_attn,wte")).validate()
