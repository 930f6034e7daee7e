"""GPT-2 BPE tokenizer and corpus preparation, offline: a tiny BPE trained here stands in for
GPT-2's files (same byte alphabet, pre-tokenizer and file formats, fewer merges)."""

import json
import multiprocessing
import random

import numpy as np
import pytest
import tiktoken
import tiktoken.load

from bpe_fixture import gpt2_byte_alphabet, train_tiny_bpe, write_hf_tokenizer_files
from conftest import make_corpus
from jaxgpt import data, prepare
from jaxgpt import tokenizer as tk
from jaxgpt.errors import UserError

EXTRA = ("déjà vu — naïve café 日本語のテキスト\n  def f(x):\n\treturn x ** 2  # comment\r\n"
         "a\u00a0b\u3000c  \n\n\nEND.  \t\nROMEO's friends'll say 1234567 😀\n")


@pytest.fixture(scope="module")
def enc():
    return train_tiny_bpe(make_corpus(12000) + EXTRA * 40, n_merges=200)


@pytest.fixture(scope="module")
def hf_dir(enc, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_hf_tokenizer_files(enc, d)
    return str(d)


def tokens_of(data_dir):
    meta = data.load_meta(data_dir)
    return meta, np.concatenate([data.load_split(data_dir, s, meta) for s in data.SPLITS]).tolist()


# --- tokenizer -------------------------------------------------------------------------------

def test_bpe_round_trip_meta_and_padded_ids(enc):
    tok = tk.BPETokenizer(enc)
    text = "ROMEO's café 日本 😀\n\tx  <|endoftext|> y"
    ids = tok.encode(text)
    assert tok.eot not in ids and tok.decode(ids) == text  # special-token text stays plain text
    assert tok.encode_many([text, "a b"]) == [ids, tok.encode("a b")]
    assert tok.encode_array(text).tolist() == ids
    meta = json.loads(json.dumps(tok.meta()))
    assert not tok.standard and meta["encoding"] == enc.name and meta["vocab_size"] == enc.n_vocab
    assert len(meta["ranks"]) == enc.n_vocab and meta["ranks"][enc.eot_token] is None
    back = tk.tokenizer_from_meta(meta)
    sample = EXTRA + make_corpus(300, seed=5)
    assert back.encode(sample) == tok.encode(sample) and back.eot == tok.eot
    assert back.meta() == meta
    # a model trained from scratch pads its vocabulary to a multiple of 64; padded ids decode to nothing
    assert tok.decode(ids[:3] + [tok.vocab_size, tok.vocab_size + 20] + ids[3:]) == text
    euro = tok.encode("€")  # not in the training text: three byte tokens
    assert len(euro) == 3 and tok.decode(euro[:2]) == "\ufffd"  # part of a character: replaced, no error


def test_standard_gpt2_is_stored_by_name(enc, monkeypatch):
    """Only the object tiktoken registered as 'gpt2' is standard; an equal copy is embedded."""
    fake = tiktoken.Encoding("gpt2", pat_str=tk.GPT2_PATTERN, mergeable_ranks=enc._mergeable_ranks,
                             special_tokens=enc._special_tokens)
    monkeypatch.setitem(tiktoken.registry.ENCODINGS, "gpt2", fake)
    tok = tk.load_bpe()
    assert tok.encoding is fake and tok.standard
    assert tok.meta() == {"tokenizer": "gpt2", "encoding": "gpt2", "vocab_size": enc.n_vocab, "eot": enc.eot_token}
    assert tk.tokenizer_from_meta(tok.meta()).encoding is fake
    copy = tiktoken.Encoding("gpt2", pat_str=tk.GPT2_PATTERN, mergeable_ranks=enc._mergeable_ranks,
                             special_tokens=enc._special_tokens)
    assert "ranks" in tk.BPETokenizer(copy).meta()
    with pytest.raises(UserError, match="the metadata says 50257"):
        tk.tokenizer_from_meta({**tok.meta(), "vocab_size": 50257})
    with pytest.raises(UserError, match="knows: char, gpt2"):
        tk.tokenizer_from_meta({"tokenizer": "sentencepiece"})


def test_gpt2_encoding_offline_says_what_to_do(tmp_path, monkeypatch):
    def no_network(url):
        raise OSError(f"no network for {url}")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_cache"))
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "gpt2", raising=False)
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    with pytest.raises(UserError, match=r"could not download the GPT-2 BPE files.*cached.*--tokenizer_dir=DIR"):
        tk.gpt2_encoding()
    with pytest.raises(UserError, match="could not download"):
        tk.tokenizer_from_meta({"tokenizer": "gpt2", "encoding": "gpt2", "vocab_size": 50257, "eot": 50256})


def test_hf_files_match_the_encoding_and_transformers(enc, hf_dir):
    from tiktoken_ext.openai_public import r50k_pat_str
    assert tk.GPT2_PATTERN == r50k_pat_str
    assert tk.bytes_to_unicode() == gpt2_byte_alphabet()
    lines = open(f"{hf_dir}/merges.txt", encoding="utf-8").read().splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) - 1 == enc.n_vocab - 257
    rng = random.Random(0)
    alphabet = list(EXTRA + "ROMEO JULIET the question") + ["  ", "\n\n", "'s", "'ll", "123"]
    samples = [EXTRA, make_corpus(400, seed=3)] + ["".join(rng.choice(alphabet) for _ in range(200)) for _ in range(50)]
    loaded = tk.load_bpe(hf_dir)
    assert loaded.eot == enc.eot_token and loaded.meta()["encoding"].startswith("hf:")
    assert [loaded.encode(s) for s in samples] == [enc.encode_ordinary(s) for s in samples]
    import transformers  # a test dependency: proves the files are Hugging Face's format
    from transformers.models.gpt2 import tokenization_gpt2
    if hasattr(tokenization_gpt2, "bytes_to_unicode"):
        assert {b: c for b, c in tokenization_gpt2.bytes_to_unicode().items()} == gpt2_byte_alphabet()
    hf = transformers.GPT2Tokenizer.from_pretrained(hf_dir)
    assert [hf.encode(s) for s in samples] == [enc.encode_ordinary(s) for s in samples]


def test_hf_dir_errors(enc, hf_dir, tmp_path):
    with pytest.raises(UserError, match="has no vocab.json or merges.txt"):
        tk.load_bpe(str(tmp_path))
    with pytest.raises(UserError, match="not found"):
        tk.load_bpe(str(tmp_path / "missing"))
    vocab = open(f"{hf_dir}/vocab.json", encoding="utf-8").read()
    merges = open(f"{hf_dir}/merges.txt", encoding="utf-8").read().splitlines()
    cases = {"not two tokens": merges[:3] + ["Ġt h e"] + merges[3:],
             "out of id order": [merges[0], merges[2], merges[1]] + merges[3:],
             "makes a token that vocab.json lacks": merges + ["Ġt Ġt"]}
    for why, lines in cases.items():
        (tmp_path / "vocab.json").write_text(vocab, encoding="utf-8")
        (tmp_path / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        with pytest.raises(UserError, match=why):
            tk.encoding_from_hf_dir(str(tmp_path))
    (tmp_path / "vocab.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="cannot read"):
        tk.encoding_from_hf_dir(str(tmp_path))


# --- cutting files where the tokens cannot change ---------------------------------------------

def test_safe_cuts_never_change_tokens(enc):
    """Every cut safe_cut allows encodes like the whole text; and cuts elsewhere do change tokens
    (so the test can see a wrong rule, e.g. after a newline that follows a space)."""
    rng = random.Random(1)
    pieces = ["ab", "c", " ", "  ", "\n", "\n\n", " \n", "\t", "\r\n", "\u00a0", "\u3000", "é", "日本", "'s",
              "12", ".", "!?", "😀"]
    text = "".join(rng.choice(pieces) for _ in range(800))
    raw = text.encode()
    safe, changed = 0, 0
    for c in range(1, len(raw)):
        try:
            left, right = raw[:c].decode(), raw[c:].decode()
        except UnicodeDecodeError:
            continue
        same = enc.encode_ordinary(left) + enc.encode_ordinary(right) == enc.encode_ordinary(text)
        if prepare.safe_cut(raw, c - 1, c) == c:
            safe += 1
            assert same, (c, raw[c - 5:c + 5])
        changed += not same
    assert safe > 150 and changed > 100
    assert prepare.safe_cut(b"a \nb", 0, 3) == 2  # before the newline, not after it
    assert prepare.safe_cut("a\u3000b".encode(), 0, 3) == 1  # Unicode whitespace: before its first byte
    assert prepare.safe_cut("a \u3000b".encode(), 0, 1) == -1  # the next character is whitespace
    assert prepare.safe_cut("a\u3000\u00a0b".encode(), 0, 4) == 4


# --- preparing corpora -----------------------------------------------------------------------

def test_streaming_prepare_equals_one_shot_encode(enc, hf_dir, tmp_path, monkeypatch):
    # no cut in the run of x: the piece that holds it outgrows the chunk and the read size
    text = EXTRA * 30 + "x" * 20000 + "\n" + "\u3000".join(["日本語"] * 3000) + make_corpus(40000, seed=7)
    path = tmp_path / "big.txt"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(prepare, "CHUNK_BYTES", 4096)  # ~200 tasks of ~1.5 kB from ~300 kB
    monkeypatch.setattr(prepare, "MIN_CHUNK_BYTES", 1024)
    monkeypatch.setattr(prepare, "READ_BYTES", 3000)  # refills and a cut-less run longer than a read
    expect = enc.encode_ordinary(text) + [enc.eot_token]
    meta2 = prepare.prepare(str(path), str(tmp_path / "w2"), tokenizer="gpt2", tokenizer_dir=hf_dir, workers=2,
                         verbose=False)
    meta, got = tokens_of(tmp_path / "w2")
    assert got == expect
    assert meta == meta2 and meta["dtype"] == "uint16" and (meta["documents"], meta["skipped_files"]) == (1, 0)
    assert meta["train_tokens"] + meta["val_tokens"] == len(expect)
    val_bytes = len(tk.tokenizer_from_meta(meta).decode(got[meta["train_tokens"]:-1]).encode())
    assert 0.09 < val_bytes / len(text.encode()) < 0.11  # val = the last 10% of the bytes
    prepare.prepare(str(path), str(tmp_path / "w1"), tokenizer="gpt2", tokenizer_dir=hf_dir, workers=1, verbose=False)
    # the start method used once JAX runs (fork otherwise): workers rebuild the tokenizer from a pickle
    monkeypatch.setattr(prepare, "_pool_context", lambda: multiprocessing.get_context("forkserver"))
    prepare.prepare(str(path), str(tmp_path / "w3"), tokenizer="gpt2", tokenizer_dir=hf_dir, workers=2, verbose=False)
    for split in data.SPLITS:
        assert (tmp_path / "w1" / f"{split}.bin").read_bytes() == (tmp_path / "w2" / f"{split}.bin").read_bytes() \
            == (tmp_path / "w3" / f"{split}.bin").read_bytes()
    assert not list(tmp_path.glob("w*/*.part"))


def make_tree(root):
    files = {"a.py": "import os\n\nprint('a')  # tabs\tand  spaces\n",
             "pkg/b.py": "def b():\n    return 'b'\n",
             "pkg/sub/c.py": make_corpus(800, seed=4),
             "pkg/empty.py": "",
             "build/gen.py": "generated = True\n",
             ".hidden/d.py": "hidden = True\n",
             "pkg/.e.py": "hidden = True\n",
             "pkg/__pycache__/f.py": "cached = True\n",
             "notes.txt": "not python\n"}
    for rel, body in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(body, encoding="utf-8")
    (root / "pkg" / "blob.py").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    return files


def test_directory_corpus_globs_binary_and_eot(enc, hf_dir, tmp_path):
    files = make_tree(tmp_path / "src")
    meta = prepare.prepare(str(tmp_path / "src"), str(tmp_path / "d"), tokenizer="gpt2", tokenizer_dir=hf_dir,
                        include=["**/*.py"], exclude=["build/**"], workers=1, verbose=False)
    expect = []
    for rel in ("a.py", "pkg/b.py", "pkg/sub/c.py"):  # sorted; hidden, cached, empty and binary left out
        expect += enc.encode_ordinary(files[rel]) + [enc.eot_token]
    assert tokens_of(tmp_path / "d")[1] == expect
    assert (meta["documents"], meta["skipped_files"]) == (3, 1)
    with pytest.raises(UserError, match=r"no file in .*src matches include \*\*/\*\.rs and exclude \*\*/\.\*"):
        prepare.prepare(str(tmp_path / "src"), str(tmp_path / "e"), tokenizer="gpt2", tokenizer_dir=hf_dir,
                     include=["**/*.rs"], verbose=False)
    with pytest.raises(UserError, match="all binary or empty"):
        prepare.prepare(str(tmp_path / "src"), str(tmp_path / "e"), include=["pkg/blob.py", "pkg/empty.py"])


def test_globs_and_listing(tmp_path):
    g = prepare.glob_regex
    assert g("**/*.py").match("a.py") and g("**/*.py").match("x/y/a.py") and not g("**/*.py").match("a.pyc")
    assert g("*.py").match("a.py") and not g("*.py").match("x/a.py")
    assert g("build/**").match("build/x/y.c") and g("a/**/b").match("a/b") and g("a/**/b").match("a/x/y/b")
    assert g("?.c").match("a.c") and not g("?.c").match("/.c") and g("[!a]b").match("xb")
    make_tree(tmp_path / "src")
    assert prepare.list_files(str(tmp_path / "src"), exclude=["pkg/sub"]) == \
        ["a.py", "build/gen.py", "notes.txt", "pkg/b.py", "pkg/blob.py", "pkg/empty.py"]
    # a data_dir inside the corpus is never read back
    assert prepare.list_files(str(tmp_path / "src"), skip_dirs=[str(tmp_path / "src" / "pkg")]) == \
        ["a.py", "build/gen.py", "notes.txt"]


def test_char_tokenizer_on_a_directory(tmp_path):
    files = make_tree(tmp_path / "src")
    meta = prepare.prepare(str(tmp_path / "src"), str(tmp_path / "d"), include=["**/*.py"], exclude=["build"],
                        verbose=False)
    text = "\n".join(files[r] for r in ("a.py", "pkg/b.py", "pkg/sub/c.py"))
    tok = tk.tokenizer_from_meta(meta)
    assert meta["tokenizer"] == "char" and tok.chars == sorted(set(text))
    assert tok.decode(tokens_of(tmp_path / "d")[1]) == text
    assert (meta["documents"], meta["skipped_files"]) == (3, 1)


def test_small_corpus_bad_utf8_and_cli_errors(hf_dir, tmp_path, capsys):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hello world", encoding="utf-8")
    with pytest.raises(UserError, match="too small to split"):
        prepare.prepare(str(tiny), str(tmp_path / "d"), tokenizer="gpt2", tokenizer_dir=hf_dir, verbose=False)
    assert not list((tmp_path / "d").iterdir())  # nothing half-written is left
    late = tmp_path / "late.txt"
    late.write_bytes(make_corpus(3000).encode() + b"caf\xe9\n" + make_corpus(300).encode())
    with pytest.raises(UserError, match=rf"late.txt is not UTF-8 text \(bad byte at offset {len(make_corpus(3000)) + 3}\)"):
        prepare.prepare(str(late), str(tmp_path / "d"), tokenizer="gpt2", tokenizer_dir=hf_dir, verbose=False)
    with pytest.raises(SystemExit) as e:
        prepare.main(["--input", str(tmp_path / "missing"), "--data_dir", str(tmp_path / "d"), "--tokenizer", "gpt2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: input file not found") and err.count("\n") == 1


def test_ensure_prepared_passes_the_tokenizer_through(enc, hf_dir, tmp_path, corpus_file):
    assert prepare.DOWNLOADS["shakespeare"] == prepare.DOWNLOADS["shakespeare_char"]
    meta = prepare.ensure_prepared(str(tmp_path / "d"), "mine", corpus_file, tokenizer="gpt2", tokenizer_dir=hf_dir)
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == enc.n_vocab
    assert set(prepare.CORPUS_KEYS) <= set(meta) and tk.tokenizer_from_meta(meta).encode("to be") == enc.encode("to be")
    base = tk.CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz \n").meta()  # a base model's tokenizer
    meta = prepare.ensure_prepared(str(tmp_path / "c"), "mine", corpus_file, tokenizer_meta=base)
    assert meta["chars"] == base["chars"]  # the new data is encoded with the base's vocabulary,
    text = open(corpus_file).read()  # the characters it lacks (capitals, punctuation) dropped
    kept = "".join(c for c in text if c in base["chars"])
    ids = np.concatenate([data.load_split(str(tmp_path / "c"), s, meta) for s in data.SPLITS])
    assert tk.tokenizer_from_meta(meta).decode(ids) == kept and len(kept) < len(text)
    with pytest.raises(UserError, match="pass --tokenizer=char"):
        prepare.ensure_prepared(str(tmp_path / "e"), "mine", corpus_file, tokenizer="gpt2", tokenizer_meta=base)
