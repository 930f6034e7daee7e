"""Helpers shared by several test files (no test file imports another): the scripts as processes,
a run's checkpoint read back directly, what sample.py must print, parameter trees compared, and
GPT-2 weights in nanoGPT's ckpt.pt layout. Fixtures and the corpus are in conftest.py."""

import json
import os
import select
import signal
import subprocess
import sys
import tempfile

import jax
import numpy as np
from flax import nnx

from conftest import ROOT, subprocess_env
from jaxgpt.checkpoint import Checkpointer
from jaxgpt.config import Config
from jaxgpt.model import ModelConfig
from jaxgpt.sampling import Engine
from jaxgpt.step import abstract_state
from jaxgpt.tokenizer import tokenizer_from_meta


def evaluations(out_dir):
    """metrics.jsonl's evaluation rows (kind "eval"), in order; the log steps' rows are left out."""
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["kind"] == "eval"]


def log_rows(out_dir):
    """metrics.jsonl's log-step rows (kind "train"), in order."""
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["kind"] == "train"]


def run_script(*args, cwd=ROOT, env=None):
    return run_python(list(args), cwd=cwd, env=env or subprocess_env(), timeout=300)


ZYGOTE = os.path.join(ROOT, "tests", "zygote.py")
_zygotes: dict = {}  # what the zygotes started with (the import-time environment) -> the process


def _import_time_env(env: dict) -> tuple:
    from zygote import IMPORT_TIME_ENV

    return tuple(sorted((k, v) for k, v in env.items() if k.startswith(IMPORT_TIME_ENV)))


def _read_reply(fd: int, buf: bytearray, timeout: float | None) -> dict:
    while b"\n" not in buf:
        if not select.select([fd], [], [], timeout)[0]:
            raise TimeoutError
        chunk = os.read(fd, 4096)
        if not chunk:
            raise RuntimeError("the zygote process ended")
        buf.extend(chunk)
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return json.loads(line)


def run_python(args: list[str], *, cwd=ROOT, env: dict | None = None, timeout: float = 300
               ) -> subprocess.CompletedProcess:
    """`python ARGS` (a script and its arguments, or -m MODULE ...) as subprocess.run(capture_output=True,
    text=True) gives it, started as a fork of tests/zygote.py (the imports done once per pytest
    worker) where the import-time environment allows, else as a fresh process."""
    env = dict(os.environ if env is None else env)
    if not args or not (args[0].endswith(".py") or args[0] == "-m"):
        return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    key = _import_time_env(env)
    z = _zygotes.get(key)
    if z is None or z[0].poll() is not None:
        proc = subprocess.Popen([sys.executable, ZYGOTE], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, bufsize=0)
        z = _zygotes[key] = (proc, bytearray())
    proc, buf = z
    with tempfile.TemporaryDirectory() as d:
        out, err = os.path.join(d, "stdout"), os.path.join(d, "stderr")
        req = {"argv": args, "cwd": str(cwd), "env": env, "stdout": out, "stderr": err}
        proc.stdin.write((json.dumps(req) + "\n").encode())
        pid = _read_reply(proc.stdout.fileno(), buf, 120)["pid"]
        try:
            code = _read_reply(proc.stdout.fileno(), buf, timeout)["returncode"]
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            _read_reply(proc.stdout.fileno(), buf, 60)
            raise subprocess.TimeoutExpired([sys.executable, *args], timeout) from None
        with open(out, encoding="utf-8", errors="replace") as f_out, \
                open(err, encoding="utf-8", errors="replace") as f_err:
            return subprocess.CompletedProcess([sys.executable, *args], code, f_out.read(), f_err.read())


SEP = "---------------\n"  # what sample.py prints after each sample


def restore_params(out_dir, which="best"):
    """(graphdef, params, model config, tokenizer) of a run's newest `which` checkpoint, read directly
    (a LoRA run's params are then its adapters only)."""
    ckpt = Checkpointer(out_dir, which)
    meta = ckpt.restore_meta()
    model_cfg = ModelConfig.from_dict(meta["model_config"])
    train_cfg = Config(**{k: v for k, v in meta["train_config"].items() if k in Config.__dataclass_fields__})
    graphdef, abstract, _ = abstract_state(model_cfg, train_cfg)
    state, _ = ckpt.restore(abstract.replace(frozen={}))
    ckpt.close()
    return graphdef, state.params, model_cfg, tokenizer_from_meta(meta["tokenizer"])


def engine_texts(out_dir, start, *, max_new_tokens, num_samples, temperature=0.8, top_k=200, top_p=1.0,
                 seed=1337, stop="", which="best"):
    """The text sample.py must print after the prompt (its defaults as the defaults here): the library's
    Engine with the same seed and settings on the checkpoint's weights, restored here without load_model;
    each sample cut at `stop`."""
    graphdef, params, model_cfg, tok = restore_params(out_dir, which)
    result = Engine(graphdef, params, model_cfg.block_size, vocab_size=tok.vocab_size).generate(
        tok.encode(start), max_new_tokens=max_new_tokens, num_samples=num_samples, temperature=temperature,
        top_k=top_k, top_p=top_p, key=jax.random.key(seed), stop=tok.encode(stop) if stop else None)
    texts = [tok.decode(row) for row in result.tokens[:, :result.decoded]]
    return [t[:t.index(stop)] if stop and stop in t else t for t in texts]


# the small base model of the LoRA and QLoRA tests
BASE = ModelConfig(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True)


def pure(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def leaves_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


NANOGPT_CTX = 32  # the causal-mask buffers' size in nanogpt_ckpt (test_pretrained's models' context)


def nanogpt_ckpt(hf_model, path, compiled=True):
    """The same weights in nanoGPT's ckpt.pt layout: nn.Linear (out, in), `_orig_mod.` from
    torch.compile, the causal-mask buffers, the tied lm_head, and model_args."""
    import torch

    state = {}
    for k, v in hf_model.state_dict().items():
        if k.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
            v = v.t().contiguous()
        state[("_orig_mod." if compiled else "") + k] = v
    for i in range(hf_model.config.n_layer):
        state[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, NANOGPT_CTX, NANOGPT_CTX))
    c = hf_model.config
    torch.save({"model": state, "model_args": dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                                                   block_size=c.n_positions, bias=True, vocab_size=c.vocab_size,
                                                   dropout=0.0),
                "iter_num": 5, "best_val_loss": torch.tensor(2.0), "config": {"dataset": "x"}}, path)
