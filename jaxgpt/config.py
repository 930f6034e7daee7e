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
from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

from jaxgpt.errors import UserError, check_choice
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
# rule(key, value) raises a UserError naming the key and what is allowed; None is fine.
Rule = Callable[[str, Any], None]


def show(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters (a flag may carry megabytes)."""
    r = repr(value)
    return r if len(r) <= limit else r[:limit] + "..."


def ANY(key: str, value: Any) -> None:
    """Any value of the key's type (its type is checked when it is parsed)."""


def rng(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
        note: str = "") -> Rule:
    """A finite number in the interval: rng(0, 1, hi_open=True) is [0, 1); rng(1) is >= 1.
    `note` is added after the range, e.g. '(0 disables clipping)'."""
    def rule(key: str, value: Any) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key} must be a finite number, got {value}")
        ok = ((lo is None or (value > lo if lo_open else value >= lo))
              and (hi is None or (value < hi if hi_open else value <= hi)))
        if not ok:
            if lo is not None and hi is not None:
                where = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
            elif lo is not None:
                where = f"{'>' if lo_open else '>='} {lo}"
            else:
                where = f"{'<' if hi_open else '<='} {hi}"
            raise UserError(f"{key} must be {where}{' ' + note if note else ''}, got {show(value)}")
    return rule


def choice(*choices: Any) -> Rule:
    return lambda key, value: check_choice(key, value, choices)


def nonempty(hint: str) -> Rule:
    def rule(key: str, value: str) -> None:
        if not value.strip():
            raise UserError(f"{key} is empty; {hint}")
    return rule


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


def directory_or_missing(key: str, path: str) -> None:
    """Empty (the default), a directory, or a path not there yet; never a file."""
    if path and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{key} {path} is a file, not a directory; pass a directory")


def mesh_shape_rule(key: str, value: str) -> None:
    if value and not re.fullmatch(r"[1-9][0-9]{0,5}(x[1-9][0-9]{0,5})?", value.strip().lower()):
        raise UserError(f"{key} must look like 'N' or 'DxF' with positive N, D, F (e.g. 2x4), or '' for all "
                        f"devices; got {show(value)}")


def lora_targets_rule(key: str, value: str) -> None:
    targets = [t.strip() for t in value.split(",") if t.strip()]
    if not targets:
        raise UserError(f"{key} is empty; name one or more of {', '.join(LORA_TARGETS)}")
    for t in targets:
        check_choice(f"each of {key}", t, LORA_TARGETS)


def validate_fields(obj, rules: dict[str, Rule]) -> None:
    """Checks every field of the dataclass `obj` with its rule; an error from a value read from a
    config file is prefixed with its file:line (see parse_args). bool fields need no rule."""
    origins = getattr(obj, "_origins", {})
    for f in fields(obj):
        rule = rules.get(f.name)
        if rule is None:
            if _field_types(type(obj))[f.name] is bool:
                continue
            raise KeyError(f"{type(obj).__name__}.{f.name} has no validation rule; add one to its RULES")
        try:
            rule(f.name, getattr(obj, f.name))
        except UserError as e:
            raise UserError(f"{origins[f.name]}: {e}" if f.name in origins else str(e)) from None


@dataclass
class Config:
    """Training configuration. Names and meanings follow nanoGPT's train.py."""

    # I/O
    out_dir: str = "out"
    eval_interval: int = 2000
    log_interval: int = 1
    eval_iters: int = 200
    eval_only: bool = False
    # accepted for nanoGPT compatibility and ignored: jaxgpt always writes both the latest
    # checkpoint (for resume) and the best one (for sampling); see README
    always_save_checkpoint: bool = True
    # 'scratch' | 'resume' | 'auto' (resume if out_dir holds a checkpoint, else scratch) | weights to
    # start from: a GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl),
    # a Hugging Face GPT-2 directory, a nanoGPT ckpt.pt, or another jaxgpt out_dir (fresh optimizer)
    init_from: str = "scratch"
    # a fresh run (not resume) on an out_dir that holds a run's checkpoints: False refuses, True deletes them
    overwrite: bool = False
    # finetuning: 'full' trains every weight; 'lora' trains low-rank adapters on a frozen base
    # (init_from), and the run's checkpoints hold only the adapters and a reference to the base;
    # 'qlora' is lora over a base whose blocks' Linear kernels are quantized as they load
    finetune_method: str = "full"
    qlora_quant: str = "nf4"  # qlora: the base's kernels in 'nf4' (4.5 bits per weight) | 'int8'
    lora_rank: int = 8
    lora_alpha: float = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0
    lora_targets: str = "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"  # which Linear layers get adapters
    # data
    dataset: str = "shakespeare_char"
    data_dir: str = ""  # default: data/<dataset>
    input_file: str = ""  # text file to prepare when data_dir holds no prepared data
    tokenizer: str = "char"  # 'char' | 'gpt2' (BPE): the tokenizer data_dir is prepared with
    tokenizer_dir: str = ""  # gpt2: a directory with vocab.json + merges.txt instead of tiktoken's files
    include: str = ""  # a directory input_file: comma-separated globs of the files to use ('' = all)
    exclude: str = ""  # ... and of files to skip, besides hidden ones and __pycache__
    gradient_accumulation_steps: int = 1
    batch_size: int = 12
    block_size: int = 1024
    # model
    model_type: str = "gpt"  # 'gpt' | 'bigram'
    model_size: str = ""  # 'gpt2' | 'gpt2-medium' | 'gpt2-large' | 'gpt2-xl': sets n_layer, n_head, n_embd
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = False
    # modern model options (README "Time to quality"), each off by default (= GPT-2's layout);
    # only the classic layout exports to / loads from GPT-2 formats
    pos_emb: str = "learned"  # 'learned' (wpe) | 'rope' (rotary embeddings on q and k, no wpe)
    norm: str = "layernorm"  # 'layernorm' | 'rmsnorm' (learned scale, no bias)
    qk_norm: bool = False  # RMS-normalise queries and keys per head before attention
    mlp: str = "gelu"  # 'gelu' | 'relu2' (relu(x)^2) | 'swiglu' (silu gate x value, width 8C/3)
    untied_head: bool = False  # an output head (lm_head) of its own instead of the token embedding
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap) (0 = off)
    zero_init_proj: bool = False  # attn.c_proj and mlp.c_proj start at zero
    # optimizer: 'adamw' (every parameter) | 'muon' (Muon for the blocks' 2-D matrices, AdamW with
    # learning_rate for embeddings, head, norms and biases)
    optimizer: str = "adamw"
    muon_lr: float = 0.02  # Muon's peak learning rate; it follows the same schedule shape
    muon_momentum: float = 0.95  # Nesterov momentum of Muon
    muon_weight_decay: float = 0.0  # decoupled, multiplied by Muon's learning rate
    # AdamW
    learning_rate: float = 6e-4
    max_iters: int = 600000
    weight_decay: float = 1e-1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    on_nonfinite: str = "stop"  # a NaN/inf loss: 'stop' (keep the last good checkpoint) | 'skip' the step
    # learning-rate schedule
    decay_lr: bool = True
    warmup_iters: int = 2000
    lr_decay_iters: int = 600000
    min_lr: float = 6e-5
    # 'cosine' (nanoGPT: cosine from the peak to min_lr at lr_decay_iters) | 'trapezoid' (the peak
    # held, then linear to min_lr over the last cooldown_frac of lr_decay_iters); warmup for both
    lr_schedule_kind: str = "cosine"
    cooldown_frac: float = 0.4
    # system
    # compute dtype: 'auto' (bfloat16 on GPUs and TPUs, float32 on CPUs) | 'float32' | 'bfloat16';
    # parameters, optimizer state, logits and the loss stay float32. Saved resolved (never 'auto').
    dtype: str = "auto"
    # float32 matmuls: 'default' (JAX's: TF32 on NVIDIA GPUs) | 'high' | 'highest' (exact float32)
    matmul_precision: str = "default"
    # 'auto' | 'explicit' | 'xla' | 'cudnn' (auto: cuDNN flash attention on NVIDIA GPUs for bf16 when it works)
    attn_impl: str = "auto"
    # activation checkpointing of the blocks in the train step: '' or 'none' (off) | 'block' (keep each
    # block's input only: least memory) | 'dots' (keep the Linear matmuls' outputs too); see docs/memory.md
    remat: str = ""
    # before the first step, compare the compiled train step's memory with the free memory and refuse
    # one that does not fit, naming settings that do (docs/memory.md); False skips the check
    memory_check: bool = True
    seed: int = 1337
    # devices
    sharding: str = "dp"  # 'dp' (replicated params) | 'fsdp' (params and optimizer state sharded)
    mesh_shape: str = ""  # '' = all visible devices; 'N' = N devices; 'DxF' = D-way data x F-way fsdp
    cpu_devices: int = 0  # split the CPU into N devices (data parallel over its cores); 0 = one

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

    def globs(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(include, exclude) patterns from their comma-separated forms."""
        split = lambda s: tuple(p.strip() for p in s.split(",") if p.strip())  # noqa: E731
        return split(self.include), split(self.exclude)

    def validate(self, paths: bool = True) -> "Config":
        """Every key against its rule in RULES (type and range, paths of the right kind; paths=False
        leaves the paths alone, for bench.py, which writes none), then what depends on several keys.
        Sets n_layer, n_head, n_embd from model_size."""
        validate_fields(self, self.RULES if paths else {**self.RULES, **dict.fromkeys(PATH_KEYS, ANY)})
        if self.model_size:
            self.n_layer, self.n_head, self.n_embd = GPT2_SIZES[self.model_size]
        if self.adapters:
            m = self.finetune_method
            if self.init_from == "scratch":
                raise UserError(f"finetune_method={m} trains adapters on a base model; set --init_from to a GPT-2 "
                                "name, a Hugging Face directory, a nanoGPT ckpt.pt or a jaxgpt out_dir")
            if self.model_type != "gpt":
                raise UserError(f"finetune_method={m} needs model_type=gpt")
            self.lora_targets = ",".join(t.strip() for t in self.lora_targets.split(",") if t.strip())
        if self.model_type == "gpt" and self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                            f"pick e.g. n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}")
        if self.decay_lr and self.min_lr > self.learning_rate:
            raise UserError(f"min_lr ({self.min_lr}) must be <= learning_rate ({self.learning_rate}): the schedule "
                            f"decays from learning_rate to min_lr; lower --min_lr or pass --decay_lr=False")
        if self.pos_emb == "rope" and self.model_type == "gpt" and (self.n_embd // self.n_head) % 2:
            raise UserError(f"pos_emb=rope needs an even head size (n_embd / n_head), got {self.n_embd // self.n_head}")
        return self


# Every key's rule (bool keys need none). Counts and sizes have upper bounds far above any real
# run, so that a typo (an extra zero or two) fails here instead of exhausting memory later.
Config.RULES = {
    "out_dir": directory_to_write,
    "eval_interval": rng(1, INT32_MAX), "log_interval": rng(1, INT32_MAX), "eval_iters": rng(1, INT32_MAX),
    "init_from": nonempty("use scratch, resume, a GPT-2 name or a path to weights"),
    "finetune_method": choice("full", "lora", "qlora"),
    "qlora_quant": choice("nf4", "int8"),
    "lora_rank": rng(1, 65536), "lora_alpha": rng(0, lo_open=True), "lora_dropout": rng(0, 1, hi_open=True),
    "lora_targets": lora_targets_rule,
    "dataset": ANY,  # only names data/<dataset> and the download
    "data_dir": directory_or_missing,
    "input_file": ANY,  # read (and checked) only when data_dir is not prepared yet: jaxgpt.prepare
    "tokenizer": choice("char", "gpt2"),
    "tokenizer_dir": ANY,  # checked where it is read, only for the gpt2 tokenizer: jaxgpt.tokenizer.load_bpe
    "include": ANY, "exclude": ANY,  # globs, checked where the corpus is listed: jaxgpt.prepare.glob_regex
    "gradient_accumulation_steps": rng(1, 1 << 20), "batch_size": rng(1, 1 << 20), "block_size": rng(1, 1 << 20),
    "model_type": choice("gpt", "bigram"),
    "model_size": lambda key, v: v == "" or check_choice(key, v, tuple(GPT2_SIZES)),  # "": n_layer, n_head, n_embd
    "n_layer": rng(1, 4096), "n_head": rng(1, 4096), "n_embd": rng(1, 1 << 17),
    "dropout": rng(0, 1, hi_open=True),
    "learning_rate": rng(0, lo_open=True), "max_iters": rng(0, INT32_MAX),
    "weight_decay": rng(0), "beta1": rng(0, 1, hi_open=True), "beta2": rng(0, 1, hi_open=True),
    "grad_clip": rng(0, note="(0 disables clipping)"),
    "on_nonfinite": choice("stop", "skip"),
    "warmup_iters": rng(0, INT32_MAX), "lr_decay_iters": rng(0, INT32_MAX), "min_lr": rng(0),
    "dtype": choice(*DTYPES), "matmul_precision": choice(*MATMUL_PRECISIONS),
    "attn_impl": choice("auto", "explicit", "xla", "cudnn"),
    "remat": choice("", "none", "block", "dots"),
    "seed": rng(0, 2**32, hi_open=True),
    "sharding": choice("dp", "fsdp"), "mesh_shape": mesh_shape_rule, "cpu_devices": rng(0, 4096),
    # the modern recipe's options (README "Time to quality")
    "pos_emb": choice("learned", "rope"), "norm": choice("layernorm", "rmsnorm"),
    "mlp": choice("gelu", "relu2", "swiglu"), "logit_softcap": rng(0, note="(0 = off)"),
    "optimizer": choice("adamw", "muon"), "lr_schedule_kind": choice("cosine", "trapezoid"),
    "cooldown_frac": rng(0, 1), "muon_lr": rng(0, lo_open=True), "muon_momentum": rng(0, 1, hi_open=True),
    "muon_weight_decay": rng(0),
}


# ----------------------------------------------------------------------------- parsing

def _field_types(cls) -> dict[str, type]:
    hints = {"int": int, "float": float, "bool": bool, "str": str}
    return {f.name: hints[f.type] if isinstance(f.type, str) else f.type for f in fields(cls)}


def _unknown_key(key: str, cls, where: str) -> UserError:
    valid = [f.name for f in fields(cls)]
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
    types = _field_types(cls)
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


def parse_args(argv: Sequence[str], cls=Config):
    """Builds a `cls` from defaults, then config files (in order), then --key=value flags.

    `--config FILE`, `--config=FILE` and a bare FILE argument (nanoGPT style) all load a file.
    """
    types = _field_types(cls)
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}  # key -> 'file:line' of the config file that set it last
    overrides: list[tuple[str, str]] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config":
            if i + 1 >= len(args):
                raise UserError("--config needs a file path, e.g. --config configs/shakespeare_char_cpu.py")
            values.update(load_config_file(args[i + 1], cls, origins))
            i += 2
            continue
        if arg.startswith("--config="):
            values.update(load_config_file(arg.split("=", 1)[1], cls, origins))
        elif arg.startswith("--"):
            if "=" not in arg:
                raise UserError(f"flags take the form --key=value; got '{arg}'")
            key, value = arg[2:].split("=", 1)
            overrides.append((key, value))
        else:
            values.update(load_config_file(arg, cls, origins))
        i += 1
    for key, value in overrides:
        if key not in types:
            raise _unknown_key(key, cls, "")
        values[key] = coerce(key, value, types[key])
        origins.pop(key, None)
    obj = cls(**values)
    obj._origins = origins  # not a field: validate_fields names the file:line of a bad value
    return obj


def format_config(cfg) -> str:
    return "\n".join(f"  {k} = {v!r}" for k, v in dataclasses.asdict(cfg).items())


def save_config(cfg, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
