"""sample.py end to end, in-process: what it prints is what the engine generated, for char and
BPE models, streamed or not, cut at --stop, for prompts of any length."""

import re

import jax
import numpy as np
import pytest
import torch
import transformers

import sample as sample_script
from bpe_fixture import train_tiny_bpe, write_hf_tokenizer_files
from conftest import make_corpus, tiny_args
from jaxgpt.loading import load as load_model
from jaxgpt.config import parse_args
from jaxgpt.sampling import Engine, TextStream
from jaxgpt.trainer import train

SEP = sample_script.SEPARATOR + "\n"


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    """A tiny char model (block_size 16) trained for a few steps."""
    tmp = tmp_path_factory.mktemp("char")
    corpus = tmp / "corpus.txt"
    corpus.write_text(make_corpus(), encoding="utf-8")
    cfg = parse_args(tiny_args(tmp, str(corpus), max_iters=20, eval_interval=20))
    train(cfg, log=lambda s: None)
    return cfg.out_dir


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A random GPT-2-format directory with its own BPE (block 32)."""
    d = tmp_path_factory.mktemp("hf")
    enc = train_tiny_bpe(make_corpus(), n_merges=150)
    write_hf_tokenizer_files(enc, d)
    cfg = transformers.GPT2Config(vocab_size=enc.n_vocab, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
    return str(d)


def run(capsys, *args):
    assert sample_script.main(list(args)) == 0
    out = capsys.readouterr()
    return out.out, out.err


def expected(source, prompt, n, samples, seed, **kw):
    """The texts the engine generates for this request: sample.py must print exactly these."""
    graphdef, params, cfg, tok, *_ = (load_model(source, "best") if "out" in source.rsplit("/", 1)[-1]
                                      else load_model(source))
    result = Engine(graphdef, params, cfg.block_size, vocab_size=tok.vocab_size).generate(
        tok.encode(prompt), max_new_tokens=n, num_samples=samples, key=jax.random.key(seed), **kw)
    return [tok.decode(row) for row in result.tokens], tok


@pytest.mark.parametrize("prompt, n, keep", [("to be", 1, 0), ("to be", 40, 0), ("to be or not " * 4, 30, 0),
                                             ("to be or not " * 4, 30, 5)])
@pytest.mark.slow
def test_printed_samples_are_the_engines_for_any_length(char_run, capsys, prompt, n, keep):
    """Prompts shorter and longer (52 chars) than block_size 16, 1 to 40 new tokens, both window modes."""
    out, err = run(capsys, f"--out_dir={char_run}", f"--start={prompt}", "--num_samples=3",
                   f"--max_new_tokens={n}", "--seed=5", f"--window_keep={keep}", "--temperature=1.0")
    texts, _ = expected(char_run, prompt, n, 3, 5, temperature=1.0, top_k=200, window_keep=keep)
    assert out == "".join(prompt + t + "\n" + SEP for t in texts)
    assert all(len(t) == n for t in texts)
    assert re.search(rf"generated {3 * n} tokens \(3 samples x {n}, in parallel\) in [0-9.]+ s: [0-9,]+ tokens/s; "
                     r"compilation [0-9.]+ s \(not counted\); wall time from start [0-9.]+ s", err), err


@pytest.mark.slow
def test_prompt_from_a_file(char_run, capsys, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("ROMEO,\nto be", encoding="utf-8")
    out, _ = run(capsys, f"--out_dir={char_run}", f"--start=FILE:{path}", "--num_samples=1", "--max_new_tokens=12")
    texts, _ = expected(char_run, "ROMEO,\nto be", 12, 1, 1337, temperature=0.8, top_k=200)
    assert out == "ROMEO,\nto be" + texts[0] + "\n" + SEP


def stop_string(texts):
    """A two-character string that occurs in the first sample but not at its start."""
    t = texts[0]
    return next(t[i:i + 2] for i in range(3, len(t) - 1) if t[i:i + 2] not in t[:i + 1])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.slow
def test_stop_cuts_every_sample_streamed_or_not(char_run, capsys, stream):
    texts, _ = expected(char_run, "to", 60, 2, 1337, temperature=0.8, top_k=200)
    stop = stop_string(texts)
    out, err = run(capsys, f"--out_dir={char_run}", "--start=to", "--num_samples=2", "--max_new_tokens=60",
                   f"--stop={stop}", f"--stream={stream}")
    cut = [t[:t.index(stop)] if stop in t else t for t in texts]
    assert out == "".join("to" + c + "\n" + SEP for c in cut)  # the streamed one too: nothing past the stop
    assert stop not in out.split(SEP)[0]


def test_text_stream_holds_back_a_possible_stop_and_ends_exactly():
    decode = lambda ids: "".join(chr(i) for i in ids)  # noqa: E731
    s = TextStream(decode, stop="\n\n")
    pieces = [s.update(np.array([ord(c) for c in "ab\n"])), s.update(np.array([ord(c) for c in "ab\ncd\n"])),
              s.update(np.array([ord(c) for c in "ab\ncd\n\nef"]))]
    assert pieces == ["ab", "\ncd", ""] and s.update(np.array([ord(c) for c in "ab\ncd\n\nef"]), final=True) == ""
    t = TextStream(decode)
    assert t.update(np.array([ord("x"), 0xFFFD])) == "x" and t.update(np.array([ord("x"), 0xFFFD]), final=True) == "\ufffd"


@pytest.mark.slow
def test_bpe_model_from_a_directory(bpe_dir, capsys):
    """--init_from=PATH (a Hugging Face GPT-2 dir with its BPE), a prompt past its 32-token window."""
    prompt = "to be or not to be that is the question " * 4
    texts, tok = expected(bpe_dir, prompt, 20, 2, 3, temperature=0.8, top_k=200)
    assert len(tok.encode(prompt)) > 32
    out, err = run(capsys, f"--init_from={bpe_dir}", f"--start={prompt}", "--num_samples=2", "--max_new_tokens=20",
                   "--seed=3")
    assert out == "".join(prompt + t + "\n" + SEP for t in texts)
    assert "generated 40 tokens" in err


@pytest.mark.slow
def test_stream_prints_the_same_text_as_a_plain_run(bpe_dir, capsys):
    args = (f"--init_from={bpe_dir}", "--start=to be", "--num_samples=2", "--max_new_tokens=70")
    plain, _ = run(capsys, *args)
    streamed, _ = run(capsys, *args, "--stream=True")
    assert streamed == plain
