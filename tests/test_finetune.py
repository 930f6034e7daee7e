"""init_from: finetuning from a Hugging Face GPT-2 directory, a nanoGPT ckpt.pt and a jaxgpt
out_dir, end to end through train.py, sample.py and export.py. Offline: the GPT-2-format model
is a small random one with a BPE learned here."""

import json
import os

import jax
import numpy as np
import pytest

# test dependencies (pyproject's `test` extra): missing, they fail the run rather than skip these tests
import torch
import transformers

import export as export_script
import sample as sample_script
import train as train_script
from conftest import ROOT, tiny_args
from jaxgpt.loading import load as load_model
from jaxgpt.config import parse_args
from jaxgpt.start import padded_vocab
from jaxgpt.trainer import train
from helpers import SEP, engine_texts, evaluations, nanogpt_ckpt

FINETUNE = os.path.join(ROOT, "configs", "finetune_shakespeare.py")
# logits and losses are compared with transformers' float32 ones at 1e-4: float32 compute, exact matmuls
pytestmark = pytest.mark.usefixtures("exact_f32")


@pytest.fixture
def hf_dir(tiny_gpt2_dir):
    return tiny_gpt2_dir


read_metrics = evaluations  # the evaluations' rows


@pytest.mark.slow  # over 10 s: a finetuning run, sampled, exported
def test_finetune_config_end_to_end_from_a_local_gpt2_dir(tmp_path, hf_dir, corpus_file, capsys):
    """configs/finetune_shakespeare.py with a local GPT-2 directory: train, sample, export."""
    out, data = tmp_path / "out", tmp_path / "data"
    args = ["--config", FINETUNE, "--dtype=float32", f"--init_from={hf_dir}", f"--input_file={corpus_file}", f"--out_dir={out}",
            f"--data_dir={data}", "--block_size=32", "--batch_size=4", "--gradient_accumulation_steps=2",
            "--max_iters=6", "--eval_interval=3", "--eval_iters=4", "--learning_rate=3e-3"]
    assert train_script.main(args) == 0
    meta = json.load(open(data / "meta.json"))
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == json.load(open(hf_dir / "config.json"))["vocab_size"]
    rows = read_metrics(out)
    assert [r["iter"] for r in rows] == [0, 3, 6] and rows[-1]["val_loss"] < rows[0]["val_loss"]
    # a finetuning run resumes like any run: the architecture comes from its checkpoint
    assert train_script.main(args[:-5] + ["--max_iters=8", "--eval_interval=4", "--eval_iters=4",
                                          "--init_from=resume"]) == 0
    assert [r["iter"] for r in read_metrics(out)][-1] == 8
    _, params, model_cfg, tok, ckpt_meta = load_model(str(out), "latest")
    assert (model_cfg.vocab_size, model_cfg.block_size, model_cfg.gelu) == (meta["vocab_size"], 32, "tanh")
    assert ckpt_meta["origin"] == str(hf_dir) and ckpt_meta["train_config"]["init_from"] == "resume"
    capsys.readouterr()

    assert sample_script.main([f"--out_dir={out}", "--start=to be", "--num_samples=2", "--max_new_tokens=12"]) == 0
    expected = engine_texts(str(out), "to be", max_new_tokens=12, num_samples=2)  # from the best checkpoint
    assert expected[0] != expected[1]
    assert capsys.readouterr().out == "".join(f"to be{text}\n{SEP}" for text in expected)

    hf_out = tmp_path / "hf_out"
    assert export_script.main([f"--out_dir={out}", f"--hf_dir={hf_out}", "--which=latest"]) == 0
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_out).eval()
    x = np.asarray(tok.encode("to be or not to be that is the"))[None]
    from flax import nnx

    graphdef = load_model(str(out), "latest")[0]
    ours = np.asarray(nnx.merge(graphdef, params)(x))
    with torch.no_grad():
        theirs = hf(torch.tensor(x)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    # the exported BPE files are the same tokenizer
    from jaxgpt.tokenizer import load_bpe

    assert load_bpe(str(hf_out)).encode("whether tis nobler") == tok.encode("whether tis nobler")


def test_first_eval_is_the_pretrained_models_loss(tmp_path, hf_dir, corpus_file):
    """The weights arrive unchanged: iter 0's val loss is what transformers computes."""
    args = parse_args(["--config", FINETUNE, "--dtype=float32", f"--init_from={hf_dir}", f"--input_file={corpus_file}",
                       f"--out_dir={tmp_path / 'out'}", f"--data_dir={tmp_path / 'data'}", "--block_size=32",
                       "--batch_size=4", "--gradient_accumulation_steps=1", "--eval_only=True", "--eval_iters=3"])
    summary = train(args, log=lambda s: None)
    from jaxgpt import data as data_lib
    from jaxgpt.start import run_keys

    meta = data_lib.load_meta(str(tmp_path / "data"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    losses = []
    val = np.asarray(data_lib.load_split(str(tmp_path / "data"), "val", meta)).astype(np.int64)
    ek = jax.random.fold_in(run_keys(args.seed)["eval"], 0)
    for i in range(3):  # the eval batches train() used: split index 1 (val), batches 3..5
        key = jax.random.fold_in(ek, 3 + i)
        x, y = data_lib.get_batch(jax.random.split(key, 1)[0], val, 4, 32)
        with torch.no_grad():
            losses.append(float(hf(torch.tensor(np.asarray(x)), labels=None).logits.log_softmax(-1)
                                .gather(-1, torch.tensor(np.asarray(y))[..., None]).neg().mean()))
    assert abs(summary["val_loss"] - np.mean(losses)) < 1e-4


@pytest.mark.slow  # the fast tier's budget: among its longest (--durations, 2026-12-02)
def test_init_from_nanogpt_ckpt_and_jaxgpt_out_dir(tmp_path, hf_dir, corpus_file):
    ref = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    nanogpt_ckpt(ref, tmp_path / "ckpt.pt")
    common = dict(tokenizer="gpt2", tokenizer_dir=str(hf_dir), max_iters=2, eval_interval=2, block_size=32)
    a = train(parse_args(tiny_args(tmp_path / "a", corpus_file, init_from=str(tmp_path / "ckpt.pt"), **common)),
              log=lambda s: None)
    assert a["n_params"] == sum(p.numel() for n, p in ref.named_parameters() if "wpe" not in n) + 32 * 32
    # a jaxgpt out_dir as the start: its weights, a fresh optimizer, step 0
    b_args = parse_args(tiny_args(tmp_path / "b", corpus_file, init_from=str(tmp_path / "a" / "out"),
                                  max_iters=0, **{k: v for k, v in common.items() if k != "max_iters"}))
    train(b_args, log=lambda s: None)
    _, pa, *_ = load_model(str(tmp_path / "a" / "out"), "best")
    _, pb, _, _, meta_b = load_model(str(tmp_path / "b" / "out"), "latest")
    assert meta_b["step"] == 0
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_from_scratch_pads_a_bpe_vocab():
    assert padded_vocab({"tokenizer": "gpt2", "vocab_size": 50257}) == 50304
    assert padded_vocab({"tokenizer": "char", "vocab_size": 65}) == 65


@pytest.mark.slow
def test_scratch_bpe_run_pads_the_vocab_and_samples_only_real_tokens(tmp_path, hf_dir, corpus_file):
    from flax import nnx

    from jaxgpt.model import build_model
    from jaxgpt.sampling import Engine
    from jaxgpt.tokenizer import load_bpe
    from jaxgpt.start import setup

    cfg = parse_args(tiny_args(tmp_path, corpus_file, tokenizer="gpt2", tokenizer_dir=str(hf_dir)))
    model_cfg = setup(cfg, log=lambda s: None).model_cfg
    tok = load_bpe(str(hf_dir))
    assert model_cfg.vocab_size == padded_vocab(tok.meta()) > tok.vocab_size
    graphdef, params = nnx.split(build_model(model_cfg, seed=0), nnx.Param)
    draw = dict(max_new_tokens=40, num_samples=4, temperature=50.0, key=jax.random.key(0))
    padded = Engine(graphdef, params, model_cfg.block_size).generate(tok.encode("to"), **draw).tokens
    limited = Engine(graphdef, params, model_cfg.block_size, vocab_size=tok.vocab_size).generate(
        tok.encode("to"), **draw).tokens
    assert padded.max() >= tok.vocab_size  # a padded id is drawn when nothing stops it
    assert limited.max() < tok.vocab_size
