"""nanoGPT's character checkpoints (issue 34): ckpt.pt as nanoGPT's train.py saves it, with the
meta.pkl its data/shakespeare_char/prepare.py writes, read for sampling, finetuning and export.
The reference is nanoGPT's own model (tests/nanogpt_reference.NanoGPT), run by PyTorch on the same weights."""

import json
import os
import pickle

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import export as export_script
import sample as sample_script
from conftest import make_corpus, on_gpu, tiny_args
from helpers import evaluations
from nanogpt_reference import write_meta_pkl, write_nanogpt_run
from jaxgpt import pretrained
from jaxgpt.config import parse_args
from jaxgpt.errors import UserError
from jaxgpt.loading import load as load_model
from jaxgpt.trainer import train

TEXT = make_corpus(800, seed=3)
PROMPT = "ROMEO to be, or"
BLOCK = 16
# jaxgpt's float32 logits against PyTorch's on the same weights: 1e-5 (float32 sums in another
# order; the models here have logits of size ~3, so this is ~3e-6 relative)
ATOL = 1e-5
pytestmark = pytest.mark.usefixtures("exact_f32")


def ref_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).numpy()


def our_logits(source, ids, **kw):
    graphdef, params, _, tok, _ = load_model(str(source), dtype="float32", **kw)
    return np.asarray(nnx.merge(graphdef, params)(jnp.asarray([ids]))), tok


@pytest.mark.parametrize("compiled,bias,mask_buffer", [(True, False, False), (False, True, True)])
@pytest.mark.slow
def test_logits_and_tokenizer_are_nanogpts(tmp_path, compiled, bias, mask_buffer):
    """The shakespeare_char layout (no biases, a torch.compile'd run's names) and the other one
    (biases, the causal-mask buffers of PyTorch < 2): logits within 1e-5, nanoGPT's stoi / itos."""
    model, meta = write_nanogpt_run(tmp_path / "out", TEXT, bias=bias, compiled=compiled, mask_buffer=mask_buffer)
    write_meta_pkl(tmp_path / "out" / "meta.pkl", meta)
    ids = [meta["stoi"][c] for c in PROMPT]  # nanoGPT's sample.py: encode = lambda s: [stoi[c] for c in s]
    ours, tok = our_logits(tmp_path / "out" / "ckpt.pt", ids)
    assert tok.encode(PROMPT) == ids and tok.decode(range(meta["vocab_size"])) == "".join(
        meta["itos"][i] for i in range(meta["vocab_size"]))
    np.testing.assert_allclose(ours, ref_logits(model, ids), atol=ATOL, rtol=0)


def greedy_reference(model, meta, n):
    out = model.generate_greedy(torch.tensor([[meta["stoi"][c] for c in PROMPT]]), n)[0].tolist()
    return "".join(meta["itos"][i] for i in out)  # nanoGPT's decode


@pytest.mark.parametrize("where", ["beside", "data", "flag"])
@pytest.mark.slow
def test_sample_py_finds_meta_pkl_and_decodes_greedily_as_nanogpt(tmp_path, monkeypatch, capsys, where):
    """meta.pkl beside ckpt.pt, at data/<config['dataset']>/meta.pkl from the current directory
    (where nanoGPT's sample.py reads it), or given with --meta_pkl; greedy text past block_size
    (the context cropped as nanoGPT crops it) equals nanoGPT's."""
    monkeypatch.chdir(tmp_path)
    model, meta = write_nanogpt_run("out-shakespeare-char", TEXT, compiled=True, block_size=BLOCK)
    pkl = {"beside": "out-shakespeare-char/meta.pkl", "data": "data/shakespeare_char/meta.pkl",
           "flag": "elsewhere/meta.pkl"}[where]
    write_meta_pkl(pkl, meta)
    n = 2 * BLOCK
    flags = [f"--meta_pkl={pkl}"] if where == "flag" else []
    assert sample_script.main(["--init_from=out-shakespeare-char/ckpt.pt", f"--start={PROMPT}", "--num_samples=1",
                               f"--max_new_tokens={n}", "--temperature=0", *flags]) == 0
    printed = capsys.readouterr().out
    if on_gpu():  # sample.py computes in bfloat16 there: its greedy text need not be float32's
        pytest.skip("sample.py computes in bfloat16 on a GPU; the greedy text is compared on CPUs")
    assert printed == greedy_reference(model, meta, n) + "\n" + sample_script.SEPARATOR + "\n"


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EVIL_MARK', '/nonexistent/x')}",))


def test_meta_pkl_problems_are_one_line_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _, meta = write_nanogpt_run("out", TEXT)
    ckpt = "out/ckpt.pt"

    def error_of(*flags):
        capsys.readouterr()
        assert sample_script.main([f"--init_from={ckpt}", "--max_new_tokens=2", *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), err
        return err

    # no meta.pkl anywhere: a model of 58 characters cannot fall back to GPT-2's BPE
    err = error_of()
    assert "out/meta.pkl, data/shakespeare_char/meta.pkl" in err and "--meta_pkl=PATH" in err
    assert "does not exist" in error_of("--meta_pkl=nope.pkl")
    # any class but dict, str, int, list is refused, and nothing in the file runs
    mark = tmp_path / "ran"
    monkeypatch.setenv("EVIL_MARK", str(mark))
    for name, obj in [("evil", {**meta, "itos": Evil()}), ("ordered", {**meta, "itos": __import__("collections").OrderedDict(meta["itos"])}),
                      ("numpy", {**meta, "vocab_size": np.int64(meta["vocab_size"])})]:
        write_meta_pkl(f"{name}.pkl", obj)
        err = error_of(f"--meta_pkl={name}.pkl")
        assert f"{name}.pkl holds a " in err and "may hold only dict, str, int and list" in err, err
    assert not mark.exists()
    # a meta.pkl of other data: its vocab_size is not the checkpoint's
    other = {"vocab_size": 3, "itos": {0: "a", 1: "b", 2: "c"}, "stoi": {"a": 0, "b": 1, "c": 2}}
    write_meta_pkl("other.pkl", other)
    err = error_of("--meta_pkl=other.pkl")
    assert f"other.pkl has 3 tokens but the model in {ckpt} reads {meta['vocab_size']}" in err
    # not nanoGPT's shape
    for bad in ({"itos": meta["itos"]}, {**meta, "stoi": {**meta["stoi"], "a": 0}}, [1, 2, 3]):
        write_meta_pkl("bad.pkl", bad)
        assert "is not nanoGPT's character meta.pkl" in error_of("--meta_pkl=bad.pkl")
    write_meta_pkl("trunc.pkl", meta)
    with open("trunc.pkl", "r+b") as f:
        f.truncate(20)
    assert "trunc.pkl is not a readable pickle" in error_of("--meta_pkl=trunc.pkl")
    # --meta_pkl with a source that is not a nanoGPT checkpoint
    assert "drop --meta_pkl" in error_of("--init_from=resume", "--out_dir=out", "--meta_pkl=other.pkl")


def test_weights_alone_load_without_meta_pkl(tmp_path):
    """A LoRA base needs only the weights: a char ckpt.pt without its meta.pkl still loads, and the
    missing meta.pkl is reported only to what needs the tokenizer."""
    model, meta = write_nanogpt_run(tmp_path / "out", TEXT)
    w = pretrained.load_weights(str(tmp_path / "out"))
    assert w.tokenizer_meta is None and "meta.pkl" in w.tokenizer_error
    with pytest.raises(UserError, match="meta.pkl"):
        pretrained.source_tokenizer(w)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    with pytest.raises(UserError, match=r"reads \d+ tokens, not GPT-2's 50257, .*pass --meta_pkl=PATH"):
        train(parse_args(tiny_args(tmp_path, str(corpus), init_from=str(tmp_path / "out" / "ckpt.pt"))),
              log=lambda s: None)
    write_meta_pkl(tmp_path / "out" / "meta.pkl", meta)
    w = pretrained.load_weights(str(tmp_path / "out"))
    assert w.tokenizer_meta == {"tokenizer": "char", "vocab_size": meta["vocab_size"],
                                "chars": [meta["itos"][i] for i in range(meta["vocab_size"])]}


@pytest.mark.slow
def test_export_to_hugging_face_and_back(tmp_path, capsys):
    """export.py --init_from=ckpt.pt --hf_dir: transformers reads nanoGPT's function, jaxgpt reads it
    back with nanoGPT's characters (jaxgpt_tokenizer.json)."""
    transformers = pytest.importorskip("transformers")
    model, meta = write_nanogpt_run(tmp_path / "out", TEXT, compiled=True)
    write_meta_pkl(tmp_path / "out" / "meta.pkl", meta)
    hf = tmp_path / "hf"
    assert export_script.main([f"--init_from={tmp_path / 'out' / 'ckpt.pt'}", f"--hf_dir={hf}"]) == 0
    ids = [meta["stoi"][c] for c in PROMPT]
    ours, tok = our_logits(hf, ids)
    assert tok.encode(PROMPT) == ids
    np.testing.assert_allclose(ours, ref_logits(model, ids), atol=ATOL, rtol=0)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(hf).eval()
    with torch.no_grad():
        np.testing.assert_allclose(theirs(torch.tensor([ids])).logits.numpy(), ref_logits(model, ids), atol=ATOL, rtol=0)
    capsys.readouterr()
    assert export_script.main([f"--init_from={tmp_path / 'out' / 'ckpt.pt'}", f"--jaxgpt_dir={tmp_path / 'j'}"]) == 2
    assert "--max_iters=0 writes its first checkpoint" in capsys.readouterr().err


metrics = evaluations  # the evaluations' rows


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_init_from_a_nanogpt_char_checkpoint_trains(tmp_path, monkeypatch, method):
    """train.py --init_from=ckpt.pt on character data (meta_pkl as a config key): the data is
    encoded with nanoGPT's characters, the weights arrive unchanged (iter 0's checkpoint gives
    nanoGPT's logits; with LoRA its adapters start at zero), and a few steps lower the loss."""
    model, meta = write_nanogpt_run(tmp_path / "nano", TEXT, compiled=True, block_size=BLOCK)
    write_meta_pkl(tmp_path / "prepared" / "meta.pkl", meta)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus(3000, seed=9), encoding="utf-8")  # new text, the same characters
    kw = dict(init_from=str(tmp_path / "nano" / "ckpt.pt"), meta_pkl=str(tmp_path / "prepared" / "meta.pkl"),
              block_size=BLOCK, eval_iters=4, learning_rate=3e-3, decay_lr=False, dtype="float32")
    if method != "full":
        kw.update(finetune_method=method, lora_rank=4, qlora_quant="int8")
    # iter 0 only: the starting point
    train(parse_args(tiny_args(tmp_path / "zero", str(corpus), max_iters=0, **kw)), log=lambda s: None)
    data_meta = json.load(open(tmp_path / "zero" / "data" / "meta.json", encoding="utf-8"))
    assert data_meta["chars"] == [meta["itos"][i] for i in range(meta["vocab_size"])]
    ids = [meta["stoi"][c] for c in PROMPT]
    start, tok = our_logits(tmp_path / "zero" / "out", ids)
    assert tok.encode(PROMPT) == ids
    if method == "qlora":  # the base's kernels are int8 now: close to nanoGPT's, not equal
        assert np.abs(start - ref_logits(model, ids)).max() < 0.1
    else:
        np.testing.assert_allclose(start, ref_logits(model, ids), atol=ATOL, rtol=0)
    summary = train(parse_args(tiny_args(tmp_path / "run", str(corpus), max_iters=10, eval_interval=10, **kw)),
                    log=lambda s: None)
    rows = metrics(tmp_path / "run" / "out")
    assert [r["iter"] for r in rows] == [0, 10] and rows[-1]["val_loss"] < rows[0]["val_loss"]
    if method != "full":
        assert summary["n_trainable"] < 0.5 * summary["n_params"]
