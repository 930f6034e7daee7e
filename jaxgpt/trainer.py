"""The training loop: data, model, optimizer, evaluation, logging and checkpoints.

`train(cfg)` runs a whole training run as `python train.py` does and returns a summary.
The loop never waits on the device except at log and eval points: metrics of a log step
are read one step later, after the next step has been dispatched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from jaxgpt import data as data_lib
from jaxgpt import lora, parallel, pretrained
from jaxgpt.benchmark import device_peak, flops_per_token
from jaxgpt.checkpoint import Checkpointer
from jaxgpt.config import GPT2_SIZES, Config, save_config
from jaxgpt.errors import UserError
from jaxgpt.model import ModelConfig, num_params, with_attention
from jaxgpt.optim import lr_schedule
from jaxgpt.runtime import matmul_precision, resolve_dtype
from jaxgpt.step import abstract_state, init_state, make_eval_step, make_train_step, state_from_params

# Token arrays up to this size are copied to the device once and batches are cut there,
# inside jit; larger corpora stay in the memmap and batches are read on the host.
RESIDENT_BYTES = 1 << 30
# settings that shape the model: a resumed run must keep them (dtype, attn_impl, device counts may
# change, e.g. when a run moves from a GPU to a CPU)
ARCH_KEYS = ("model_type", "block_size", "n_layer", "n_head", "n_embd", "bias")


def model_config(cfg: Config, vocab_size: int, log=print) -> ModelConfig:
    """The model a config trains from scratch, in the dtype and attention that serve it here."""
    return with_attention(ModelConfig(model_type=cfg.model_type, vocab_size=vocab_size, block_size=cfg.block_size,
                                      n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                      dropout=cfg.dropout, bias=cfg.bias, dtype=resolve_dtype(cfg.dtype)),
                          cfg.attn_impl, log)


def run_keys(seed: int) -> dict[str, jax.Array]:
    """Every random stream of a run, derived from the seed (the run's whole RNG state)."""
    root = jax.random.key(seed)
    return {name: jax.random.fold_in(root, i) for i, name in enumerate(("init", "data", "dropout", "eval"))}


def make_batch_fn(tokens: np.ndarray, batch_size: int, block_size: int, accum: int,
                  sharding: NamedSharding) -> Callable:
    """batch(key, i) -> (x, y), each (accum, B, T) (or (B, T) with accum=0), from fold_in(key, i).

    The batch is the same on any number of devices; it is laid out with `sharding`. A corpus
    that fits is copied to the devices once and cut there, inside jit; a larger one stays in
    the memmap and each process reads only the rows of its own devices.
    """
    if tokens.shape[0] < block_size + 2:
        raise UserError(f"a data split has {tokens.shape[0]} tokens, fewer than block_size + 1 = "
                        f"{block_size + 1}; use a larger corpus or a smaller --block_size")
    n_micro = max(accum, 1)
    squeeze = (lambda t: t[0]) if accum == 0 else (lambda t: t)

    if tokens.nbytes <= RESIDENT_BYTES:
        dev = jax.device_put(tokens, parallel.replicated(sharding.mesh))

        def cut(data, key, i):
            keys = jax.random.split(jax.random.fold_in(key, i), n_micro)
            xs, ys = jax.vmap(lambda k: data_lib.get_batch(k, data, batch_size, block_size))(keys)
            return squeeze(xs), squeeze(ys)

        stacked = jax.jit(cut, out_shardings=(sharding, sharding))
        return lambda key, i: stacked(dev, key, i)

    n = tokens.shape[0]
    shape = (n_micro, batch_size, block_size) if accum else (batch_size, block_size)

    def host_batch(key, i):
        keys = jax.random.split(jax.random.fold_in(key, i), n_micro)
        offsets = np.stack([np.asarray(data_lib.batch_offsets(k, n, batch_size, block_size)) for k in keys])
        offsets = offsets if accum else offsets[0]  # (A, B) or (B,)

        def rows(index, shift):  # the block of one device: read only its rows from the memmap
            starts = offsets[index[:-1]] + shift
            block = np.asarray(tokens[starts[..., None] + np.arange(block_size)]).astype(np.int32)
            return block[..., index[-1]]

        return tuple(parallel.global_batch_from_host(lambda idx, s=s: rows(idx, s), shape, sharding)
                     for s in (0, 1))
    return Prefetched(host_batch)


class Prefetched:
    """Reads batch i + 1 from the memmap in a background thread while step i runs."""

    def __init__(self, fn: Callable):
        from concurrent.futures import ThreadPoolExecutor

        self.fn, self.pool, self.ahead = fn, ThreadPoolExecutor(max_workers=1), None

    def __call__(self, key, i):
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead[0] is key and ahead[1] == i:
            batch = ahead[2].result()
        else:
            batch = self.fn(key, i)
        self.ahead = (key, i + 1, self.pool.submit(self.fn, key, i + 1))
        return batch


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
    lora_base: dict | None = None  # LoRA: {"source": where the base comes from, "fingerprint": ...}
    origin: str = "scratch"  # where the run's weights started (init_from of its first start), kept on resume


def padded_vocab(meta: dict[str, Any]) -> int:
    """A BPE vocabulary trained from scratch is padded to a multiple of 64 (50257 -> 50304), which
    makes the embedding and head matmuls faster; padded ids never occur in the data. A char
    vocabulary is left exact."""
    v = meta["vocab_size"]
    return v if meta["tokenizer"] == "char" else -(-v // 64) * 64


def setup(cfg: Config, log=print) -> Run:
    """Resolves where the model comes from (scratch, a checkpoint to resume, or pretrained
    weights), prepares the data with the matching tokenizer, and builds the batch functions."""
    cfg.validate()
    mesh = parallel.make_mesh(cfg.sharding, cfg.mesh_shape)
    parallel.check_batch(mesh, cfg.batch_size)
    # 'auto' becomes the dtype for these devices, so config.json and the checkpoints record what ran
    cfg.dtype = resolve_dtype(cfg.dtype, mesh.devices.flat[0].platform)
    weights, ckpt_meta, tokenizer_dir, base_tok = None, None, cfg.tokenizer_dir, None
    if cfg.init_from == "resume":
        ckpt = Checkpointer(cfg.out_dir, "latest")
        ckpt_meta = ckpt.newest_meta()
        ckpt.close()
        if ckpt_meta is None:
            raise UserError(f"init_from=resume but {cfg.out_dir} has no checkpoint; "
                            f"train from scratch first or fix --out_dir")
        check_resume_compatible(cfg, ckpt_meta)
        if ckpt_meta.get("lora_base"):  # a LoRA run's checkpoints hold only the adapters
            weights = pretrained.load_weights(ckpt_meta["lora_base"]["source"])
    elif pretrained.is_pretrained_source(cfg.init_from):
        weights = pretrained.load_weights(cfg.init_from)
        base_tok = weights.tokenizer_meta  # a jaxgpt base: the new data is encoded with its tokenizer
        if base_tok is None and cfg.tokenizer != "gpt2":
            raise UserError(f"init_from={cfg.init_from} holds GPT-2 weights, which read BPE tokens; "
                            f"pass --tokenizer=gpt2")
        if cfg.tokenizer == "gpt2" and not tokenizer_dir:
            tokenizer_dir = weights.tokenizer_dir  # a Hugging Face directory brings its BPE files
    data_dir = cfg.resolved_data_dir()
    include, exclude = cfg.globs()
    meta = data_lib.ensure_prepared(data_dir, cfg.dataset, cfg.input_file, tokenizer=cfg.tokenizer,
                                    tokenizer_dir=tokenizer_dir, include=include, exclude=exclude,
                                    tokenizer_meta=base_tok)
    if meta.get("tokenizer") != cfg.tokenizer:
        raise UserError(f"{data_dir} was prepared with the {meta.get('tokenizer')!r} tokenizer, not {cfg.tokenizer!r}; "
                        f"pass --tokenizer={meta.get('tokenizer')} or a --data_dir prepared for {cfg.tokenizer!r}")
    tok_meta = {k: v for k, v in meta.items() if k not in data_lib.CORPUS_KEYS}
    runtime = dict(dropout=cfg.dropout, dtype=cfg.dtype)
    init_params, lora_base = None, None
    if ckpt_meta is not None:  # the architecture is the checkpoint's (checked against cfg above)
        model_cfg = with_attention(dataclasses.replace(ModelConfig.from_dict(ckpt_meta["model_config"]), **runtime),
                                   cfg.attn_impl, log)
        if weights is not None:
            init_params = pretrained.to_params(weights, model_cfg.block_size)
            lora_base = lora.check_base(ckpt_meta["lora_base"], init_params)
    elif weights is not None:
        if cfg.model_type != "gpt":
            raise UserError(f"init_from={cfg.init_from} loads a GPT; drop --model_type={cfg.model_type}")
        if base_tok is not None and base_tok != tok_meta:
            raise UserError(f"{data_dir} was prepared with a different tokenizer than the base model in "
                            f"{cfg.init_from}; use a new --data_dir, which is then encoded with the base's tokenizer")
        lora_cfg = {}
        if cfg.finetune_method == "lora":
            lora_cfg = dict(lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                            lora_targets=cfg.lora_targets)
        model_cfg = with_attention(pretrained.model_config(weights, block_size=cfg.block_size, **runtime, **lora_cfg),
                                   cfg.attn_impl, log)
        init_params = pretrained.to_params(weights, cfg.block_size)
        if lora_cfg:
            source = cfg.init_from if cfg.init_from in GPT2_SIZES else os.path.abspath(cfg.init_from)
            lora_base = {"source": source, "fingerprint": lora.fingerprint(init_params)}
        if meta["vocab_size"] > model_cfg.vocab_size:
            raise UserError(f"the data's tokenizer has {meta['vocab_size']} tokens but the model in {cfg.init_from} "
                            f"only {model_cfg.vocab_size}; prepare the data with the model's tokenizer")
        log(f"init_from {cfg.init_from}: {model_cfg.n_layer} layers, {model_cfg.n_head} heads, "
            f"n_embd {model_cfg.n_embd}, vocab {model_cfg.vocab_size}, context {model_cfg.block_size} "
            f"(the config's model shape is not used)")
    else:
        model_cfg = model_config(cfg, padded_vocab(meta), log)
    batches, eval_batches = {}, {}
    for split in data_lib.SPLITS:
        tokens = data_lib.load_split(data_dir, split, meta)
        batches[split] = make_batch_fn(tokens, cfg.batch_size, cfg.block_size, cfg.gradient_accumulation_steps,
                                       parallel.batch_sharding(mesh, 3))
        eval_batches[split] = make_batch_fn(tokens, cfg.batch_size, cfg.block_size, 0,
                                            parallel.batch_sharding(mesh, 2))
    origin = cfg.init_from if ckpt_meta is None else ckpt_meta.get("origin", ckpt_meta["train_config"]["init_from"])
    return Run(cfg, model_cfg, tok_meta, batches, eval_batches, mesh, init_params, lora_base, origin)


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


class NonFiniteLoss(UserError):
    """The loss or gradient became NaN or inf (with on_nonfinite=stop)."""


class _finish:
    """Closes the progress bar and lets checkpoint writes complete, also when the loop fails."""

    def __init__(self, *closables):
        self.closables = closables

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for c in self.closables:
            if hasattr(c, "wait"):
                c.wait()
            c.close()


class StopFlag:
    """SIGINT / SIGTERM set a flag; the loop finishes its step, checkpoints and stops."""

    def __init__(self):
        self.stop = False
        self._old = {}

    def __enter__(self):
        if hasattr(signal, "SIGTERM"):
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread
                    pass
        return self

    def _handle(self, signum, frame):
        if self.stop:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.stop = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def plot_losses(metrics_path: str, png_path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        return
    it = [r["iter"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(it, [r["train_loss"] for r in rows], label="train")
    ax.plot(it, [r["val_loss"] for r in rows], label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def train(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs a training run (or an evaluation, eval_only) as train.py does; returns a summary."""
    with matmul_precision(cfg.validate().matmul_precision):  # every program of the run is traced inside
        return _train(cfg, log)


def _train(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    main = jax.process_index() == 0  # only process 0 writes logs, metrics and plots
    if not main:
        log = lambda s: None  # noqa: E731
    run = setup(cfg, log)
    os.makedirs(cfg.out_dir, exist_ok=True)
    if main:
        save_config(cfg, os.path.join(cfg.out_dir, "config.json"))
    keys = run_keys(cfg.seed)
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")

    # the state is created directly in its shardings: no device ever holds a whole fsdp model
    graphdef, abstract, optimizer = abstract_state(run.model_cfg, cfg)
    state_sh = parallel.state_shardings(abstract, run.mesh)
    latest, best = Checkpointer(cfg.out_dir, "latest", max_to_keep=2), Checkpointer(cfg.out_dir, "best")
    best_val = math.inf
    is_lora = run.lora_base is not None
    # checkpoints never hold a frozen LoRA base (it is loaded from its source); {} without LoRA
    saveable = lambda st: st.replace(frozen={})  # noqa: E731
    if cfg.init_from == "resume":
        state, meta, step = latest.restore_intact(
            saveable(parallel.with_shardings(abstract, state_sh)), lambda m: check_same_tokenizer(m, run.tok_meta), log)
        if is_lora:
            state = state.replace(frozen=jax.device_put(run.init_params, state_sh.frozen))
        best_val = meta["best_val_loss"]
        log(f"resuming from {cfg.out_dir} at iter {step} (best val loss {best_val:.4f})")
    else:
        if is_lora:  # new adapters (B = 0) around the frozen pretrained base
            base = jax.device_put(run.init_params, state_sh.frozen)
            state = jax.jit(lambda k, b: init_state(run.model_cfg, cfg, k)[1].replace(frozen=b),
                            out_shardings=state_sh)(keys["init"], base)
        elif run.init_params is not None:  # pretrained weights, laid out in their shardings, fresh optimizer
            params = jax.device_put(run.init_params, state_sh.params)
            state = jax.jit(lambda p: state_from_params(p, optimizer), out_shardings=state_sh)(params)
        else:
            state = jax.jit(lambda k: init_state(run.model_cfg, cfg, k)[1], out_shardings=state_sh)(keys["init"])
        if main and os.path.exists(metrics_path):
            os.remove(metrics_path)  # a fresh run starts a fresh log

    n_trainable = num_params(state.params)
    n_params = n_trainable + num_params(state.frozen)
    peak, peak_src = device_peak("float32" if jax.devices()[0].platform == "cpu" else cfg.dtype,
                                 run.mesh.devices.flat)  # MFU of the whole mesh
    fpt = flops_per_token(run.model_cfg, n_params, n_trainable)
    log(f"model: {cfg.model_type}, {n_params / 1e6:.2f}M parameters, compute dtype {run.model_cfg.dtype}, "
        f"attention {run.model_cfg.attn_impl}; "
        f"MFU peak {peak_src}")
    if is_lora:
        log(f"LoRA rank {run.model_cfg.lora_rank} on {run.model_cfg.lora_targets}: {n_trainable:,} trainable "
            f"parameters ({100 * n_trainable / n_params:.2f}%), base from {run.lora_base['source']} frozen")
    log(f"devices: {run.mesh.devices.size} ({jax.devices()[0].device_kind}), sharding {cfg.sharding}, "
        f"mesh data={run.mesh.shape['data']} x fsdp={run.mesh.shape['fsdp']}, {jax.process_count()} process(es)")
    repl = parallel.replicated(run.mesh)
    train_step = make_train_step(graphdef, optimizer, cfg, state_sh, parallel.batch_sharding(run.mesh, 3), repl)
    eval_step = make_eval_step(graphdef, state_sh.params, parallel.batch_sharding(run.mesh, 2), repl, state_sh.frozen)
    schedule = lr_schedule(cfg)
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size

    sync_steps = parallel.needs_step_sync(run.mesh)

    def evaluate(params, frozen, it: int) -> dict[str, float]:
        ek = jax.random.fold_in(keys["eval"], it)
        out = {}
        for s, split in enumerate(data_lib.SPLITS):
            losses = []
            for i in range(cfg.eval_iters):
                losses.append(eval_step(params, run.eval_batches[split](ek, s * cfg.eval_iters + i), frozen))
                if sync_steps:
                    jax.block_until_ready(losses[-1])
            out[split] = float(np.mean([parallel.host_value(l) for l in losses]))
        return out

    def checkpoint_meta(it: int) -> dict[str, Any]:
        return {"step": it, "best_val_loss": best_val, "model_config": run.model_cfg.to_dict(),
                "train_config": cfg.to_dict(), "tokenizer": run.tok_meta,
                "rng": {"seed": cfg.seed, "derivation": "fold_in(key(seed), stream); per step fold_in(stream_key, step)"},
                "data_state": {"step": it}, "lora_base": run.lora_base, "origin": run.origin}

    start = last_saved = int(state.step)

    def check_finite(first_bad) -> None:
        """on_nonfinite=stop: end the run, saving nothing, once a step was not finite."""
        bad = int(parallel.host_value(first_bad))
        if cfg.on_nonfinite == "stop" and bad >= 0:
            raise NonFiniteLoss(f"the loss became non-finite (NaN or inf) at iter {bad}; stopped without saving, "
                                f"so the latest checkpoint (iter {last_saved}) is the last good one. Lower "
                                f"--learning_rate, check the data, or pass --on_nonfinite=skip")

    if cfg.eval_only:
        losses = evaluate(state.params, state.frozen, start)
        log(f"iter {start}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        return {"iter": start, "train_loss": losses["train"], "val_loss": losses["val"], "best_val_loss": best_val}

    bar = tqdm(total=cfg.max_iters, initial=start, dynamic_ncols=True, disable=None if main else True,
               file=sys.stderr)
    say = bar.write if not bar.disable else log
    summary: dict[str, Any] = {"n_params": n_params, "n_trainable": n_trainable}
    pending = None  # (iter, metrics on device) of the last log step, read one step later
    log_mark, recent_ms = None, None  # (time, iter) of the last log line; ms/iter since then
    t_mark, steps_since_mark, ms_per_iter = time.perf_counter(), 0, float("nan")
    it, resumed = start, cfg.init_from == "resume"
    with StopFlag() as stop, _finish(latest, best, bar):
        while True:
            due = it % cfg.eval_interval == 0 or it == cfg.max_iters
            if due and not (resumed and it == start):  # a resumed step was evaluated before
                jax.block_until_ready(state)
                if steps_since_mark:
                    ms_per_iter = 1000 * (time.perf_counter() - t_mark) / steps_since_mark
                check_finite(state.first_nonfinite)
                losses = evaluate(state.params, state.frozen, it)
                if losses["val"] < best_val:
                    best_val = losses["val"]
                    best.save(it, saveable(state), checkpoint_meta(it))
                latest.save(it, saveable(state), checkpoint_meta(it))
                last_saved = it
                row = {"iter": it, "train_loss": losses["train"], "val_loss": losses["val"],
                       "lr": float(schedule(it)), "ms_per_iter": ms_per_iter,
                       "tokens_per_s": tokens_per_iter / ms_per_iter * 1000 if steps_since_mark else float("nan"),
                       "mfu": fpt * tokens_per_iter / (ms_per_iter / 1000) / peak if steps_since_mark else float("nan"),
                       "best_val_loss": best_val, "skipped_steps": int(parallel.host_value(state.skipped))}
                if main:
                    with open(metrics_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(row) + "\n")
                say(f"iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                    + (f", {ms_per_iter:.1f} ms/iter, MFU {100 * row['mfu']:.1f}%" if steps_since_mark else ""))
                summary.update(row)
                t_mark, steps_since_mark = time.perf_counter(), 0
            if it >= cfg.max_iters:
                break
            if stop.stop:
                jax.block_until_ready(state)
                check_finite(state.first_nonfinite)
                latest.save(it, saveable(state), checkpoint_meta(it))
                say(f"stopped at iter {it}; checkpoint saved. Continue with --init_from=resume "
                    f"--out_dir={cfg.out_dir}")
                summary["stopped_at"] = it
                break

            batch = run.batches["train"](keys["data"], it)
            state, metrics = train_step(state, batch, keys["dropout"])
            if sync_steps:
                jax.block_until_ready(metrics)
            if pending is not None:
                p_it, p_metrics = pending
                check_finite(p_metrics["first_nonfinite"])
                loss, lr = float(parallel.host_value(p_metrics["loss"])), float(parallel.host_value(p_metrics["lr"]))
                now = time.perf_counter()
                if log_mark is not None and p_it > log_mark[1]:
                    recent_ms = 1000 * (now - log_mark[0]) / (p_it - log_mark[1])
                log_mark = (now, p_it)
                speed = (f"{recent_ms:.1f} ms/iter, {tokens_per_iter / recent_ms * 1000:,.0f} tok/s"
                         if recent_ms else "compiling")
                if bar.disable:
                    log(f"iter {p_it}: loss {loss:.4f}, lr {lr:.2e}, {speed}")
                else:
                    bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {speed}")
                pending = None
            if it % cfg.log_interval == 0:
                pending = (it, metrics)
            if it == start:  # exclude compilation from the timing
                jax.block_until_ready(state)
                t_mark, steps_since_mark = time.perf_counter(), -1
            it += 1
            steps_since_mark += 1
            bar.update(1)
    if main:
        plot_losses(metrics_path, os.path.join(cfg.out_dir, "loss.png"))
    summary["iter"] = it
    return summary
