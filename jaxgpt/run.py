"""Everything that turns a config (or a name) into something ready to run.

    run = setup(cfg)                  # data, model config, mesh, init_from weights, resume metadata
    state, best_val = start_state(run, ...)   # scratch, pretrained, LoRA around a frozen base, or resumed
    graphdef, params, model_cfg, tokenizer, meta = load("out")   # or "gpt2", a HF dir, a ckpt.pt

`load` is the one way to get a model for sampling, export or `init_from`: a jaxgpt out_dir (its
checkpoint; a LoRA or QLoRA run's adapters merged into their base), a GPT-2 name, a Hugging Face GPT-2
directory or a nanoGPT ckpt.pt. checkpoint.py and pretrained.py below know nothing of each other;
this module is where a run directory, LoRA and pretrained weights meet.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxgpt import data as data_lib
from jaxgpt import lora, parallel, prepare, pretrained
from jaxgpt.checkpoint import Checkpointer, NoIntactCheckpoint, checkpoint_dir, listed_steps, readable
from jaxgpt.config import GPT2_SIZES, Config
from jaxgpt.errors import UserError
from jaxgpt.model import MODERN_KEYS, ModelConfig, abstract_model, model_config, with_attention
from jaxgpt.optim import make_optimizer
from jaxgpt.quant import quantize_stream
from jaxgpt.runtime import resolve_dtype
from jaxgpt.step import abstract_state, init_state, state_from_params
from jaxgpt.tokenizer import tokenizer_from_meta

# settings that shape the model: a resumed run must keep them (dtype, attn_impl, device counts may
# change, e.g. when a run moves from a GPU to a CPU)
ARCH_KEYS = ("model_type", "block_size", "n_layer", "n_head", "n_embd", "bias",
             *(k for k in MODERN_KEYS if k != "zero_init_proj"))  # an init only: no need to match




def run_keys(seed: int) -> dict[str, jax.Array]:
    """Every random stream of a run, derived from the seed (the run's whole RNG state)."""
    root = jax.random.key(seed)
    return {name: jax.random.fold_in(root, i) for i, name in enumerate(("init", "data", "dropout", "eval"))}




@dataclass
class Run:
    """What a training run is made of, before the loop starts."""
    cfg: Config
    model_cfg: ModelConfig
    tok_meta: dict[str, Any]
    batches: dict[str, Callable]  # split -> batch(key, i) with accumulation steps
    eval_batches: dict[str, Callable]  # split -> batch(key, i) with a single micro-batch
    mesh: Mesh
    init_params: dict | None = None  # init_from weights (numpy, host); with LoRA the frozen base
    # (QLoRA: its Linear kernels quantized, as QTensors of device arrays)
    lora_base: dict | None = None  # LoRA: {"source": where the base comes from, "fingerprint": ..., "quant": ...}
    origin: str = "scratch"  # where the run's weights started (init_from of its first start), kept on resume


def padded_vocab(meta: dict[str, Any]) -> int:
    """A BPE vocabulary trained from scratch is padded to a multiple of 64 (50257 -> 50304), which
    makes the embedding and head matmuls faster; padded ids never occur in the data. A char
    vocabulary is left exact."""
    v = meta["vocab_size"]
    return v if meta["tokenizer"] == "char" else -(-v // 64) * 64


def newest_meta(out_dir: str) -> dict[str, Any] | None:
    """The metadata of out_dir's newest latest checkpoint that reads back, else of its newest best
    one (what resume falls back to when every latest checkpoint is damaged), or None. Creates nothing."""
    listed = listed_steps(out_dir)
    for kind in ("latest", "best"):
        if not listed[kind]:
            continue
        ckpt = Checkpointer(out_dir, kind, create=False)
        try:
            meta = ckpt.newest_meta()
        finally:
            ckpt.close()
        if meta is not None:
            return meta
    return None


def has_checkpoint(out_dir: str) -> bool:
    return newest_meta(out_dir) is not None


def check_fresh_run(cfg: Config) -> None:
    """A fresh run (anything but resume) never starts over a run's checkpoints unless told to
    (overwrite=True); eval_only writes nothing, so it may read any out_dir. Reads directory names
    only, so it is cheap and changes nothing."""
    if cfg.init_from in ("resume", "auto") or cfg.overwrite or cfg.eval_only:
        return
    steps = listed_steps(cfg.out_dir)
    if steps["latest"] or steps["best"]:
        kind = "latest" if steps["latest"] else "best"
        raise UserError(f"{cfg.out_dir} already holds a run ({kind} checkpoint at iter {steps[kind][0]}); continue it "
                        f"with --init_from=resume, or pass --overwrite=True to start over and delete it")


RUN_FILES = ("checkpoints", "metrics.jsonl", "loss.png")


def clear_run(out_dir: str, log=print) -> None:
    """overwrite=True on an out_dir that holds a run: deletes its checkpoints, metrics and plot."""
    gone = [n for n in RUN_FILES if os.path.lexists(os.path.join(out_dir, n))]
    for name in gone:
        path = os.path.join(out_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if gone:
        log(f"overwrite=True: deleted the earlier run's {', '.join(gone)} in {out_dir}")


def setup(cfg: Config, log=print) -> Run:
    """Resolves where the model comes from (scratch, a checkpoint to resume, or pretrained
    weights), prepares the data with the matching tokenizer, and builds the batch functions."""
    cfg.validate()
    if cfg.init_from == "auto":  # the command a preemptible VM reruns: resume if there is a run
        cfg.init_from = "resume" if has_checkpoint(cfg.out_dir) else "scratch"
        log(f"init_from=auto: {'resuming the run in' if cfg.init_from == 'resume' else 'no checkpoint yet in'} "
            f"{cfg.out_dir}" + ("" if cfg.init_from == "resume" else "; starting from scratch"))
    check_fresh_run(cfg)
    mesh = parallel.make_mesh(cfg.sharding, cfg.mesh_shape)
    parallel.check_batch(mesh, cfg.batch_size)
    # 'auto' becomes the dtype for these devices, so config.json and the checkpoints record what ran
    cfg.dtype = resolve_dtype(cfg.dtype, mesh.devices.flat[0].platform)
    weights, ckpt_meta, tokenizer_dir, base_tok = None, None, cfg.tokenizer_dir, None
    if cfg.init_from == "resume":
        ckpt_meta = newest_meta(cfg.out_dir)
        if ckpt_meta is None:
            raise UserError(f"init_from=resume but {cfg.out_dir} has no checkpoint; "
                            f"train from scratch first or fix --out_dir")
        check_resume_compatible(cfg, ckpt_meta)
        if ckpt_meta.get("lora_base"):  # a LoRA run's checkpoints hold only the adapters
            weights = load_weights(ckpt_meta["lora_base"]["source"], lazy=True)
    elif pretrained.is_pretrained_source(cfg.init_from):
        weights = load_weights(cfg.init_from, lazy=bool(cfg.base_quant), meta_pkl=cfg.meta_pkl)
        # a base that says which tokenizer it reads (a jaxgpt run, an exported char model, a nanoGPT
        # ckpt.pt with its meta.pkl): the new data is encoded with that tokenizer; else BPE, as the
        # user names it (--tokenizer=gpt2, tiktoken's or --tokenizer_dir's)
        base_tok = weights.tokenizer_meta
        if base_tok is None and cfg.tokenizer != "gpt2":
            raise UserError(weights.tokenizer_error or f"init_from={cfg.init_from} holds GPT-2 weights, which read "
                                                       f"BPE tokens; pass --tokenizer=gpt2")
        if cfg.tokenizer == "gpt2" and not tokenizer_dir:
            tokenizer_dir = weights.tokenizer_dir  # a Hugging Face directory brings its BPE files
    data_dir = cfg.resolved_data_dir()
    include, exclude = cfg.globs()
    meta = parallel.process_zero_first(prepare.ensure_prepared, data_dir, cfg.dataset, cfg.input_file,
                                       tokenizer=cfg.tokenizer, tokenizer_dir=tokenizer_dir, include=include,
                                       exclude=exclude, tokenizer_meta=base_tok)
    if meta.get("tokenizer") != cfg.tokenizer:
        raise UserError(f"{data_dir} was prepared with the {meta.get('tokenizer')!r} tokenizer, not {cfg.tokenizer!r}; "
                        f"pass --tokenizer={meta.get('tokenizer')} or a --data_dir prepared for {cfg.tokenizer!r}")
    tok_meta = {k: v for k, v in meta.items() if k not in prepare.CORPUS_KEYS}
    runtime = dict(dropout=cfg.dropout, dtype=cfg.dtype)
    init_params, lora_base = None, None
    if ckpt_meta is not None:  # the architecture is the checkpoint's (checked against cfg above)
        model_cfg = with_attention(dataclasses.replace(ModelConfig.from_dict(ckpt_meta["model_config"]), **runtime),
                                   cfg.attn_impl, log)
        if weights is not None:
            init_params, digest = base_params(weights, model_cfg.block_size, model_cfg.base_quant)
            lora_base = lora.check_base(ckpt_meta["lora_base"], digest=digest)
    elif weights is not None:
        if cfg.model_type != "gpt":
            raise UserError(f"init_from={cfg.init_from} loads a GPT; drop --model_type={cfg.model_type}")
        if base_tok is not None and base_tok != tok_meta:
            raise UserError(f"{data_dir} was prepared with a different tokenizer than the base model in "
                            f"{cfg.init_from}; use a new --data_dir, which is then encoded with the base's tokenizer")
        lora_cfg = {}
        if cfg.adapters:
            lora_cfg = dict(lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                            lora_targets=cfg.lora_targets, base_quant=cfg.base_quant)
        model_cfg = with_attention(pretrained.weights_config(weights, block_size=cfg.block_size, **runtime, **lora_cfg),
                                   cfg.attn_impl, log)
        if lora_cfg:
            init_params, digest = base_params(weights, cfg.block_size, cfg.base_quant)
            source = cfg.init_from if cfg.init_from in GPT2_SIZES else os.path.abspath(cfg.init_from)
            lora_base = {"source": source, "fingerprint": digest, "quant": cfg.base_quant or None}
        else:
            init_params = pretrained.to_params(weights, cfg.block_size)
        if meta["vocab_size"] > model_cfg.vocab_size:
            raise UserError(f"the data's tokenizer has {meta['vocab_size']} tokens but the model in {cfg.init_from} "
                            f"only {model_cfg.vocab_size}; prepare the data with the model's tokenizer")
        log(f"init_from {cfg.init_from}: {model_cfg.n_layer} layers, {model_cfg.n_head} heads, "
            f"n_embd {model_cfg.n_embd}, vocab {model_cfg.vocab_size}, context {model_cfg.block_size} "
            f"(the config's model shape is not used)"
            + (f"; its tokenizer from {weights.tokenizer_file}" if weights.tokenizer_file else ""))
    else:
        model_cfg = model_config(cfg, padded_vocab(meta), log)
    batches, eval_batches = {}, {}
    for split in data_lib.SPLITS:
        tokens = data_lib.load_split(data_dir, split, meta)
        batches[split] = data_lib.make_batch_fn(tokens, cfg.batch_size, cfg.block_size, cfg.gradient_accumulation_steps,
                                                parallel.batch_sharding(mesh, 3))
        eval_batches[split] = data_lib.make_batch_fn(tokens, cfg.batch_size, cfg.block_size, 0,
                                                     parallel.batch_sharding(mesh, 2))
    origin = cfg.init_from if ckpt_meta is None else ckpt_meta.get("origin", ckpt_meta["train_config"]["init_from"])
    return Run(cfg, model_cfg, tok_meta, batches, eval_batches, mesh, init_params, lora_base, origin)


def base_params(w: pretrained.Weights, block_size: int, quant: str = "") -> tuple[dict, str]:
    """A frozen LoRA base's parameters and its fingerprint (lora.fingerprint of the float weights).

    quant ('nf4' | 'int8'): QLoRA. The blocks' Linear kernels (lora.quantizable) are quantized as
    they stream past, one at a time, and the fingerprint is collected on the way; with a lazily
    read table (a safetensors directory, pretrained.load_weights(lazy=True)) no more than one
    float layer (and the float embeddings, norms and biases, which stay float32) is ever held.
    Other sources were read whole before this (a nanoGPT ckpt.pt, pytorch_model.bin, a jaxgpt
    out_dir); the float table is then dropped by the caller once the quantized base exists."""
    if not quant:
        params = pretrained.to_params(w, block_size)
        return params, lora.fingerprint(params)
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
    return params, lora.fingerprint(stats=stats)


def check_resume_compatible(cfg: Config, ckpt_meta: dict[str, Any]) -> None:
    """The run's model-shaping settings must be the ones it was started with."""
    saved = ckpt_meta["train_config"]
    diffs = [f"{k}: checkpoint {saved[k]!r}, config {getattr(cfg, k)!r}"
             for k in ARCH_KEYS if k in saved and saved[k] != getattr(cfg, k)]
    if diffs:
        raise UserError("cannot resume: the model differs from the checkpoint's (" + "; ".join(diffs)
                        + "); use the run's original settings or a new --out_dir")


def check_same_tokenizer(ckpt_meta: dict[str, Any], tok_meta: dict[str, Any]) -> None:
    if ckpt_meta["tokenizer"] != tok_meta:
        raise UserError("cannot resume: the data's tokenizer differs from the checkpoint's; "
                        "point --data_dir at the data the run was trained on")


def start_state(run: Run, cfg: Config, abstract, optimizer, state_sh, ckpts: tuple[Checkpointer, ...], key,
                log=print):
    """The state the loop starts from, created directly in its shardings (no device ever holds a
    whole fsdp model), and the best val loss so far: resumed from the newest intact checkpoint of
    `ckpts` (latest, then best: a best checkpoint holds the whole state too), new adapters (B = 0)
    around the frozen base, pretrained weights with a fresh optimizer, or random. Checkpoints never
    hold a frozen LoRA base: it comes from its source (run.init_params, dropped here once the
    devices hold it, so the host does not keep a second copy of the base for the whole run)."""
    if cfg.init_from == "resume":
        for i, ckpt in enumerate(ckpts):
            try:
                state, meta, step = ckpt.restore_intact(
                    parallel.with_shardings(abstract, state_sh).replace(frozen={}),
                    lambda m: check_same_tokenizer(m, run.tok_meta), log)
                break
            except NoIntactCheckpoint:
                if i == len(ckpts) - 1:
                    raise
                log(f"warning: no intact {ckpt.kind} checkpoint in {cfg.out_dir}; resuming from its {ckpts[i + 1].kind} one")
        if run.lora_base is not None:
            state = state.replace(frozen=_take_init_params(run, state_sh.frozen))
        log(f"resuming from {cfg.out_dir} at iter {step} (best val loss {meta['best_val_loss']:.4f})")
        return state, meta["best_val_loss"]
    if run.lora_base is not None:
        base = _take_init_params(run, state_sh.frozen)
        state = jax.jit(lambda k, b: init_state(run.model_cfg, cfg, k)[1].replace(frozen=b),
                        out_shardings=state_sh)(key, base)
    elif run.init_params is not None:
        params = _take_init_params(run, state_sh.params)
        state = jax.jit(lambda p: state_from_params(p, optimizer), out_shardings=state_sh)(params)
    else:
        state = jax.jit(lambda k: init_state(run.model_cfg, cfg, k)[1], out_shardings=state_sh)(key)
    return state, float("inf")


def _take_init_params(run: Run, shardings):
    """run.init_params onto the devices; the run's own reference is dropped."""
    params, run.init_params = run.init_params, None
    return parallel.put(params, shardings)


# ----------------------------------------------------------------------------- loading models

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
    params, base = state.params, meta.get("lora_base")
    if base:
        # a QLoRA base is quantized as when it trained, then dequantized by the merge: the model the
        # adapters were trained with, in float32
        frozen, digest = base_params(load_weights(base["source"], lazy=True), model_cfg.block_size,
                                     model_cfg.base_quant)
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
    one = parallel.make_mesh("dp", "1")  # onto one device, whatever mesh the run was trained on
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
    model_cfg.check_gpt2_layout(f"starting from {source} (init_from, a LoRA base)")
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
