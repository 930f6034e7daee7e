"""Shared fixtures: a small synthetic corpus and a tiny config, so tests run fast on a CPU; what
the suite needs to run on a GPU too (precision of numeric tests, memory of subprocesses)."""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Many tests compile the same tiny programs; a compilation cache shared by the session (and by
# the subprocesses it starts, through the environment) compiles each once. Set before JAX starts.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxgpt-test-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# On a GPU each JAX process takes 75% of the GPU's memory at start, so the subprocesses the tests
# start (train.py, sample.py, workers) would find none left: allocate on demand, here and in them.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402  (after the settings above, which JAX reads at start)


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def subprocess_env(**extra) -> dict[str, str]:
    """The environment for a JAX subprocess: GPU memory allocated on demand, plus `extra` (e.g.
    JAX_PLATFORMS="cpu" for a test about CPU devices, so it runs on them also beside a GPU)."""
    return {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", **extra}


@pytest.fixture
def exact_f32():
    """float32 matmuls computed in float32 for the test: what a comparison of float32 results at
    tolerances near 1e-6 needs. NVIDIA GPUs otherwise compute them in TF32 (a 10-bit mantissa,
    errors near 1e-3); CPUs compute float32 exactly in any case, so there nothing changes."""
    with jax.default_matmul_precision("highest"):
        yield

WORDS = ("to be or not that is the question whether tis nobler in mind suffer slings and arrows "
         "of outrageous fortune take arms against a sea troubles ROMEO JULIET KING").split()


def make_corpus(n_words: int = 6000, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    lines, words = [], rng.choice(WORDS, size=n_words)
    for i in range(0, n_words, 8):
        lines.append(" ".join(words[i:i + 8]) + ("." if i % 3 else ","))
    return "\n".join(lines) + "\n"


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(make_corpus(), encoding="utf-8")
    return str(path)


def tiny_args(tmp_path, corpus_file, **overrides) -> list[str]:
    """--key=value flags for a 2-layer, 32-channel GPT on the synthetic corpus."""
    base = dict(out_dir=str(tmp_path / "out"), data_dir=str(tmp_path / "data"), input_file=corpus_file,
                n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, eval_iters=2,
                eval_interval=5, log_interval=1, max_iters=10, warmup_iters=2, lr_decay_iters=10,
                learning_rate=1e-2, min_lr=1e-3, dropout=0.0)
    base.update(overrides)
    return [f"--{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """A GPT-2-format directory as transformers' save_pretrained writes it (2 layers, 32 channels,
    context 64, random weights) with its own small BPE files: GPT-2 weights for offline tests."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from bpe_fixture import train_tiny_bpe, write_hf_tokenizer_files

    d = tmp_path_factory.mktemp("hf")
    enc = train_tiny_bpe(make_corpus(), n_merges=150)
    write_hf_tokenizer_files(enc, d)
    cfg = transformers.GPT2Config(vocab_size=enc.n_vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                  bos_token_id=enc.eot_token, eos_token_id=enc.eot_token)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
    return d


def entry_points() -> dict:
    """Every entry point's command -> the dataclass its flags fill (one declaration per key)."""
    import bench
    import eval as eval_script
    import export
    import sample
    import serve

    from jaxgpt.config import Config
    from jaxgpt.launch import LaunchConfig
    from jaxgpt.prepare import PrepareConfig

    return {"train.py": Config, "sample.py": sample.SampleConfig, "export.py": export.ExportConfig,
            "bench.py": bench.BenchConfig, "eval.py": eval_script.EvalConfig,
            "serve.py": serve.ServeConfig, "-m jaxgpt.prepare": PrepareConfig, "-m jaxgpt.launch": LaunchConfig}


# the files whose module fixtures take longest (an 8-device worker, jobs of several processes) run
# first, so that with two xdist workers (pyproject: --dist loadfile) no long file starts last
SLOW_FILES = ("test_parallel.py", "test_multiprocess.py")


def pytest_collection_modifyitems(session, config, items):
    slow = lambda item: item.path.name not in SLOW_FILES  # noqa: E731  (False sorts first)
    items.sort(key=slow)  # a stable sort: every other test keeps its order


def pytest_sessionfinish(session, exitstatus):
    """Removes the session's compilation cache (only the one made above, never a user's), in the
    main pytest process only: with pytest-xdist its workers share the cache and end at different times."""
    if hasattr(session.config, "workerinput"):
        return
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
    if os.path.basename(cache).startswith("jaxgpt-test-xla-cache-"):
        import shutil

        shutil.rmtree(cache, ignore_errors=True)
