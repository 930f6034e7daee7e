"""One typed configuration with nanoGPT's key names, config files and --key=value flags.

    cfg = parse_args(["--config", "configs/shakespeare_char_cpu.py", "--max_iters=100"])

A config file is Python-shaped but never executed: it may only hold assignments
``name = value`` where the value is a literal or simple arithmetic on literals
(``batch_size = 12``, ``gradient_accumulation_steps = 5 * 8``), bounded: at most 1 MiB of
UTF-8, values nested at most 50 deep, numbers of at most 256 bits, strings of at most 64 KiB, so
no config can hang or exhaust memory while it is read. Unknown keys and values of the wrong type
stop with a `UserError` that lists the valid keys; errors in a file name its path and line.

Validation is a table: `Config.RULES` maps every key to a rule, `rule(key, value)` raising a
UserError that names the key and its valid range (see `rng`, `choice`, `ANY`). A new key adds one
line there (bool keys need none: their type is their range); cross-key checks live in
`Config.validate`. The scripts' own configs (sample.py's, bench.py's) use the same mechanism
through `validate_fields`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import math
import operator
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Sequence

from jaxgpt.errors import ShowHelp, UserError, check_choice
from jaxgpt.runtime import DTYPES, MATMUL_PRECISIONS

# name -> (n_layer, n_head, n_embd) of the GPT-2 sizes (model_size=...); all have a 1024-token
# context and 50257 tokens
GPT2_SIZES = {
    "gpt2": (12, 12, 768),  # 124M parameters
    "gpt2-medium": (24, 16, 1024),  # 350M
    "gpt2-large": (36, 20, 1280),  # 774M
    "gpt2-xl": (48, 25, 1600),  # 1558M
}

LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
PATH_KEYS = ("out_dir", "data_dir")  # the keys whose rules look at the file system
INT32_MAX = 2**31 - 1

# ----------------------------------------------------------------------------- rules
# rule(key, value) raises a UserError naming the key and what is allowed; None is fine. Each rule
# carries `allowed`, the words --help shows for it ('' for none).
Rule = Callable[[str, Any], None]


def show(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters (a flag may carry megabytes)."""
    r = repr(value)
    return r if len(r) <= limit else r[:limit] + "..."


def allows(text: str):
    """Decorates a rule with what it allows, for --help."""
    def wrap(rule: Rule) -> Rule:
        rule.allowed = text
        return rule
    return wrap


@allows("")
def ANY(key: str, value: Any) -> None:
    """Any value of the key's type (its type is checked when it is parsed)."""


def rng(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
        note: str = "") -> Rule:
    """A finite number in the interval: rng(0, 1, hi_open=True) is [0, 1); rng(1) is >= 1.
    `note` is added after the range, e.g. '(0 disables clipping)'."""
    if lo is not None and hi is not None:
        where = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        where = f"{'>' if lo_open else '>='} {lo}"
    else:
        where = f"{'<' if hi_open else '<='} {hi}"

    @allows(where + (f" {note}" if note else ""))
    def rule(key: str, value: Any) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key} must be a finite number, got {value}")
        ok = ((lo is None or (value > lo if lo_open else value >= lo))
              and (hi is None or (value < hi if hi_open else value <= hi)))
        if not ok:
            raise UserError(f"{key} must be {where}{' ' + note if note else ''}, got {show(value)}")
    return rule


def choice(*choices: Any) -> Rule:
    return allows(" | ".join(map(str, choices)))(lambda key, value: check_choice(key, value, choices))


def nonempty(hint: str) -> Rule:
    @allows("not empty")
    def rule(key: str, value: str) -> None:
        if not value.strip():
            raise UserError(f"{key} is empty; {hint}")
    return rule


@allows("a directory (created if missing)")
def directory_to_write(key: str, path: str) -> None:
    """A directory that is (or can be) created and written: not a file, under a writable directory."""
    if not path.strip():
        raise UserError(f"{key} is empty; pass a directory, e.g. --{key}=out")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{key} {path} is a file, not a directory; pass a directory (it is created if missing)")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{key} {path} cannot be created: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{key} {path} is not writable ({probe} does not allow writing); pick another directory")


@allows("a directory, or not there yet")
def directory_or_missing(key: str, path: str) -> None:
    """Empty (the default), a directory, or a path not there yet; never a file."""
    if path and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{key} {path} is a file, not a directory; pass a directory")


@allows("N or DxF, e.g. 2x4; '' = all devices")
def mesh_shape_rule(key: str, value: str) -> None:
    if value and not re.fullmatch(r"[1-9][0-9]{0,5}(x[1-9][0-9]{0,5})?", value.strip().lower()):
        raise UserError(f"{key} must look like 'N' or 'DxF' with positive N, D, F (e.g. 2x4), or '' for all "
                        f"devices; got {show(value)}")


@allows("comma-separated, from " + ", ".join(LORA_TARGETS))
def lora_targets_rule(key: str, value: str) -> None:
    targets = [t.strip() for t in value.split(",") if t.strip()]
    if not targets:
        raise UserError(f"{key} is empty; name one or more of {', '.join(LORA_TARGETS)}")
    for t in targets:
        check_choice(f"each of {key}", t, LORA_TARGETS)


def profile_range(text: str) -> tuple[int, int] | None:
    """--profile=START:STOP as (START, STOP): the steps START to STOP - 1 are traced; '' is None."""
    m = re.fullmatch(r"\s*([0-9]{1,10})\s*:\s*([0-9]{1,10})\s*", text)
    if not text.strip():
        return None
    if not m or int(m.group(1)) >= int(m.group(2)) or int(m.group(2)) > INT32_MAX:
        raise ValueError(text)
    return int(m.group(1)), int(m.group(2))


@allows("START:STOP (steps, START < STOP), e.g. 10:15; '' = off")
def profile_rule(key: str, value: str) -> None:
    try:
        profile_range(value)
    except ValueError:
        raise UserError(f"{key} must be START:STOP, the steps to trace with START < STOP (e.g. --{key}=10:15 traces "
                        f"steps 10 to 14), or '' for none; got {show(value)}") from None


# ----------------------------------------------------------------------------- declarations
# Every key is declared once: its type (the annotation), default, rule and a one-line help, under
# a group heading; the rules table, --help, the printed config and docs/config.md all read these.

def group(title: str):
    """A factory of keys under one --help heading: io = group("I/O"); out_dir: str = io("out", rule, "...")."""
    def key(default: Any, rule: Rule | None = None, help: str = "", **extra) -> Any:
        return field(default=default, metadata={"rule": rule, "help": help, "group": title, **extra})
    return key


def declared(cls) -> list:
    """The dataclass fields of cls that are keys (they carry a help line), in declaration order."""
    return [f for f in fields(cls) if "help" in f.metadata]


def by_group(cls) -> dict[str, list]:
    """The declared keys of cls by group: the groups named in cls.GROUPS first, then in declaration order."""
    out: dict[str, list] = {title: [] for title in getattr(cls, "GROUPS", ())}
    for f in declared(cls):
        out.setdefault(f.metadata["group"], []).append(f)
    return {title: keys for title, keys in out.items() if keys}


def rules_of(cls) -> dict[str, Rule]:
    return {f.name: f.metadata["rule"] for f in declared(cls) if f.metadata["rule"] is not None}


def validate_fields(obj, rules: dict[str, Rule] | None = None) -> None:
    """Checks every field of the dataclass `obj` with its declared rule (or `rules`); an error from
    a value read from a config file is prefixed with its file:line (see parse_args). bool fields
    need no rule."""
    rules = rules_of(type(obj)) if rules is None else rules
    origins = getattr(obj, "_origins", {})
    for f in fields(obj):
        rule = rules.get(f.name)
        if rule is None:
            if _field_types(type(obj))[f.name] is bool or "help" not in f.metadata:
                continue
            raise KeyError(f"{type(obj).__name__}.{f.name} has no validation rule; declare one")
        try:
            rule(f.name, getattr(obj, f.name))
        except UserError as e:
            raise UserError(f"{origins[f.name]}: {e}" if f.name in origins else str(e)) from None


_model = group("model")
_modern = group("model: modern options (each off = GPT-2's layout; see docs/modern.md)")
_lora_shape = group("start and finetuning")


@dataclass(frozen=True)
class ModelKeys:
    """The keys that shape a model, shared by the training Config (what to build) and
    jaxgpt.model.ModelConfig (what was built, as a checkpoint records it)."""

    model_type: str = _model("gpt", choice("gpt", "bigram"), "the GPT, or the lecture's bigram table")
    block_size: int = _model(1024, rng(1, 1 << 20), "context length T in tokens")
    n_layer: int = _model(12, rng(1, 4096), "transformer blocks")
    n_head: int = _model(12, rng(1, 4096), "attention heads H per block (n_embd must divide by it)")
    n_embd: int = _model(768, rng(1, 1 << 17), "channels C")
    dropout: float = _model(0.0, rng(0, 1, hi_open=True), "dropout rate (training only)")
    bias: bool = _model(False, None, "biases in the Linear layers and LayerNorms (GPT-2 has them)")
    pos_emb: str = _modern("learned", choice("learned", "rope"), "learned positions (wpe), or rotary embeddings on q and k")
    norm: str = _modern("layernorm", choice("layernorm", "rmsnorm"), "LayerNorm, or RMSNorm (a scale, no bias)")
    qk_norm: bool = _modern(False, None, "RMS-normalise queries and keys per head before attention")
    mlp: str = _modern("gelu", choice("gelu", "relu2", "swiglu"), "the MLP's nonlinearity (swiglu: width 8C/3)")
    untied_head: bool = _modern(False, None, "an output head (lm_head) of its own instead of the token embedding")
    logit_softcap: float = _modern(0.0, rng(0, note="(0 = off)"), "logits = cap * tanh(logits / cap)")
    zero_init_proj: bool = _modern(False, None, "attn.c_proj and mlp.c_proj start at zero")
    lora_alpha: float = _lora_shape(16.0, rng(0, lo_open=True), "LoRA: the adapters' output is scaled by lora_alpha / lora_rank")
    lora_dropout: float = _lora_shape(0.0, rng(0, 1, hi_open=True), "LoRA: dropout on the adapters' input")
    lora_targets: str = _lora_shape("attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj", lora_targets_rule,
                                    "LoRA: which Linear layers get adapters")


_source = group("the model")


@dataclass(frozen=True)
class ModelSource:
    """The keys that name a model to load (jaxgpt.loading.load), shared by sample.py and serve.py."""

    init_from: str = _source("resume", nonempty("use resume (the out_dir's checkpoint), a GPT-2 name or a path to weights"),
                             "resume = out_dir's checkpoint; or a GPT-2 name, a Hugging Face directory, a nanoGPT ckpt.pt")
    out_dir: str = _source("out", ANY, "the run to use (with init_from=resume)")
    meta_pkl: str = _source("", ANY, "a nanoGPT character ckpt.pt's meta.pkl (default: beside it, else "
                                     "data/<its dataset>/meta.pkl)")
    which: str = _source("best", choice("best", "latest"), "the run's best checkpoint (lowest val loss) or its latest")


_io = group("I/O")
_watch = group("watching a run (see docs/monitoring.md)")
_init = group("start and finetuning")
_data = group("data")
_optim = group("optimizer")
_sched = group("learning-rate schedule")
_system = group("system")


@dataclass(frozen=True)
class Config(ModelKeys):
    """Trains a GPT (or the lecture's bigram model) on text; keys and their meanings follow nanoGPT's train.py.

    Frozen: validate() and jaxgpt.start.resolve return new configs; nothing changes one after it
    is resolved."""

    GROUPS = ("I/O", "start and finetuning", "data", "model")  # --help and the printed config show these first

    out_dir: str = _io("out", directory_to_write, "where checkpoints, metrics.jsonl, config.json and loss.png go")
    eval_interval: int = _io(2000, rng(1, INT32_MAX), "evaluate and checkpoint every this many iterations")
    log_interval: int = _io(1, rng(1, INT32_MAX), "report the loss (and a metrics.jsonl row) every this many iterations")
    eval_iters: int = _io(200, rng(1, INT32_MAX), "batches per split in an evaluation")
    eval_only: bool = _io(False, None, "evaluate once and exit (writes nothing)")
    always_save_checkpoint: bool = _io(True, None, "nanoGPT's key, accepted and ignored: jaxgpt always keeps "
                                                   "the latest checkpoint (resume) and the best one (sampling)")
    tensorboard: bool = _watch(False, None, "write metrics.jsonl's figures as TensorBoard events to out_dir/tensorboard "
                                            "(needs pip install tensorboard)")
    profile: str = _watch("", profile_rule, "write a JAX profiler trace of steps START to STOP - 1 to out_dir/profile "
                                           "(TensorBoard's profile plugin or Perfetto)")
    wandb_log: bool = _watch(False, None, "log metrics.jsonl's figures to Weights & Biases (needs pip install wandb; "
                                          "WANDB_MODE=offline logs without a network)")
    wandb_project: str = _watch("owt", nonempty("name a wandb project, e.g. --wandb_project=owt"), "wandb's project")
    wandb_run_name: str = _watch("gpt2", ANY, "wandb's name for the run")
    init_from: str = _init("scratch", nonempty("use scratch, resume, a GPT-2 name or a path to weights"),
                           "scratch | resume | auto (resume if out_dir holds a run) | gpt2* | a Hugging Face "
                           "directory | a nanoGPT ckpt.pt | a jaxgpt out_dir")
    meta_pkl: str = _init("", ANY, "init_from a nanoGPT character ckpt.pt: its meta.pkl (default: beside the ckpt.pt, "
                                   "else data/<its dataset>/meta.pkl, where nanoGPT's sample.py reads it)")
    overwrite: bool = _init(False, None, "a fresh run over an out_dir that holds a run deletes it (else refused)")
    finetune_method: str = _init("full", choice("full", "lora", "qlora"),
                                 "train every weight, or LoRA adapters on a frozen base (qlora: a quantized base)")
    qlora_quant: str = _init("nf4", choice("nf4", "int8"), "qlora: the base's Linear kernels in nf4 (4.5 bits) or int8")
    lora_rank: int = _init(8, rng(1, 65536), "LoRA: the adapters' rank")
    dataset: str = _data("shakespeare_char", ANY, "names data/<dataset> and the download (shakespeare_char)")
    data_dir: str = _data("", directory_or_missing, "prepared data (train.bin, val.bin, meta.json); '' = data/<dataset>")
    input_file: str = _data("", ANY, "a text file or a directory to prepare when data_dir is not prepared yet")
    chat: bool = _data(False, None, "input_file is conversation JSONL: prepare it with the chat template (docs/chat.md); "
                                    "data_dir's own kind (chat or text) decides the loss either way")
    tokenizer: str = _data("char", choice("char", "gpt2"), "the tokenizer data_dir is prepared with (gpt2: BPE)")
    tokenizer_dir: str = _data("", ANY, "gpt2: a directory with vocab.json + merges.txt instead of tiktoken's files")
    include: str = _data("", ANY, "a directory input_file: comma-separated globs of the files to use ('' = all)")
    exclude: str = _data("", ANY, "a directory input_file: comma-separated globs of files to skip")
    gradient_accumulation_steps: int = _data(1, rng(1, 1 << 20), "micro-batches per step")
    batch_size: int = _data(12, rng(1, 1 << 20), "sequences B per micro-batch (all devices together)")
    model_size: str = _model("", lambda key, v: v == "" or check_choice(key, v, tuple(GPT2_SIZES)),
                             "gpt2 | gpt2-medium | gpt2-large | gpt2-xl: sets n_layer, n_head, n_embd")
    optimizer: str = _optim("adamw", choice("adamw", "muon"),
                            "adamw, or muon for the blocks' matrices (AdamW for the rest)")
    learning_rate: float = _optim(6e-4, rng(0, lo_open=True), "AdamW's peak learning rate")
    max_iters: int = _optim(600000, rng(0, INT32_MAX), "training iterations")
    weight_decay: float = _optim(1e-1, rng(0), "AdamW's decoupled weight decay")
    beta1: float = _optim(0.9, rng(0, 1, hi_open=True), "AdamW's beta1")
    beta2: float = _optim(0.95, rng(0, 1, hi_open=True), "AdamW's beta2")
    grad_clip: float = _optim(1.0, rng(0, note="(0 disables clipping)"), "clip the gradient's global norm")
    on_nonfinite: str = _optim("stop", choice("stop", "skip"),
                               "a NaN/inf loss: stop (keep the last good checkpoint) or skip the step")
    muon_lr: float = _optim(0.02, rng(0, lo_open=True), "Muon's peak learning rate (same schedule shape)")
    muon_momentum: float = _optim(0.95, rng(0, 1, hi_open=True), "Muon's Nesterov momentum")
    muon_weight_decay: float = _optim(0.0, rng(0), "Muon's decoupled weight decay (times its learning rate)")
    decay_lr: bool = _sched(True, None, "decay the learning rate (else constant after warmup)")
    warmup_iters: int = _sched(2000, rng(0, INT32_MAX), "linear warmup iterations")
    lr_decay_iters: int = _sched(600000, rng(0, INT32_MAX), "the schedule reaches min_lr here")
    min_lr: float = _sched(6e-5, rng(0), "the learning rate at the end of the decay")
    lr_schedule_kind: str = _sched("cosine", choice("cosine", "trapezoid"),
                                   "cosine to min_lr, or the peak held then linear over the last cooldown_frac")
    cooldown_frac: float = _sched(0.4, rng(0, 1), "trapezoid: the share of lr_decay_iters spent cooling down")
    dtype: str = _system("auto", choice(*DTYPES), "compute dtype: auto = bfloat16 on GPUs/TPUs, float32 on CPUs "
                                                  "(parameters, logits and the loss stay float32)")
    matmul_precision: str = _system("default", choice(*MATMUL_PRECISIONS),
                                    "float32 matmuls: default (TF32 on NVIDIA GPUs) | high | highest (exact)")
    attn_impl: str = _system("auto", choice("auto", "explicit", "xla", "cudnn", "splash"),
                             "attention kernel: auto picks per device, dtype and head size (cudnn on NVIDIA "
                             "GPUs, splash on TPUs, explicit on CPUs)")
    remat: str = _system("", choice("", "none", "block", "dots"),
                         "activation checkpointing of the blocks in the train step: '' (off), block (least "
                         "memory), dots (keeps the matmul outputs); see docs/memory.md")
    memory_check: bool = _system(True, None, "refuse, before the first step, a step that does not fit in memory "
                                             "and name settings that do (JAXGPT_MEMORY_LIMIT=8G caps it)")
    seed: int = _system(1337, rng(0, 2**32, hi_open=True), "every random stream derives from it")
    sharding: str = _system("dp", choice("dp", "fsdp"), "dp: parameters replicated; fsdp: parameters and "
                                                        "optimizer state sharded")
    mesh_shape: str = _system("", mesh_shape_rule, "devices used: N, or D-way data x F-way fsdp as DxF")
    cpu_devices: int = _system(0, rng(0, 4096), "split the CPU into N devices (data parallel over its cores); 0 = one")

    @property
    def adapters(self) -> bool:
        """Whether only LoRA adapters train (lora, and qlora: the same adapters on a quantized base)."""
        return self.finetune_method in ("lora", "qlora")

    @property
    def base_quant(self) -> str:
        """The frozen base's quantization: qlora_quant for qlora, '' (float32) otherwise."""
        return self.qlora_quant if self.finetune_method == "qlora" else ""

    def resolved_data_dir(self) -> str:
        return self.data_dir or os.path.join("data", self.dataset)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "Config":
        new = dataclasses.replace(self, **changes)
        object.__setattr__(new, "_validated", getattr(self, "_validated", False))
        return new

    def globs(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(include, exclude) patterns from their comma-separated forms."""
        split = lambda s: tuple(p.strip() for p in s.split(",") if p.strip())  # noqa: E731
        return split(self.include), split(self.exclude)

    def validate(self, paths: bool = True) -> "Config":
        """A new Config: every key checked against its declared rule (type and range, paths of the
        right kind; paths=False leaves the paths alone, for bench.py, which writes none), then what
        depends on several keys; model_size sets n_layer, n_head, n_embd. Validating a validated
        config returns it as it is."""
        if getattr(self, "_validated", False):
            return self
        rules = rules_of(type(self))
        validate_fields(self, rules if paths else {**rules, **dict.fromkeys(PATH_KEYS, ANY)})
        changes = {}
        if self.model_size:
            changes.update(zip(("n_layer", "n_head", "n_embd"), GPT2_SIZES[self.model_size]))
        if self.adapters:
            m = self.finetune_method
            if self.init_from == "scratch":
                raise UserError(f"finetune_method={m} trains adapters on a base model; set --init_from to a GPT-2 "
                                "name, a Hugging Face directory, a nanoGPT ckpt.pt or a jaxgpt out_dir")
            if self.model_type != "gpt":
                raise UserError(f"finetune_method={m} needs model_type=gpt")
            changes["lora_targets"] = ",".join(t.strip() for t in self.lora_targets.split(",") if t.strip())
        cfg = dataclasses.replace(self, **changes)
        if cfg.model_type == "gpt" and cfg.n_embd % cfg.n_head:
            raise UserError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head}); "
                            f"pick e.g. n_embd={cfg.n_head * max(1, round(cfg.n_embd / cfg.n_head))}")
        if cfg.decay_lr and cfg.min_lr > cfg.learning_rate:
            raise UserError(f"min_lr ({cfg.min_lr}) must be <= learning_rate ({cfg.learning_rate}): the schedule "
                            f"decays from learning_rate to min_lr; lower --min_lr or pass --decay_lr=False")
        if cfg.pos_emb == "rope" and cfg.model_type == "gpt" and (cfg.n_embd // cfg.n_head) % 2:
            raise UserError(f"pos_emb=rope needs an even head size (n_embd / n_head), got {cfg.n_embd // cfg.n_head}")
        object.__setattr__(cfg, "_validated", True)
        return cfg


Config.RULES = rules_of(Config)  # every key's rule, read from the declarations (bool keys need none)


# ----------------------------------------------------------------------------- parsing

def _field_types(cls) -> dict[str, type]:
    hints = {"int": int, "float": float, "bool": bool, "str": str}
    return {f.name: hints[f.type] if isinstance(f.type, str) else f.type for f in fields(cls)}


def _unknown_key(key: str, cls, where: str) -> UserError:
    valid = [f.name for f in declared(cls)]
    close = [k for k in valid if k.startswith(key) or key.startswith(k)] or difflib.get_close_matches(key, valid, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return UserError(f"unknown config key '{key}'{where}; {hint}valid keys: {', '.join(valid)}")


def coerce(key: str, value: Any, typ: type) -> Any:
    """Converts a value from a flag (a string) or a config file to the field's type, strictly."""
    if isinstance(value, str) and typ is not str:
        text = value.strip()
        if typ is bool:
            low = text.lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
        else:
            try:
                value = ast.literal_eval(text) if len(text) <= 1000 else text  # a number is short
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                pass
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typ is bool and not isinstance(value, bool):
        raise UserError(f"{key} expects True or False, got {show(value)}")
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{key} expects an integer, got {show(value)}")
    if typ is float and not isinstance(value, float):
        raise UserError(f"{key} expects a number, got {show(value)}")
    if typ is str and not isinstance(value, str):
        raise UserError(f"{key} expects a string, got {show(value)}")
    return value


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow,
           ast.Mod: operator.mod}
# Bounds on reading a config file: no file, expression or value may hang or exhaust memory.
MAX_CONFIG_BYTES = 1 << 20
MAX_DEPTH = 50  # nesting of an expression
MAX_INT_BITS = 256
MAX_STR = 1 << 16
_VALUE_TYPES = (bool, int, float, str)


def _bounded(value: Any) -> Any:
    if not isinstance(value, _VALUE_TYPES):
        raise ValueError(f"values must be numbers, strings or True/False, not {type(value).__name__}")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ValueError(f"a number over 2**{MAX_INT_BITS} is not a config value")
    if isinstance(value, str) and len(value) > MAX_STR:
        raise ValueError(f"a string over {MAX_STR} characters is not a config value")
    return value


def _binop(op: ast.operator, a: Any, b: Any) -> Any:
    """a op b, refused before it is computed when its result would be too large."""
    if isinstance(op, ast.Pow) and isinstance(a, int) and isinstance(b, int) and b > 0 \
            and a not in (0, 1, -1) and a.bit_length() * b > MAX_INT_BITS + 64:
        raise ValueError(f"a number over 2**{MAX_INT_BITS} is not a config value")
    if isinstance(op, ast.Mult) and {type(a), type(b)} & {str} and {type(a), type(b)} & {int, bool}:
        s, n = (a, b) if isinstance(a, str) else (b, a)
        if len(s) * max(n, 0) > MAX_STR:
            raise ValueError(f"a string over {MAX_STR} characters is not a config value")
    if isinstance(op, ast.Mod) and isinstance(a, str):
        raise ValueError("string formatting (%) is not allowed")
    return _BINOPS[type(op)](a, b)


def _literal(node: ast.AST, depth: int = 0) -> Any:
    """Evaluates literals and arithmetic on them; nothing else (no names, no calls), bounded in
    depth and in the size of every intermediate value."""
    if depth > MAX_DEPTH:
        raise ValueError(f"the value is nested more than {MAX_DEPTH} deep")
    if isinstance(node, ast.Constant):
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _literal(node.operand, depth + 1)
        return _bounded(-v if isinstance(node.op, ast.USub) else +v)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _bounded(_binop(node.op, _literal(node.left, depth + 1), _literal(node.right, depth + 1)))
    raise ValueError("only literals and arithmetic on them are allowed")


def read_config_source(path: str) -> str:
    """The text of a config file: an existing regular file of at most MAX_CONFIG_BYTES of UTF-8."""
    if not os.path.exists(path):
        raise UserError(f"config file not found: {path}; pass an existing file, e.g. --config configs/shakespeare_char_cpu.py")
    if not os.path.isfile(path):
        raise UserError(f"config file {path} is not a file (a directory?); pass a config file, e.g. "
                        f"--config configs/shakespeare_char_cpu.py")
    size = os.path.getsize(path)
    if size > MAX_CONFIG_BYTES:
        raise UserError(f"config file {path} has {size:,} bytes, over the {MAX_CONFIG_BYTES:,} a config file may "
                        f"have; is it the right file?")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8") from None


def load_config_file(path: str, cls=Config, origins: dict[str, str] | None = None) -> dict[str, Any]:
    """Reads `name = value` assignments from a config file without executing it; `origins`, when
    given, receives 'path:line' of each key."""
    source = read_config_source(path)
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: syntax error in config file: {e.msg}") from None
    except (RecursionError, MemoryError):
        raise UserError(f"{path}: an expression in this config file is nested too deeply to read") from None
    types = {f.name: t for f, t in zip(fields(cls), _field_types(cls).values()) if "help" in f.metadata}
    values: dict[str, Any] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # docstring or bare string
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                and isinstance(stmt.targets[0], ast.Name)):
            raise UserError(f"{path}:{stmt.lineno}: config files may only contain 'name = value' lines")
        key = stmt.targets[0].id
        if key not in types:
            raise _unknown_key(key, cls, f" in {path}:{stmt.lineno}")
        try:
            raw = _literal(stmt.value)
        except (ValueError, TypeError, ZeroDivisionError, OverflowError) as e:
            raise UserError(f"{path}:{stmt.lineno}: {key}: {e}") from None
        try:
            values[key] = coerce(key, raw, types[key])
        except UserError as e:
            raise UserError(f"{path}:{stmt.lineno}: {e}") from None
        if origins is not None:
            origins[key] = f"{path}:{stmt.lineno}"
    return values


def parse_args(argv: Sequence[str], cls=Config, prog: str = "", rest: bool = False):
    """Builds a `cls` from its declared defaults, then config files (in order), then flags: the one
    flag parser of every entry point.

    `--config FILE`, `--config=FILE` and a bare FILE argument (nanoGPT style) load a file; flags are
    `--key=value` or `--key value`, and `--key` alone is True for a True/False key. A key declared
    with `multiple=True` may be given several times (its values are joined with commas). `--help`
    (or -h) shows every key, grouped, with its default (or the value a config file gave it) and what
    it allows, and ends the script (errors.ShowHelp). rest=True: the first argument that is not a
    flag and everything after it are returned too (a command to run), as (obj, rest).
    """
    types = {f.name: t for f, t in zip(fields(cls), _field_types(cls).values()) if "help" in f.metadata}
    multiple = {f.name for f in declared(cls) if f.metadata.get("multiple")}
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}  # key -> 'file:line' of the config file that set it last
    overrides: list[tuple[str, str]] = []
    args, i, tail, want_help = list(argv), 0, [], False
    while i < len(args):
        arg = args[i]
        if arg in ("--help", "-h"):
            want_help = True
        elif arg == "--config" and not rest:
            if i + 1 >= len(args):
                raise UserError("--config needs a file path, e.g. --config configs/shakespeare_char_cpu.py")
            values.update(load_config_file(args[i + 1], cls, origins))
            i += 1
        elif arg.startswith("--config=") and not rest:
            values.update(load_config_file(arg.split("=", 1)[1], cls, origins))
        elif arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                if key not in types:
                    raise _unknown_key(key, cls, "")
                if types[key] is bool and not (i + 1 < len(args) and args[i + 1].lower() in ("true", "false")):
                    value = "True"
                elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                    value, i = args[i + 1], i + 1
                else:
                    raise UserError(f"--{key} needs a value: --{key}=VALUE")
            overrides.append((key, value))
        elif rest:
            tail = args[i:]
            break
        else:
            values.update(load_config_file(arg, cls, origins))
        i += 1
    seen: set[str] = set()
    for key, value in overrides:
        if key not in types:
            raise _unknown_key(key, cls, "")
        value = coerce(key, value, types[key])
        if key in multiple and key in seen and value:
            value = f"{values[key]},{value}" if values[key] else value
        values[key] = value
        seen.add(key)
        origins.pop(key, None)
    if want_help:
        raise ShowHelp(help_text(cls, values, origins, prog))
    obj = cls(**values)
    object.__setattr__(obj, "_set", set(values))  # the keys a file or flag set (a resume names those it overrides)
    object.__setattr__(obj, "_origins", origins)  # not a field: validate_fields names the file:line of a bad value
    return (obj, tail) if rest else obj


def help_text(cls, values: dict[str, Any] | None = None, origins: dict[str, str] | None = None,
              prog: str = "") -> str:
    """--help: usage, what the script does (the class's docstring), then every key by group with its
    value (the default, or what a config file or flag set), what it allows and its help line."""
    import sys
    import textwrap

    values, origins = values or {}, origins or {}
    prog = prog or f"python {os.path.basename(sys.argv[0]) or 'script.py'}"
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    lines = [f"usage: {prog} [--config FILE] [--key=value ...]" if cls is Config or issubclass(cls, Config)
             else f"usage: {prog} [--key=value ...]", "", " ".join(doc.split()), ""]
    for title, group_fields in by_group(cls).items():
        lines.append(f"{title}:")
        for f in group_fields:
            value = values.get(f.name, f.default)
            where = f" (from {origins[f.name]})" if f.name in origins else (" (set)" if f.name in values else "")
            rule = f.metadata["rule"]
            allowed = "True | False" if _field_types(cls)[f.name] is bool else getattr(rule, "allowed", "")
            lines.append(f"  --{f.name}={value!r}{where}")
            text = f.metadata["help"] + (f" [{allowed}]" if allowed else "")
            lines += textwrap.wrap(text, 96, initial_indent=" " * 6, subsequent_indent=" " * 6)
        lines.append("")
    lines.append("Flags: --key=value or --key value; --key alone sets a True/False key. --debug shows tracebacks; "
                 "--compile_cache=DIR|off moves or turns off the compilation cache.")
    return "\n".join(lines)


def keys_markdown(classes: dict[str, type]) -> str:
    """docs/config.md: every entry point's keys, by group, from their declarations
    (python scripts/write_config_doc.py writes it; a test checks it is current)."""
    out = ["# Configuration keys", "",
           "Generated from the declarations (`python scripts/write_config_doc.py`); `--help` on each entry point "
           "shows the same, and `--config FILE --help` a file's values. Config files hold `name = value` lines "
           "(read, never executed); flags are `--key=value` or `--key value`, and `--key` alone sets a True/False key.", ""]
    for command, cls in classes.items():
        out += [f"## `python {command}`", "", " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split()), ""]
        for title, keys in by_group(cls).items():
            out += [f"### {title}", "", "| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]
            for f in keys:
                allowed = "True, False" if _field_types(cls)[f.name] is bool else getattr(f.metadata["rule"], "allowed", "")
                cell = lambda x: str(x).replace("|", "\\|")  # noqa: E731
                out.append(f"| `{f.name}` | `{f.default!r}` | {cell(allowed)} | {cell(f.metadata['help'])} |")
            out.append("")
    return "\n".join(out)


def format_config(cfg) -> str:
    """The config as it is printed at the start of a run: `key = value` lines by group."""
    return "\n".join(f"  {f.name} = {getattr(cfg, f.name)!r}"
                     for group_fields in by_group(type(cfg)).values() for f in group_fields)


def save_config(cfg, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
