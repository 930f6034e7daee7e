"""export -> load is a round trip (issue 33, point 2): a character model exported with export.py
--hf_dir (config.json, model.safetensors, jaxgpt_tokenizer.json) loads back with its characters,
in sample.py and as init_from (full, LoRA, QLoRA), computing what the run computed."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import export as export_script
import sample as sample_script
from conftest import make_corpus, tiny_args
from helpers import evaluations
from jaxgpt import pretrained
from jaxgpt.config import parse_args
from jaxgpt.errors import UserError
from jaxgpt.loading import load as load_model
from jaxgpt.trainer import train

PROMPT = "ROMEO, to be"
# the exported weights are the run's float32 weights, bit for bit; a bias-free run comes back with
# zero biases (Hugging Face's GPT-2 always has them), which adds zeros: logits agree to 1e-6
ATOL = 1e-6
# slow: the module's run trains for ~30 s on a CPU, each test compiles its own programs
pytestmark = [pytest.mark.usefixtures("exact_f32"), pytest.mark.slow]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny char run trained here, and its export.py --hf_dir directory."""
    d = tmp_path_factory.mktemp("char")
    corpus = d / "corpus.txt"
    corpus.write_text(make_corpus(), encoding="utf-8")
    cfg = parse_args(tiny_args(d, str(corpus), max_iters=6, eval_interval=3))
    train(cfg, log=lambda s: None)
    hf = d / "hf"
    assert export_script.main([f"--out_dir={cfg.out_dir}", f"--hf_dir={hf}"]) == 0
    return cfg, str(hf)


def logits(source, text, **kw):
    graphdef, params, _, tok, _ = load_model(str(source), **kw)
    return np.asarray(nnx.merge(graphdef, params)(jnp.asarray([tok.encode(text)]))), tok


def test_exported_char_model_loads_back_with_its_characters(exported):
    cfg, hf = exported
    assert json.load(open(f"{hf}/jaxgpt_tokenizer.json", encoding="utf-8"))["tokenizer"] == "char"
    theirs, run_tok = logits(cfg.out_dir, PROMPT)
    ours, tok = logits(hf, PROMPT)  # dtype "auto", as the run's: float32 on a CPU, bfloat16 on a GPU
    assert tok.meta() == run_tok.meta()
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)


def test_sample_py_from_the_exported_directory_prints_the_runs_text(exported, capsys):
    cfg, hf = exported
    common = [f"--start={PROMPT}", "--num_samples=2", "--max_new_tokens=40", "--temperature=0.8", "--seed=7"]
    assert sample_script.main([f"--out_dir={cfg.out_dir}", *common]) == 0
    from_run = capsys.readouterr().out
    assert sample_script.main([f"--init_from={hf}", *common]) == 0
    assert capsys.readouterr().out == from_run


def test_a_damaged_or_mismatched_tokenizer_file_is_one_line(exported, tmp_path):
    _, hf = exported
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(hf, bad)
    (bad / "jaxgpt_tokenizer.json").write_text('{"tokenizer": "char", "vocab_size": 2, "chars": ["a", "b"]}')
    with pytest.raises(UserError, match="jaxgpt_tokenizer.json has 2 tokens but the model in .* reads"):
        load_model(str(bad))
    (bad / "jaxgpt_tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read .*jaxgpt_tokenizer.json .*export the model again"):
        load_model(str(bad))
    assert pretrained.load_weights(str(bad)).tokenizer_error  # the weights alone still load


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_init_from_the_exported_directory(exported, tmp_path, method):
    """train.py --init_from=DIR on character data (refused before: 'holds GPT-2 weights'): the data
    is encoded with the directory's characters, iter 0 is the exported model, and it trains."""
    cfg, hf = exported
    corpus = tmp_path / "new.txt"
    corpus.write_text(make_corpus(3000, seed=5), encoding="utf-8")
    kw = dict(init_from=hf, eval_iters=4, decay_lr=False, learning_rate=3e-3)
    if method != "full":
        kw.update(finetune_method=method, lora_rank=4, qlora_quant="int8")
    train(parse_args(tiny_args(tmp_path / "zero", str(corpus), max_iters=0, **kw)), log=lambda s: None)
    data_meta = json.load(open(tmp_path / "zero" / "data" / "meta.json", encoding="utf-8"))
    run_meta = json.load(open(f"{cfg.data_dir}/meta.json", encoding="utf-8"))
    assert data_meta["chars"] == run_meta["chars"]
    start, _ = logits(tmp_path / "zero" / "out", PROMPT)
    run_logits, _ = logits(cfg.out_dir, PROMPT)
    if method == "qlora":  # the base's kernels are int8 now: close to the run's, not equal
        assert np.abs(start - run_logits).max() < 0.1
    else:
        np.testing.assert_allclose(start, run_logits, atol=ATOL, rtol=0)
    train(parse_args(tiny_args(tmp_path / "more", str(corpus), max_iters=8, eval_interval=8, **kw)),
          log=lambda s: None)
    rows = evaluations(tmp_path / "more" / "out")
    assert [r["iter"] for r in rows] == [0, 8] and rows[-1]["val_loss"] < rows[0]["val_loss"]
