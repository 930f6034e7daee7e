"""Starting a training run: everything that turns a config into something ready to train.

    cfg = resolve(cfg)                # validated once; init_from=auto, dtype=auto and a resume's settings decided
    run = setup(cfg)                  # data, model config, mesh, init_from weights, resume metadata
    state, best_val = start_state(run, ...)   # scratch, pretrained, LoRA around a frozen base, or resumed

Loading the weights a run starts from is jaxgpt.loading's job (the same loader sampling uses).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable

import jax
from jax.sharding import Mesh

from jaxgpt import chat as chat_lib
from jaxgpt import data as data_lib
from jaxgpt import lora, parallel, prepare, pretrained
from jaxgpt.checkpoint import Checkpointer, NoIntactCheckpoint, listed_steps
from jaxgpt.config import GPT2_SIZES, Config
from jaxgpt.errors import UserError
from jaxgpt.loading import base_params, grow_vocab, load_weights, newest_meta
from jaxgpt.model import MODERN_KEYS, ModelConfig, model_config, with_attention
from jaxgpt.runtime import resolve_dtype
from jaxgpt.step import init_state, state_from_params

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
    masked: bool = False  # chat data: the loss is over the assistant's tokens only (jaxgpt.chat)


def padded_vocab(meta: dict[str, Any]) -> int:
    """A BPE vocabulary trained from scratch is padded to a multiple of 64 (50257 -> 50304), which
    makes the embedding and head matmuls faster; padded ids never occur in the data. A char
    vocabulary is left exact."""
    v = meta["vocab_size"]
    return v if meta["tokenizer"] == "char" else -(-v // 64) * 64


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


RUN_FILES = ("checkpoints", "metrics.jsonl", "loss.png", "tensorboard", "profile")


def clear_run(out_dir: str, log=print) -> None:
    """overwrite=True on an out_dir that holds a run: deletes its checkpoints, metrics, plot, TensorBoard
    events and profiles (never a wandb directory: offline runs there may not be synced yet)."""
    gone = [n for n in RUN_FILES if os.path.lexists(os.path.join(out_dir, n))]
    for name in gone:
        path = os.path.join(out_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if gone:
        log(f"overwrite=True: deleted the earlier run's {', '.join(gone)} in {out_dir}")


# what a resumed run keeps from its checkpoint whatever the flags say (the model's shape is checked
# instead: ARCH_KEYS must match)
RESUME_KEEPS = ("finetune_method", "qlora_quant", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets",
                "tokenizer")


def resolve(cfg: Config, log=print) -> Config:
    """The config a run uses, decided once (a second call returns it as it is): validated, then
    init_from=auto made resume or scratch, dtype=auto made the devices' dtype, and a resume's
    RESUME_KEEPS taken from its checkpoint (a flag or config file that asked otherwise is named in
    one line). What train.py prints and config.json records is this config."""
    if getattr(cfg, "_resolved", False):
        return cfg
    asked = getattr(cfg, "_origins", {}).keys() | getattr(cfg, "_set", set())
    cfg = cfg.validate()
    changes: dict[str, Any] = {"dtype": resolve_dtype(cfg.dtype, jax.devices()[0].platform)}
    if cfg.init_from == "auto":  # the command a preemptible VM reruns: resume if there is a run
        changes["init_from"] = "resume" if newest_meta(cfg.out_dir) is not None else "scratch"
        log(f"init_from=auto: {'resuming the run in' if changes['init_from'] == 'resume' else 'no checkpoint yet in'} "
            f"{cfg.out_dir}" + ("" if changes["init_from"] == "resume" else "; starting from scratch"))
    if changes.get("init_from", cfg.init_from) == "resume":
        meta = newest_meta(cfg.out_dir)
        if meta is None:
            raise UserError(f"init_from=resume but {cfg.out_dir} has no checkpoint; "
                            f"train from scratch first or fix --out_dir")
        check_resume_compatible(cfg, meta)
        saved = meta["train_config"]
        kept = {k: saved[k] for k in RESUME_KEEPS if k in saved and saved[k] != getattr(cfg, k)}
        overridden = [f"{k}={v!r} (asked {getattr(cfg, k)!r})" for k, v in kept.items() if k in asked]
        if overridden:
            log(f"note: a resumed run keeps its checkpoint's {', '.join(overridden)}")
        changes.update(kept)
    out = dataclasses.replace(cfg, **changes)
    object.__setattr__(out, "_validated", True)
    object.__setattr__(out, "_resolved", True)
    return out


def setup(cfg: Config, log=print) -> Run:
    """Resolves where the model comes from (scratch, a checkpoint to resume, or pretrained
    weights), prepares the data with the matching tokenizer, and builds the batch functions."""
    cfg = resolve(cfg, log)
    mesh = parallel.make_mesh(cfg.sharding, cfg.mesh_shape)
    parallel.check_batch(mesh, cfg.batch_size)
    weights, ckpt_meta, tokenizer_dir, base_tok = None, None, cfg.tokenizer_dir, None
    if cfg.init_from == "resume":
        ckpt_meta = newest_meta(cfg.out_dir)
        if ckpt_meta is None:
            raise UserError(f"init_from=resume but {cfg.out_dir} has no checkpoint; "
                            f"train from scratch first or fix --out_dir")
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
                                       exclude=exclude, tokenizer_meta=base_tok, chat=cfg.chat)
    if meta.get("tokenizer") != cfg.tokenizer:
        raise UserError(f"{data_dir} was prepared with the {meta.get('tokenizer')!r} tokenizer, not {cfg.tokenizer!r}; "
                        f"pass --tokenizer={meta.get('tokenizer')} or a --data_dir prepared for {cfg.tokenizer!r}")
    tok_meta = {k: v for k, v in meta.items() if k not in (*prepare.CORPUS_KEYS, *prepare.CHAT_CORPUS_KEYS)}
    runtime = dict(dropout=cfg.dropout, dtype=cfg.dtype)
    init_params, lora_base = None, None
    if ckpt_meta is not None:  # the architecture is the checkpoint's (checked against cfg above)
        model_cfg = with_attention(dataclasses.replace(ModelConfig.from_dict(ckpt_meta["model_config"]), **runtime),
                                   cfg.attn_impl, log)
        if weights is not None:
            init_params, digest = base_params(weights, model_cfg.block_size, model_cfg.base_quant,
                                              vocab_size=model_cfg.vocab_size)
            lora_base = lora.check_base(ckpt_meta["lora_base"], digest=digest)
    elif weights is not None:
        if cfg.model_type != "gpt":
            raise UserError(f"init_from={cfg.init_from} loads a GPT; drop --model_type={cfg.model_type}")
        if base_tok is not None and (chat_lib.plain_meta(base_tok) != chat_lib.plain_meta(tok_meta) or (
                chat_lib.has_chat(base_tok) and chat_lib.has_chat(tok_meta) and base_tok["chat"] != tok_meta["chat"])):
            raise UserError(f"{data_dir} was prepared with a different tokenizer than the base model in "
                            f"{cfg.init_from}; use a new --data_dir, which is then encoded with the base's tokenizer")
        lora_cfg = {}
        if cfg.adapters:
            lora_cfg = dict(lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                            lora_targets=cfg.lora_targets, base_quant=cfg.base_quant)
        model_cfg = with_attention(pretrained.weights_config(weights, block_size=cfg.block_size, **runtime, **lora_cfg),
                                   cfg.attn_impl, log)
        # chat data whose template's tokens the base has no rows for: its embedding grows (loading.grow_vocab)
        vocab = padded_vocab(meta) if chat_lib.has_chat(meta) and meta["vocab_size"] > model_cfg.vocab_size else 0
        if vocab:
            log(f"note: the chat template's tokens need ids up to {meta['vocab_size'] - 1}; the base's embedding "
                f"grows from {model_cfg.vocab_size} to {vocab} rows")
            model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab)
        if lora_cfg:
            init_params, digest = base_params(weights, cfg.block_size, cfg.base_quant, vocab_size=vocab or None)
            source = cfg.init_from if cfg.init_from in GPT2_SIZES else os.path.abspath(cfg.init_from)
            lora_base = {"source": source, "fingerprint": digest, "quant": cfg.base_quant or None}
        else:
            init_params = grow_vocab(pretrained.to_params(weights, cfg.block_size), vocab)
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
    masked = chat_lib.has_chat(meta)
    for split in data_lib.SPLITS:
        extra = {}
        if masked:  # windows start at conversations; the mask makes y = -1 off the assistant's tokens
            tokens, mask, starts, long = data_lib.load_chat_split(data_dir, split, meta, cfg.block_size)
            extra = dict(mask=mask, starts=starts)
            if long:
                log(f"note: {long} {split} conversation(s) are longer than block_size + 1 = {cfg.block_size + 1} "
                    f"tokens: split into windows at user turns (docs/chat.md)")
        else:
            tokens = data_lib.load_split(data_dir, split, meta)
        batches[split] = data_lib.make_batch_fn(tokens, cfg.batch_size, cfg.block_size, cfg.gradient_accumulation_steps,
                                                parallel.batch_sharding(mesh, 3), **extra)
        eval_batches[split] = data_lib.make_batch_fn(tokens, cfg.batch_size, cfg.block_size, 0,
                                                     parallel.batch_sharding(mesh, 2), **extra)
    if masked:
        log(f"chat data: the loss is over the assistant's tokens only ({meta.get('train_assistant_tokens', 0):,} "
            f"of {meta['train_tokens']:,} train tokens)")
    origin = cfg.init_from if ckpt_meta is None else ckpt_meta.get("origin", ckpt_meta["train_config"]["init_from"])
    return Run(cfg, model_cfg, tok_meta, batches, eval_batches, mesh, init_params, lora_base, origin, masked)


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


