"""Loading a model: any model a user can name, ready for sampling, export or as a starting point.

    graphdef, params, model_cfg, tokenizer, meta = load("out")   # or "gpt2", a HF dir, a ckpt.pt
    weights = load_weights("out")                                 # the same, as a GPT-2 weight table

`load` is the one way to get a model for sampling, export or evaluation: a jaxgpt out_dir (its
checkpoint; a LoRA or QLoRA run's adapters merged into their base), a GPT-2 name, a Hugging Face GPT-2
directory or a nanoGPT ckpt.pt. `load_weights` is what init_from and a LoRA base read. checkpoint.py
and pretrained.py below know nothing of each other; this module is where a run directory, LoRA and
pretrained weights meet. It imports nothing of training but the state's shape (jaxgpt.step).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import lora, parallel, pretrained
from jaxgpt.checkpoint import Checkpointer, checkpoint_dir, listed_steps, readable
from jaxgpt.config import Config
from jaxgpt.errors import UserError
from jaxgpt.model import ModelConfig, abstract_model, with_attention
from jaxgpt.quant import quantize_stream
from jaxgpt.runtime import resolve_dtype
from jaxgpt.step import abstract_state
from jaxgpt.tokenizer import tokenizer_from_meta


def newest_meta(out_dir: str) -> dict[str, Any] | None:
    """The metadata of out_dir's newest latest checkpoint that reads back, else of its newest best
    one (what resume falls back to when every latest checkpoint is damaged), or None. Creates nothing."""
    listed = listed_steps(out_dir)
    for kind in ("latest", "best"):
        if not listed[kind]:
            continue
        ckpt = Checkpointer(out_dir, kind, reader=True)
        try:
            meta = ckpt.newest_meta()
        finally:
            ckpt.close()
        if meta is not None:
            return meta
    return None


def has_checkpoint(out_dir: str) -> bool:
    return newest_meta(out_dir) is not None


def grow_vocab(params: dict, vocab_size: int | None) -> dict:
    """params with the token embedding (and an untied head) grown to vocab_size rows when it has fewer:
    room for a chat template's tokens (jaxgpt.chat). The new rows are the mean row plus noise of the
    rows' spread, from a generator seeded by the old size: the same rows every time, so a LoRA base
    (frozen, never checkpointed) grows the same way when a run resumes or its model is loaded."""
    wte = np.asarray(params["wte"]["embedding"])
    if not vocab_size or vocab_size <= wte.shape[0]:
        return params

    def grown(m):  # m (V0, C) -> (vocab_size, C)
        noise = np.random.default_rng(m.shape[0]).standard_normal((vocab_size - m.shape[0], m.shape[1]))
        return np.concatenate([m, (m.mean(0) + noise * m.std()).astype(m.dtype)])

    out = {**params, "wte": {**params["wte"], "embedding": grown(wte)}}
    if "lm_head" in params:  # an untied head's kernel (C, V0)
        out["lm_head"] = {**params["lm_head"], "kernel": grown(np.asarray(params["lm_head"]["kernel"]).T).T}
    return out


def base_params(w: pretrained.Weights, block_size: int, quant: str = "",
                vocab_size: int | None = None) -> tuple[dict, str]:
    """A frozen LoRA base's parameters and its fingerprint (lora.fingerprint of the float weights).

    quant ('nf4' | 'int8'): QLoRA. The blocks' Linear kernels (lora.quantizable) are quantized as
    they stream past, one at a time, and the fingerprint is collected on the way; with a lazily
    read table (a safetensors directory, pretrained.load_weights(lazy=True)) no more than one
    float layer (and the float embeddings, norms and biases, which stay float32) is ever held.
    Other sources were read whole before this (a nanoGPT ckpt.pt, pytorch_model.bin, a jaxgpt
    out_dir); the float table is then dropped by the caller once the quantized base exists.
    vocab_size: grow the embedding to it (grow_vocab; the fingerprint is the source's, before)."""
    if not quant:
        params = pretrained.to_params(w, block_size)
        return grow_vocab(params, vocab_size), lora.fingerprint(params)
    stats: dict = {}

    def tracked():
        for path, x in pretrained.iter_params(w, block_size):
            node = stats
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = lora.leaf_stat(x)
            yield path, x
            del x  # before the next layer is read: only the consumer may still hold this one

    params = quantize_stream(tracked(), lora.quantizable, quant)
    return grow_vocab(params, vocab_size), lora.fingerprint(stats=stats)


def is_run_dir(path: str) -> bool:
    """A jaxgpt out_dir (it also holds a config.json, its train config: test this first)."""
    return os.path.isdir(os.path.join(os.path.expanduser(path), "checkpoints"))


def load(source: str, prefer: str = "best", dtype: str = "auto", run: bool = False, log=None, meta_pkl: str = ""):
    """Any model a user can name, ready for sampling or export: a jaxgpt out_dir (its newest
    intact `prefer` checkpoint, else the other kind's; a LoRA run's adapters merged into its base),
    a GPT-2 name, a Hugging Face GPT-2 directory or a nanoGPT ckpt.pt.

    Returns (graphdef, params, ModelConfig, tokenizer, meta); `nnx.merge(graphdef, params)` is the
    model. A run computes in the dtype it recorded; weights from elsewhere in `dtype` ('auto':
    bfloat16 on GPUs and TPUs, float32 on CPUs). The tokenizer is the source's own (a run's, an
    exported directory's jaxgpt_tokenizer.json or vocab.json + merges.txt, a nanoGPT ckpt.pt's
    meta.pkl, found as pretrained.read_nanogpt says or given as `meta_pkl`), else GPT-2's BPE, as
    nanoGPT assumes for its checkpoints without a meta.pkl (pretrained.source_tokenizer).
    meta is a run's checkpoint metadata, else {"source": source}. run=True: `source` must be a
    run (an --out_dir), and one without checkpoints is reported as such. A damaged checkpoint is
    skipped, never moved or deleted; `log` (default: stderr) says which one was used instead."""
    if run or is_run_dir(source):
        _no_meta_pkl(source, meta_pkl)
        return _load_run(os.path.expanduser(source), prefer, log)
    params, cfg, w = pretrained.load_params(source, dtype=resolve_dtype(dtype), meta_pkl=meta_pkl)
    cfg = with_attention(cfg)
    tokenizer = pretrained.source_tokenizer(w)
    return abstract_model(cfg)[0], jax.tree.map(jnp.asarray, params), cfg, tokenizer, {"source": source}


def _no_meta_pkl(source: str, meta_pkl: str) -> None:
    if meta_pkl:
        raise UserError(f"--meta_pkl gives the characters of a nanoGPT ckpt.pt, and {source} is a jaxgpt "
                        f"out_dir (its checkpoints hold their tokenizer); drop --meta_pkl")


def _load_run(out_dir: str, prefer: str, log=None):
    """The newest checkpoint that reads back whole: `prefer` first, then the other kind."""
    skipped = []
    for ckpt, step in readable(out_dir, prefer):
        try:
            graphdef, state, meta, model_cfg = read_checkpoint(ckpt, step)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 -- any read failure means a damaged checkpoint
            skipped.append(f"{ckpt.kind} iter {step} ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})")
            continue
        if skipped:
            (log or (lambda m: print(m, file=sys.stderr)))(
                f"warning: skipped unreadable checkpoint(s) in {out_dir}: {'; '.join(skipped)}; "
                f"using the {ckpt.kind} checkpoint at iter {step}")
        break
    else:
        raise UserError(f"no intact checkpoint in {out_dir}: every one is damaged ({'; '.join(skipped)}); "
                        f"train again with --overwrite=True, or restore the directory from a copy")
    # every process of a job read on its own: they must have read the same checkpoint
    parallel.agree_on(f"{os.path.abspath(out_dir)} {ckpt.kind} {step}",
                      f"the processes read different checkpoints of {out_dir} (this one: {ckpt.kind} iter {step}); "
                      f"every process must see the same files (a shared disk) and none may be damaged")
    params, base = state.params, meta.get("lora_base")
    if base:
        # a QLoRA base is quantized as when it trained, then dequantized by the merge: the model the
        # adapters were trained with, in float32
        frozen, digest = base_params(load_weights(base["source"], lazy=True), model_cfg.block_size,
                                     model_cfg.base_quant, vocab_size=model_cfg.vocab_size)
        lora.check_base(base, digest=digest)
        params, model_cfg = lora.merge(lora.join(params, frozen), model_cfg)
        graphdef = abstract_model(model_cfg)[0]
    return graphdef, params, model_cfg, tokenizer_from_meta(meta["tokenizer"]), meta


def read_checkpoint(ckpt: Checkpointer, step: int):
    """(graphdef, state, meta, ModelConfig) of one checkpoint, restored onto one device."""
    meta = ckpt.restore_meta(step)
    # the attention implementation is the one that works here, not where the run trained
    model_cfg = with_attention(ModelConfig.from_dict(meta["model_config"]))
    train_cfg = Config(**{k: v for k, v in meta["train_config"].items() if k in Config.__dataclass_fields__})
    graphdef, abstract, _ = abstract_state(model_cfg, train_cfg)
    abstract = abstract.replace(frozen={})  # checkpoints never hold a frozen LoRA base
    one = parallel.local_mesh()  # onto one of this process's devices, whatever mesh the run was trained on
    state, meta = ckpt.restore(parallel.with_shardings(abstract, parallel.state_shardings(abstract, one)), step)
    tokenizer_from_meta(meta["tokenizer"])  # damaged tokenizer metadata is a damaged checkpoint too
    return graphdef, state, meta, model_cfg


def load_weights(source: str, lazy: bool = False, meta_pkl: str = "") -> pretrained.Weights:
    """pretrained.load_weights, and a jaxgpt out_dir's best (else latest) weights as the same table,
    with its tokenizer (lazy, meta_pkl: see pretrained.load_weights; an out_dir is read whole)."""
    if not is_run_dir(source):
        return pretrained.load_weights(source, lazy=lazy, meta_pkl=meta_pkl)
    _no_meta_pkl(source, meta_pkl)
    _, params, model_cfg, _, meta = _load_run(os.path.expanduser(source), "best")
    if model_cfg.model_type != "gpt":
        raise UserError(f"{source} holds a {model_cfg.model_type} model; only GPT models can be a starting point")
    tok = meta["tokenizer"]
    if model_cfg.non_gpt2_options():  # no GPT-2 names for it: the run's own parameter tree
        return pretrained.Weights({}, n_head=model_cfg.n_head, gelu=model_cfg.gelu, source=source, tokenizer_meta=tok,
                                  params=jax.tree.map(np.asarray, params), model_config=model_cfg.to_dict())
    tensors = pretrained.from_params(jax.tree.map(np.asarray, params), model_cfg.n_layer, model_cfg.bias)
    if not model_cfg.bias:  # keep a bias-free model bias-free (from_params fills in zeros for export)
        tensors = {k: v for k, v in tensors.items() if not k.endswith(".bias")}
    return pretrained.Weights(tensors, n_head=model_cfg.n_head, gelu=model_cfg.gelu, source=source,
                              tokenizer_meta=meta["tokenizer"])


def quantized_base(meta: dict[str, Any]) -> dict[str, str] | None:
    """{"quant", "source"} when a run's weights were trained against a quantized base (a QLoRA run,
    or a standalone export of one), else None: export says so, since the merged float weights are
    the dequantized base plus the adapters, not the original base plus the adapters."""
    base = meta.get("lora_base") or {}
    if base.get("quant"):
        return {"quant": base["quant"], "source": base["source"]}
    return meta.get("qlora_base")


def save_standalone(out_dir: str, params, model_cfg, meta: dict[str, Any], name: str = "") -> None:
    """Writes params as an ordinary jaxgpt run (a latest checkpoint, with a fresh optimizer state
    so it can be resumed or finetuned further): what export.py writes for a merged LoRA run.
    `name`: the out_dir the run will be known by, when out_dir is a temporary directory."""
    if os.path.isdir(checkpoint_dir(out_dir, "latest")):
        raise UserError(f"{out_dir} already holds a run; export to a new directory")
    from jaxgpt.optim import make_optimizer  # training's, only for a run written here
    from jaxgpt.step import state_from_params

    train_cfg = {**meta["train_config"], "finetune_method": "full", "out_dir": name or out_dir}
    cfg = Config(**{k: v for k, v in train_cfg.items() if k in Config.__dataclass_fields__})
    state = jax.jit(lambda p: state_from_params(p, make_optimizer(cfg)))(params)
    new_meta = {**meta, "model_config": dataclasses.asdict(model_cfg), "train_config": train_cfg, "lora_base": None,
                "exported_from": meta.get("exported_from", meta["train_config"]["out_dir"]),
                "qlora_base": quantized_base(meta)}
    ckpt = Checkpointer(out_dir, "latest")
    ckpt.save(meta["step"], state, new_meta)
    ckpt.wait()
    ckpt.close()
