import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import data, prepare
from jaxgpt.errors import UserError
from jaxgpt.tokenizer import CharTokenizer, tokenizer_from_meta


def test_char_tokenizer_round_trip():
    text = "Hello, World!\nÀ bientôt."
    tok = CharTokenizer.from_text(text)
    assert tok.chars == sorted(set(text))
    assert tok.decode(tok.encode(text)) == text
    assert tokenizer_from_meta(tok.meta()).encode("Hello") == tok.encode("Hello")


def test_unknown_characters_are_named():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(UserError, match=r"2 character\(s\) outside the vocabulary: 'x', 'z'"):
        tok.encode("abzcx")


def test_prepare_writes_splits_and_meta(tmp_path, corpus_file):
    meta = prepare.prepare(corpus_file, str(tmp_path / "d"), verbose=False)
    text = open(corpus_file, encoding="utf-8").read()
    tok = CharTokenizer.from_text(text)
    ids = np.array(tok.encode(text))
    n = int(0.9 * len(ids))
    train = data.load_split(str(tmp_path / "d"), "train", meta)
    val = data.load_split(str(tmp_path / "d"), "val", meta)
    assert train.dtype == np.uint16 and isinstance(train, np.memmap)
    np.testing.assert_array_equal(train, ids[:n])
    np.testing.assert_array_equal(val, ids[n:])
    on_disk = json.load(open(tmp_path / "d" / "meta.json"))
    assert on_disk["vocab_size"] == tok.vocab_size and on_disk["chars"] == tok.chars
    assert prepare.token_dtype(70000) == np.uint32


def test_bad_input_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="empty"):
        prepare.prepare(str(empty), str(tmp_path / "d"))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        prepare.prepare(str(latin), str(tmp_path / "d"))
    with pytest.raises(UserError, match="not found"):
        prepare.prepare(str(tmp_path / "missing.txt"), str(tmp_path / "d"))


def test_offline_download_error_says_what_to_do(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise prepare.urllib.error.URLError("no network")
    monkeypatch.setattr(prepare.urllib.request, "urlopen", no_network)
    with pytest.raises(UserError, match="--input_file=PATH"):
        prepare.ensure_prepared(str(tmp_path / "d"), "shakespeare_char")


def test_batches_shift_by_one_and_match_host_and_device():
    tokens = np.arange(1000, dtype=np.uint16)
    key = jax.random.key(3)
    x, y = data.get_batch(key, tokens, 8, 16)
    assert x.shape == y.shape == (8, 16)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    np.testing.assert_array_equal(y, x + 1)  # arange corpus: the next token is token + 1
    xd, yd = jax.jit(lambda k, d: data.get_batch(k, d, 8, 16))(key, jnp.asarray(tokens))
    np.testing.assert_array_equal(x, xd)
    np.testing.assert_array_equal(y, yd)
    x2, _ = data.get_batch(jax.random.key(4), tokens, 8, 16)
    assert not np.array_equal(x, x2)


@pytest.mark.parametrize("on_device", [False, True])
def test_every_window_of_the_corpus_can_be_drawn_and_none_past_its_end(on_device):
    """A corpus of 40 tokens and block_size 8 has 32 windows of 9 tokens (input + next): their starts
    0..31 all occur, the corpus's last token is a target, and nothing past the end is read (on the
    device an out-of-range index would be clamped silently, not raise)."""
    tokens = np.arange(40, dtype=np.uint16)
    source = jnp.asarray(tokens) if on_device else tokens
    x, y = data.get_batch(jax.random.key(0), source, 2000, 8)
    x, y = np.asarray(x), np.asarray(y)
    assert set(x[:, 0].tolist()) == set(range(32))
    np.testing.assert_array_equal(x, x[:, :1] + np.arange(8))
    np.testing.assert_array_equal(y, x + 1)
    assert y.max() == 39


def test_prepare_cli_writes_the_requested_val_fraction(tmp_path, corpus_file, capsys):
    """python -m jaxgpt.prepare --val_fraction=0.25: train is the first 75% of the tokens, val the rest."""
    out = tmp_path / "d"
    prepare.main(["--input", corpus_file, "--data_dir", str(out), "--val_fraction", "0.25"])
    assert f"prepared {out}: char vocab" in capsys.readouterr().out
    text = open(corpus_file, encoding="utf-8").read()
    tok = CharTokenizer.from_text(text)
    ids = np.array(tok.encode(text))
    n = int(0.75 * len(ids))
    meta = data.load_meta(str(out))
    assert (meta["train_tokens"], meta["val_tokens"]) == (n, len(ids) - n)
    np.testing.assert_array_equal(data.load_split(str(out), "train", meta), ids[:n])
    np.testing.assert_array_equal(data.load_split(str(out), "val", meta), ids[n:])
    with pytest.raises(SystemExit) as e:
        prepare.main(["--input", corpus_file, "--data_dir", str(tmp_path / "e"), "--val_fraction", "1.5"])
    assert e.value.code == 2 and "val_fraction must be in (0, 1), got 1.5" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:'jaxgpt.data' found in sys.modules:RuntimeWarning")  # runpy, as `python -m` would
def test_the_old_data_command_points_to_prepare(capsys):
    """`python -m jaxgpt.data --input FILE --data_dir DIR` was the command before jaxgpt.prepare:
    it says where preparing went and exits 2, instead of exiting 0 having done nothing."""
    import runpy
    import sys

    argv = sys.argv
    sys.argv = ["jaxgpt.data", "--input", "x.txt", "--data_dir", "d"]
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_module("jaxgpt.data", run_name="__main__")
    finally:
        sys.argv = argv
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().split("\n")
    assert len(err) == 1 and err[0].startswith("error: ") and "python -m jaxgpt.prepare" in err[0], err
