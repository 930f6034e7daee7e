"""One table of bad inputs across every script: each row is what a new user might type, and each
must end with exit code 2 and exactly one line on stderr, `error: ...`, naming the key or the path,
with no traceback, while a trained run's out_dir stays byte for byte what it was.

Rows call each script's main(argv) in-process (train, sample, export, bench, jaxgpt.prepare); a
few start a subprocess. Rows marked `early` fail while the flags, config files and files named
are checked: they must fail before JAX compiles anything. To add a row, append a Row to ROWS:
the argv takes {run} (the trained out_dir), {data} (its prepared data), {corpus} and {tmp} (a
fresh directory of the row's own, which `setup` may fill).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import pytest

import bench as bench_script
import export as export_script
import sample as sample_script
import train as train_script
from conftest import entry_points, make_corpus, subprocess_env, tiny_args
from helpers import run_python
from jaxgpt import prepare as prepare_lib
from jaxgpt.config import parse_args
from jaxgpt.trainer import train


def _prepare_main(argv):
    try:
        prepare_lib.main(argv)
        return 0
    except SystemExit as e:
        return e.code


SCRIPTS = {"train": train_script.main, "sample": sample_script.main, "export": export_script.main,
           "bench": bench_script.main, "prepare": _prepare_main}


@dataclass
class Row:
    id: str
    script: str  # a key of SCRIPTS, or "python -m jaxgpt.prepare" etc. for a subprocess (argv[0] is the module)
    argv: list[str]
    expect: str  # a substring of the one error line (formatted like argv)
    setup: Callable[[Path, Path], None] | None = None  # (tmp, data) -> None, or a cleanup to call after the row
    early: bool = True  # fails while checking flags / files: nothing may compile
    code: int = 2
    subprocess: bool = False


# --------------------------------------------------------------------------- setups

def write(name: str, data: bytes | str) -> Callable:
    def setup(tmp: Path, data_dir: Path):
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return setup


def mkdir(name: str, files: dict[str, bytes] | None = None) -> Callable:
    def setup(tmp: Path, data_dir: Path):
        (tmp / name).mkdir()
        for f, b in (files or {}).items():
            (tmp / name / f).write_bytes(b)
    return setup


def damaged(mutate: Callable[[Path, dict], None]) -> Callable:
    """A copy of the run's prepared data in {tmp}/data, then mutate(copy, meta)."""
    def setup(tmp: Path, data_dir: Path):
        shutil.copytree(data_dir, tmp / "data")
        mutate(tmp / "data", json.loads((tmp / "data" / "meta.json").read_text()))
    return setup


def set_meta(**changes) -> Callable:
    def mutate(d: Path, meta: dict):
        meta.update(changes)
        for k in [k for k, v in changes.items() if v is None]:
            del meta[k]
        (d / "meta.json").write_text(json.dumps(meta))
    return mutate


def tokens(split: str, ids) -> Callable:
    """Replaces a split's tokens (meta.json follows, so only the tokens are wrong)."""
    def mutate(d: Path, meta: dict):
        arr = np.asarray(ids, dtype=meta["dtype"])
        arr.tofile(d / f"{split}.bin")
        set_meta(**{f"{split}_tokens": len(arr)})(d, meta)
    return mutate


def append_byte(split: str) -> Callable:
    def mutate(d: Path, meta: dict):
        with open(d / f"{split}.bin", "ab") as f:
            f.write(b"\0")
    return mutate


LATIN1 = "caf\xe9 au lait\n".encode("latin-1") * 20
UTF16 = codecs.BOM_UTF16_LE + make_corpus(200).encode("utf-16-le")
UTF32 = codecs.BOM_UTF32_LE + make_corpus(200).encode("utf-32-le")

def locked(name: str) -> Callable:
    """{tmp}/name held by another trainer's lock (this process, through its own open file: flock
    refuses a second open file description as it refuses another process); released after the row."""
    def setup(tmp: Path, data_dir: Path):
        from jaxgpt.rundir import RunLock

        lock = RunLock(str(tmp / name)).__enter__()
        return lock.release
    return setup


# --------------------------------------------------------------------------- the table

# train.py flags: the fixture's tiny run, resumed (so that no "fresh run into an existing run" check
# can come first); each row adds the flag that is wrong (later flags win)
T = ["--out_dir={run}", "--data_dir={data}", "--input_file={corpus}", "--init_from=resume", "--n_layer=2",
     "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--eval_iters=2", "--eval_interval=2",
     "--max_iters=4", "--warmup_iters=2", "--lr_decay_iters=10", "--learning_rate=1e-2", "--min_lr=1e-3"]
D = T + ["--data_dir={tmp}/data"]  # the run's data, damaged in {tmp}/data by the row's setup
S = ["--out_dir={run}", "--max_new_tokens=4", "--num_samples=1"]
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4"]
P = ["--input", "{corpus}", "--data_dir", "{tmp}/prep"]


def flag(key, value, expect, script="train", base=None):
    return Row(f"{script}-{key}={value}"[:60], script, (T if base is None else base) + [f"--{key}={value}"], expect)


def config_file(name, source, expect):
    """A row whose config file holds the mistake (its keys must not be in T: flags win over files)."""
    return Row(f"config-{name}", "train", T + ["--config", "{tmp}/c.py"], expect, write("c.py", source))


ROWS = [
    # --- train.py: flags and their types
    flag("n_layers", 2, "unknown config key 'n_layers'; did you mean 'n_layer'?"),
    flag("max_iters", "ten", "max_iters expects an integer, got 'ten'"),
    flag("bias", "maybe", "bias expects True or False"),
    flag("learning_rate", "fast", "learning_rate expects a number"),
    Row("flag-without-value", "train", T + ["--batch_size"], "--batch_size needs a value: --batch_size=VALUE"),
    Row("config-flag-without-path", "train", ["--config"], "--config needs a file path"),
    # --- config files: read as data, bounded, file:line named
    Row("config-missing", "train", T + ["--config", "{tmp}/none.py"], "config file not found: {tmp}/none.py"),
    Row("config-is-a-directory", "train", T + ["--config", "{tmp}"], "config file {tmp} is not a file"),
    config_file("latin1", "out_dir = 'caf\xe9'\n".encode("latin-1"), "config file {tmp}/c.py is not UTF-8 text"),
    config_file("syntax", "\nbatch_size = = 3\n", "{tmp}/c.py:2: syntax error"),
    config_file("import", "import os\n", "{tmp}/c.py:1: config files may only contain 'name = value' lines"),
    config_file("call", "batch_size = int('3')\n", "{tmp}/c.py:1: batch_size: only literals"),
    config_file("huge-power", "max_iters = 10 ** 10 ** 10\n", "{tmp}/c.py:1: max_iters: a number over 2**256"),
    config_file("huge-string", 'out_dir = "a" * 10 ** 10\n', "{tmp}/c.py:1: out_dir: a string over 65536"),
    config_file("format", 'out_dir = "%0999999999d" % 1\n', "{tmp}/c.py:1: out_dir: string formatting"),
    config_file("deep", "batch_size = " + "1+" * 100_000 + "1\n", "{tmp}/c.py: an expression in this config file "
                "is nested too deeply"),
    config_file("too-large", "# " + "x" * (2 << 20) + "\n", "config file {tmp}/c.py has 2,097,155 bytes, over the"),
    config_file("div-zero", "batch_size = 1 // 0\n", "{tmp}/c.py:1: batch_size: integer division or modulo by zero"),
    config_file("nan", "weight_decay = 1e999 - 1e999\n", "{tmp}/c.py:1: weight_decay must be a finite number, "
                "got nan"),
    config_file("range", '"""doc"""\n\nbeta2 = 1.5\n', "{tmp}/c.py:3: beta2 must be in [0, 1), got 1.5"),
    config_file("unknown-key", "n_layers = 4\n", "unknown config key 'n_layers' in {tmp}/c.py:1"),
    config_file("wrong-type", "grad_clip = 'high'\n", "{tmp}/c.py:1: grad_clip expects a number"),
    # --- train.py: every key's range
    flag("learning_rate", 0, "learning_rate must be > 0, got 0.0"),
    flag("learning_rate", "1e999", "learning_rate must be a finite number, got inf"),
    flag("min_lr", -1, "min_lr must be >= 0, got -1.0"),
    flag("min_lr", 0.1, "min_lr (0.1) must be <= learning_rate (0.01)"),
    flag("beta1", 1, "beta1 must be in [0, 1), got 1.0"),
    flag("beta2", 1.5, "beta2 must be in [0, 1), got 1.5"),
    flag("weight_decay", -0.1, "weight_decay must be >= 0, got -0.1"),
    flag("grad_clip", -1, "grad_clip must be >= 0 (0 disables clipping), got -1.0"),
    flag("seed", -1, "seed must be in [0, 4294967296), got -1"),
    flag("seed", 2**32, "seed must be in [0, 4294967296), got 4294967296"),
    flag("warmup_iters", -1, "warmup_iters must be in [0, 2147483647], got -1"),
    flag("lr_decay_iters", -1, "lr_decay_iters must be in [0, 2147483647], got -1"),
    flag("eval_interval", 0, "eval_interval must be in [1, 2147483647], got 0"),
    flag("log_interval", 0, "log_interval must be in [1, 2147483647], got 0"),
    flag("profile", "10", "profile must be START:STOP, the steps to trace with START < STOP (e.g. --profile=10:15 "
                          "traces steps 10 to 14), or '' for none; got '10'"),
    flag("profile", "15:10", "profile must be START:STOP, the steps to trace with START < STOP (e.g. "
                             "--profile=10:15 traces steps 10 to 14), or '' for none; got '15:10'"),
    flag("wandb_project", " ", "wandb_project is empty; name a wandb project, e.g. --wandb_project=owt"),
    flag("eval_iters", 0, "eval_iters must be in [1, 2147483647], got 0"),
    flag("batch_size", 0, "batch_size must be in [1, 1048576], got 0"),
    flag("block_size", 10**9, "block_size must be in [1, 1048576], got 1000000000"),
    flag("n_layer", 0, "n_layer must be in [1, 4096], got 0"),
    flag("n_head", 0, "n_head must be in [1, 4096], got 0"),
    Row("train-n_embd-n_head", "train", T + ["--n_embd=10", "--n_head=3"], "n_embd (10) must be divisible by n_head (3)"),
    flag("dropout", 1.0, "dropout must be in [0, 1), got 1.0"),
    flag("gradient_accumulation_steps", 0, "gradient_accumulation_steps must be in [1, 1048576], got 0"),
    flag("max_iters", -1, "max_iters must be in [0, 2147483647], got -1"),
    flag("cpu_devices", -1, "cpu_devices must be in [0, 4096], got -1"),
    flag("mesh_shape", "2x", "mesh_shape must look like 'N' or 'DxF'"),
    flag("mesh_shape", "0x2", "mesh_shape must look like 'N' or 'DxF'"),
    flag("lora_rank", 0, "lora_rank must be in [1, 65536], got 0"),
    flag("lora_dropout", 1, "lora_dropout must be in [0, 1), got 1.0"),
    flag("lora_alpha", 0, "lora_alpha must be > 0, got 0.0"),
    flag("lora_targets", "attn.c_attn,wte", "each of lora_targets must be one of"),
    flag("dtype", "float16", "dtype must be one of auto, float32, bfloat16; got 'float16'"),
    flag("matmul_precision", "exact", "matmul_precision must be one of default, high, highest"),
    flag("attn_impl", "flash", "attn_impl must be one of auto, explicit, xla, cudnn"),
    flag("sharding", "tp", "sharding must be one of dp, fsdp"),
    flag("on_nonfinite", "ignore", "on_nonfinite must be one of stop, skip"),
    flag("model_type", "rnn", "model_type must be one of gpt, bigram"),
    flag("model_size", "gpt3", "model_size must be one of gpt2, gpt2-medium, gpt2-large, gpt2-xl"),
    flag("tokenizer", "bpe", "tokenizer must be one of char, gpt2"),
    flag("finetune_method", "adapters", "finetune_method must be one of full, lora"),
    flag("init_from", "", "init_from is empty"),
    # --- train.py: paths of the wrong kind
    Row("out_dir-is-a-file", "train", T + ["--out_dir={tmp}/f"], "out_dir {tmp}/f is a file, not a directory",
        write("f", "x")),
    Row("out_dir-under-a-file", "train", T + ["--out_dir={tmp}/f/run"], "out_dir {tmp}/f/run cannot be created: "
        "{tmp}/f is a file", write("f", "x")),
    Row("data_dir-is-a-file", "train", T + ["--data_dir={tmp}/f"], "data_dir {tmp}/f is a file, not a directory",
        write("f", "x")),
    # --- train.py: corpora (prepared on first use)
    Row("corpus-missing", "train", D + ["--input_file={tmp}/none.txt"], "input file not found: {tmp}/none.txt",
        early=False),
    Row("corpus-empty", "train", D + ["--input_file={tmp}/e.txt"], "{tmp}/e.txt is empty", write("e.txt", b""),
        early=False),
    Row("corpus-latin1", "train", D + ["--input_file={tmp}/l.txt"], "{tmp}/l.txt is not UTF-8 text (bad byte at "
        "offset 3); convert it to UTF-8 first", write("l.txt", LATIN1), early=False),
    Row("corpus-utf16", "train", D + ["--input_file={tmp}/u.txt"], "{tmp}/u.txt is UTF-16 text", write("u.txt", UTF16),
        early=False),
    Row("corpus-empty-directory", "train", D + ["--input_file={tmp}/src"], "no file in {tmp}/src matches",
        mkdir("src"), early=False),
    Row("corpus-only-binary", "train", D + ["--input_file={tmp}/src"], "are all binary or empty",
        mkdir("src", {"a.bin": b"\0\1\2" * 100, "b.png": b"\x89PNG\r\n\x1a\n\0\0"}), early=False),
    Row("corpus-bad-glob", "train", D + ["--input_file={tmp}/src", "--include=[z-a].txt"],
        "the glob '[z-a].txt' is malformed", mkdir("src", {"a.txt": b"hello"}), early=False),
    Row("corpus-glob-matches-nothing", "train", D + ["--input_file={tmp}/src", "--include=**/*.py"],
        "no file in {tmp}/src matches include **/*.py", mkdir("src", {"a.txt": b"hello"}), early=False),
    Row("tokenizer_dir-missing", "train", D + ["--init_from=scratch", "--out_dir={tmp}/o", "--tokenizer=gpt2",
                                               "--tokenizer_dir={tmp}/nodir"],
        "tokenizer directory not found: {tmp}/nodir", early=False),
    # --- train.py: prepared data that is damaged
    Row("meta-not-json", "train", D, "{tmp}/data/meta.json is damaged",
        damaged(lambda d, m: (d / "meta.json").write_text('{"vocab_size": 6')), early=False),
    Row("meta-missing-key", "train", D, "{tmp}/data/meta.json is damaged (no 'vocab_size')",
        damaged(set_meta(vocab_size=None)), early=False),
    Row("meta-wrong-type", "train", D, "{tmp}/data/meta.json is damaged ('vocab_size' is '34', not an integer)",
        damaged(set_meta(vocab_size="34")), early=False),
    Row("meta-bad-dtype", "train", D, "{tmp}/data/meta.json is damaged ('dtype' is 'float32'",
        damaged(set_meta(dtype="float32")), early=False),
    Row("meta-missing-no-input", "train", D + ["--input_file=", "--dataset=mine"], "no prepared data in {tmp}/data "
        "and no input_file", damaged(lambda d, m: (d / "meta.json").unlink()), early=False),
    Row("meta-other-tokenizer", "train", D, "{tmp}/data was prepared with the 'gpt2' tokenizer, not 'char'",
        damaged(set_meta(tokenizer="gpt2")), early=False),
    Row("bin-odd-size", "train", D, "{tmp}/data/train.bin has", damaged(append_byte("train")), early=False),
    Row("bin-missing-no-input", "train", D + ["--input_file=", "--dataset=mine"], "no prepared data in {tmp}/data",
        damaged(lambda d, m: (d / "val.bin").unlink()), early=False),
    Row("split-empty", "train", D, "{tmp}/data/val.bin holds no tokens", damaged(tokens("val", [])), early=False),
    Row("split-too-short", "train", D, "{tmp}/data/val.bin has 3 tokens, fewer than block_size + 1 = 17",
        damaged(tokens("val", [1, 2, 3])), early=False),
    Row("token-past-vocab", "train", D, "{tmp}/data/train.bin holds token id 999, outside the vocabulary",
        damaged(tokens("train", [1, 2, 3] * 20 + [999])), early=False),
    # --- sample.py
    flag("num_samples", 0, "num_samples must be in [1, 1048576], got 0", "sample", S),
    flag("max_new_tokens", 0, "max_new_tokens must be >= 1, got 0", "sample", S),
    flag("temperature", -1, "temperature must be >= 0 (0 means greedy), got -1.0", "sample", S),
    flag("temperature", "1e999", "temperature must be a finite number, got inf", "sample", S),
    flag("top_k", -5, "top_k must be >= 1 (or 0 for no limit), got -5", "sample", S),
    flag("top_p", 0, "top_p must be in (0, 1], got 0.0", "sample", S),
    flag("top_p", 1.5, "top_p must be in (0, 1], got 1.5", "sample", S),
    flag("seed", -1, "seed must be in [0, 4294967296), got -1", "sample", S),
    flag("window_keep", -1, "window_keep must be >= 0 (0 means block_size), got -1", "sample", S),
    flag("which", "first", "which must be one of best, latest; got 'first'", "sample", S),
    flag("init_from", "", "init_from is empty", "sample", S),
    flag("stream", "maybe", "stream expects True or False", "sample", S),
    flag("temp", 1, "unknown config key 'temp'; did you mean 'temperature'?", "sample", S),
    Row("prompt-file-missing", "sample", S + ["--start=FILE:{tmp}/p.txt"], "cannot read prompt file {tmp}/p.txt"),
    Row("prompt-file-directory", "sample", S + ["--start=FILE:{tmp}"], "cannot read prompt file {tmp}: it is a directory"),
    Row("prompt-file-latin1", "sample", S + ["--start=FILE:{tmp}/p.txt"], "prompt file {tmp}/p.txt is not UTF-8 text",
        write("p.txt", LATIN1)),
    Row("sample-no-checkpoint", "sample", S + ["--out_dir={tmp}"], "no checkpoint in {tmp}", early=False),
    Row("sample-window_keep-past-block", "sample", S + ["--window_keep=1000"],
        "window_keep must be in 1..block_size (16), got 1000", early=False),
    Row("sample-prompt-outside-vocab", "sample", S + ["--start=to be€"], "outside the vocabulary: '€'", early=False),
    Row("sample-does-not-fit-in-memory", "sample", S + ["--num_samples=1000000", "--max_new_tokens=100000"],
        "(num_samples=1000000 x max_new_tokens=100000) needs about", early=False),
    Row("sample-more-than-int32", "sample", S + [f"--max_new_tokens={2**31}"], "is more than one request can hold",
        early=False),
    # --- bench.py
    flag("steps", 0, "steps must be in [1, 1000000], got 0", "bench", TINY),
    flag("profile", "a:b", "profile must be START:STOP, the steps to trace with START < STOP (e.g. --profile=10:15 "
                           "traces steps 10 to 14), or '' for none; got 'a:b'", "bench", TINY),
    flag("steps", "abc", "steps expects an integer, got 'abc'", "bench", TINY),
    flag("vocab_size", 0, "vocab_size must be in [1, 4194304], got 0", "bench", TINY),
    flag("sample_tokens", -1, "sample_tokens must be in [0, 2147483647], got -1", "bench", TINY),
    flag("num_samples", 0, "num_samples must be in [1, 1048576], got 0", "bench", TINY + ["--sample_tokens=8"]),
    flag("prompt_tokens", 0, "prompt_tokens must be in [1, 1048576], got 0", "bench", TINY + ["--sample_tokens=8"]),
    flag("window_keep", -1, "window_keep must be >= 0 (0 means block_size), got -1", "bench", TINY),
    flag("batch_size", 0, "batch_size must be in [1, 1048576], got 0", "bench", TINY),
    flag("beta2", 2, "beta2 must be in [0, 1), got 2.0", "bench", TINY),
    # --- export.py
    Row("export-no-target", "export", ["--out_dir={run}"], "pass --hf_dir=DIR"),
    flag("which", "first", "which must be one of best, latest", "export", ["--out_dir={run}", "--hf_dir={tmp}/hf"]),
    flag("hf", "x", "unknown config key 'hf'; did you mean 'hf_dir'?", "export", ["--out_dir={run}"]),
    Row("export-no-checkpoint", "export", ["--out_dir={tmp}", "--hf_dir={tmp}/hf"], "no checkpoint in {tmp}",
        early=False),
    Row("export-hf_dir-not-empty", "export", ["--out_dir={run}", "--hf_dir={tmp}/hf"],
        "{tmp}/hf is not empty; export to a new directory, or pass --overwrite=True", mkdir("hf", {"a.txt": b"mine"})),
    Row("export-jaxgpt_dir-holds-a-run", "export", ["--out_dir={run}", "--jaxgpt_dir={tmp}/other"],
        "{tmp}/other already holds a run; export to a new directory, or pass --overwrite=True",
        write("other/checkpoints/latest/keep", b"1")),
    Row("export-onto-its-own-run", "export", ["--out_dir={run}", "--jaxgpt_dir={run}", "--overwrite=True"],
        "{run} already holds a run; export to a new directory (it holds the run being exported"),
    Row("export-hf_dir-is-a-file", "export", ["--out_dir={run}", "--hf_dir={tmp}/f"], "--hf_dir={tmp}/f is a file",
        write("f", "x")),
    # --- runs and their directories: a fresh run never replaces a run; one trainer per out_dir
    Row("train-fresh-run-over-a-run", "train", T + ["--init_from=scratch"],
        "{run} already holds a run (latest checkpoint at iter 4); continue it with --init_from=resume, or pass "
        "--overwrite=True"),
    Row("train-finetune-over-a-run", "train", T + ["--init_from={run}"],
        "{run} already holds a run (latest checkpoint at iter 4); continue it with --init_from=resume"),
    Row("train-locked-out_dir", "train", T + ["--out_dir={tmp}/out", "--init_from=scratch"],
        "{tmp}/out is in use by another training process (pid", locked("out"), early=False),
    # --- python -m jaxgpt.prepare
    Row("prepare-val_fraction", "prepare", P + ["--val_fraction", "1.5"], "val_fraction must be in (0, 1), got 1.5"),
    Row("prepare-val_fraction-type", "prepare", P + ["--val_fraction", "abc"], "val_fraction expects a number, got 'abc'"),
    Row("prepare-workers", "prepare", P + ["--workers", "-1"], "workers must be in [0, 1024], got -1"),
    Row("prepare-tokenizer", "prepare", P + ["--tokenizer", "bpe"], "tokenizer must be one of char, gpt2; got 'bpe'"),
    Row("prepare-unknown-flag", "prepare", P + ["--vocab", "3"], "unknown config key 'vocab'"),
    Row("prepare-no-data_dir", "prepare", ["--input", "{corpus}"], "data_dir is empty; pass where to write it"),
    Row("prepare-data_dir-is-a-file", "prepare", ["--input", "{corpus}", "--data_dir", "{tmp}/f"],
        "data_dir {tmp}/f is a file", write("f", "x")),
    Row("prepare-input-missing", "prepare", ["--input", "{tmp}/none", "--data_dir", "{tmp}/d"],
        "input file not found: {tmp}/none"),
    Row("prepare-empty-directory", "prepare", ["--input", "{tmp}/src", "--data_dir", "{tmp}/d"],
        "no file in {tmp}/src matches", mkdir("src")),
    Row("prepare-bad-glob", "prepare", ["--input", "{tmp}/src", "--data_dir", "{tmp}/d", "--exclude", "[9-0]*"],
        "the glob '[9-0]*' is malformed", mkdir("src", {"a.txt": b"hello"})),
    Row("prepare-utf32", "prepare", ["--input", "{tmp}/u.txt", "--data_dir", "{tmp}/d"], "{tmp}/u.txt is UTF-32 text",
        write("u.txt", UTF32)),
    Row("prepare-gpt2-utf16", "prepare", ["--input", "{tmp}/u.txt", "--data_dir", "{tmp}/d", "--tokenizer", "gpt2"],
        "{tmp}/u.txt is UTF-16 text", write("u.txt", UTF16)),
    # --- a few as real processes: the module entry point and the one-line exit
    Row("prepare-process", "-m jaxgpt.prepare", ["--input", "{corpus}"], "data_dir is empty; pass where to write it",
        subprocess=True),
    Row("sample-process", "sample.py", ["--out_dir={run}", "--top_p=7"], "top_p must be in (0, 1], got 7.0",
        subprocess=True),
]


# --------------------------------------------------------------------------- the test

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run (iters 0, 2, 4) and the hashes of every file under its out_dir."""
    tmp = tmp_path_factory.mktemp("run")
    corpus = tmp / "corpus.txt"
    corpus.write_text(make_corpus(), encoding="utf-8")
    cfg = parse_args(tiny_args(tmp, str(corpus), max_iters=4, eval_interval=2))
    train(cfg, log=lambda s: None)
    return {"run": cfg.out_dir, "data": cfg.data_dir, "corpus": str(corpus)}, hashes(cfg.out_dir)


def hashes(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: COMPILES.append(kw.get("fun_name")) if event.endswith("backend_compile_duration") else None)


@pytest.mark.parametrize("row", [pytest.param(r, marks=pytest.mark.slow) if r.subprocess else r for r in ROWS],
                         ids=[r.id for r in ROWS])  # slow: the rows run as processes
def test_bad_input(row: Row, run, tmp_path, capsys):
    paths, first = run
    before = hashes(paths["run"])
    assert before == first, "an earlier row changed the run's out_dir"
    fill = lambda s: s.format(**paths, tmp=tmp_path)  # noqa: E731
    cleanup = row.setup(tmp_path, Path(paths["data"])) if row.setup else None
    try:
        code, err = _run_row(row, [fill(a) for a in row.argv], capsys)
    finally:
        if callable(cleanup):
            cleanup()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == row.code, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fill(row.expect) in lines[0], lines[0]
    assert hashes(paths["run"]) == before, "the run's out_dir changed"


def _run_row(row: Row, argv: list[str], capsys) -> tuple[int, str]:
    if row.subprocess:
        r = run_python([*row.script.split(), *argv], timeout=120, env=subprocess_env())
        code, err = r.returncode, r.stderr
    else:
        capsys.readouterr()
        compiles = len(COMPILES)
        code = SCRIPTS[row.script](argv)
        err = capsys.readouterr().err
        if row.early:
            assert COMPILES[compiles:] == [], f"compiled before refusing: {COMPILES[compiles:]}"
    return code, err


def test_the_table_covers_every_script_and_enough_rows():
    assert len(ROWS) >= 60 and len({r.id for r in ROWS}) == len(ROWS)
    assert {r.script for r in ROWS} >= set(SCRIPTS)


def test_every_key_has_a_rule():
    """A key added without a rule fails here (bool keys need none: their type is their range); the
    defaults pass their own rules. (Every key's help line: tests/test_front_door.py.)"""
    from jaxgpt.config import declared, rules_of, validate_fields

    for cls in entry_points().values():
        missing = [f.name for f in declared(cls) if f.name not in rules_of(cls) and f.type not in (bool, "bool")]
        assert not missing, f"{cls.__name__}: keys without a rule: {missing}"
        validate_fields(cls(), {**rules_of(cls), **dict.fromkeys(("out_dir", "data_dir", "input", "nproc", "data"),
                                                                 lambda k, v: None)})  # defaults pass


def test_an_interrupted_prepare_leaves_no_prepared_data(tmp_path, monkeypatch):
    """prepare writes train.bin, val.bin under temporary names and meta.json last: a prepare that
    dies midway leaves a data_dir that counts as unprepared (and is prepared again), never half of one."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_corpus(), encoding="utf-8")
    d = tmp_path / "d"
    prepare_lib.prepare(str(corpus), str(d), verbose=False)
    assert prepare_lib.is_prepared(str(d))

    def die(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_lib, "encode_chars", die)
    with pytest.raises(KeyboardInterrupt):
        prepare_lib.prepare(str(corpus), str(d), verbose=False)
    assert not prepare_lib.is_prepared(str(d)) and not any(p.name.endswith(".part") for p in d.iterdir())
    monkeypatch.undo()
    meta = prepare_lib.ensure_prepared(str(d), "mine", str(corpus))
    assert meta["train_tokens"] > 0 and prepare_lib.is_prepared(str(d))
