"""One typed configuration with nanoGPT's key names, config files and --key=value flags.

    cfg = parse_args(["--config", "configs/shakespeare_char_cpu.py", "--max_iters=100"])

A config file is Python-shaped but never executed: it may only hold assignments
``name = value`` where the value is a literal or simple arithmetic on literals
(``batch_size = 12``, ``gradient_accumulation_steps = 5 * 8``). Unknown keys and
values of the wrong type stop with a `UserError` that lists the valid keys.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import operator
import os
from dataclasses import dataclass, fields
from typing import Any, Sequence

from jaxgpt.errors import UserError, check_choice

# name -> (n_layer, n_head, n_embd) of the GPT-2 sizes (model_size=...); all have a 1024-token
# context and 50257 tokens
GPT2_SIZES = {
    "gpt2": (12, 12, 768),  # 124M parameters
    "gpt2-medium": (24, 16, 1024),  # 350M
    "gpt2-large": (36, 20, 1280),  # 774M
    "gpt2-xl": (48, 25, 1600),  # 1558M
}


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
    # finetuning: 'full' trains every weight; 'lora' trains low-rank adapters on a frozen base
    # (init_from), and the run's checkpoints hold only the adapters and a reference to the base
    finetune_method: str = "full"
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
    seed: int = 1337
    # devices
    sharding: str = "dp"  # 'dp' (replicated params) | 'fsdp' (params and optimizer state sharded)
    mesh_shape: str = ""  # '' = all visible devices; 'N' = N devices; 'DxF' = D-way data x F-way fsdp
    cpu_devices: int = 0  # split the CPU into N devices (data parallel over its cores); 0 = one

    def resolved_data_dir(self) -> str:
        return self.data_dir or os.path.join("data", self.dataset)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def globs(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(include, exclude) patterns from their comma-separated forms."""
        split = lambda s: tuple(p.strip() for p in s.split(",") if p.strip())  # noqa: E731
        return split(self.include), split(self.exclude)

    def validate(self) -> "Config":
        check_choice("model_type", self.model_type, ("gpt", "bigram"))
        if not self.init_from:
            raise UserError("init_from is empty; use scratch, resume, a GPT-2 name or a path to weights")
        if self.model_size:
            check_choice("model_size", self.model_size, tuple(GPT2_SIZES))
            self.n_layer, self.n_head, self.n_embd = GPT2_SIZES[self.model_size]
        from jaxgpt.runtime import DTYPES, MATMUL_PRECISIONS

        check_choice("dtype", self.dtype, DTYPES)
        check_choice("matmul_precision", self.matmul_precision, MATMUL_PRECISIONS)
        check_choice("attn_impl", self.attn_impl, ("auto", "explicit", "xla", "cudnn"))
        check_choice("sharding", self.sharding, ("dp", "fsdp"))
        check_choice("on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        check_choice("tokenizer", self.tokenizer, ("char", "gpt2"))
        check_choice("finetune_method", self.finetune_method, ("full", "lora"))
        if self.finetune_method == "lora":
            if self.init_from == "scratch":
                raise UserError("finetune_method=lora trains adapters on a base model; set --init_from to a GPT-2 "
                                "name, a Hugging Face directory, a nanoGPT ckpt.pt or a jaxgpt out_dir")
            if self.model_type != "gpt":
                raise UserError("finetune_method=lora needs model_type=gpt")
            if self.lora_rank < 1:
                raise UserError(f"lora_rank must be >= 1, got {self.lora_rank}")
            targets = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
            self.lora_targets = ",".join(t.strip() for t in self.lora_targets.split(",") if t.strip())
            for t in self.lora_targets.split(","):
                check_choice("each of lora_targets", t, targets)
            if not 0.0 <= self.lora_dropout < 1.0:
                raise UserError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for name in ("batch_size", "block_size", "n_layer", "n_head", "n_embd",
                     "gradient_accumulation_steps", "eval_iters", "eval_interval", "log_interval"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_iters < 0:
            raise UserError(f"max_iters must be >= 0, got {self.max_iters}")
        if self.model_type == "gpt" and self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                            f"pick e.g. n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        self._validate_modern()
        return self

    def _validate_modern(self) -> None:
        """The modern options' choices and ranges (one block, kept apart so it merges easily)."""
        check_choice("pos_emb", self.pos_emb, ("learned", "rope"))
        check_choice("norm", self.norm, ("layernorm", "rmsnorm"))
        check_choice("mlp", self.mlp, ("gelu", "relu2", "swiglu"))
        check_choice("optimizer", self.optimizer, ("adamw", "muon"))
        check_choice("lr_schedule_kind", self.lr_schedule_kind, ("cosine", "trapezoid"))
        for name, ok, want in (("logit_softcap", self.logit_softcap >= 0, ">= 0 (0 = off)"),
                               ("muon_lr", self.muon_lr > 0, "> 0"),
                               ("muon_momentum", 0 <= self.muon_momentum < 1, "in [0, 1)"),
                               ("muon_weight_decay", self.muon_weight_decay >= 0, ">= 0"),
                               ("cooldown_frac", 0 <= self.cooldown_frac <= 1, "in [0, 1]")):
            if not ok:
                raise UserError(f"{name} must be {want}, got {getattr(self, name)}")
        if self.pos_emb == "rope" and self.model_type == "gpt" and (self.n_embd // self.n_head) % 2:
            raise UserError(f"pos_emb=rope needs an even head size (n_embd / n_head), got {self.n_embd // self.n_head}")


# ----------------------------------------------------------------------------- parsing

def _field_types(cls) -> dict[str, type]:
    hints = {"int": int, "float": float, "bool": bool, "str": str}
    return {f.name: hints[f.type] if isinstance(f.type, str) else f.type for f in fields(cls)}


def _unknown_key(key: str, cls, where: str) -> UserError:
    valid = [f.name for f in fields(cls)]
    close = difflib.get_close_matches(key, valid, n=1)
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
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                pass
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typ is bool and not isinstance(value, bool):
        raise UserError(f"{key} expects True or False, got {value!r}")
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{key} expects an integer, got {value!r}")
    if typ is float and not isinstance(value, float):
        raise UserError(f"{key} expects a number, got {value!r}")
    if typ is str and not isinstance(value, str):
        raise UserError(f"{key} expects a string, got {value!r}")
    return value


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow,
           ast.Mod: operator.mod}


def _literal(node: ast.AST) -> Any:
    """Evaluates literals and arithmetic on them; nothing else (no names, no calls)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _literal(node.operand)
        return -v if isinstance(node.op, ast.USub) else +v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_literal(node.left), _literal(node.right))
    raise ValueError("only literals and arithmetic on them are allowed")


def load_config_file(path: str, cls=Config) -> dict[str, Any]:
    """Reads `name = value` assignments from a config file without executing it."""
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}; pass an existing file, e.g. --config configs/shakespeare_char_cpu.py")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: syntax error in config file: {e.msg}") from None
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
        except ValueError as e:
            raise UserError(f"{path}:{stmt.lineno}: {key}: {e}") from None
        values[key] = coerce(key, raw, types[key])
    return values


def parse_args(argv: Sequence[str], cls=Config):
    """Builds a `cls` from defaults, then config files (in order), then --key=value flags.

    `--config FILE`, `--config=FILE` and a bare FILE argument (nanoGPT style) all load a file.
    """
    types = _field_types(cls)
    values: dict[str, Any] = {}
    overrides: list[tuple[str, str]] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config":
            if i + 1 >= len(args):
                raise UserError("--config needs a file path, e.g. --config configs/shakespeare_char_cpu.py")
            values.update(load_config_file(args[i + 1], cls))
            i += 2
            continue
        if arg.startswith("--config="):
            values.update(load_config_file(arg.split("=", 1)[1], cls))
        elif arg.startswith("--"):
            if "=" not in arg:
                raise UserError(f"flags take the form --key=value; got '{arg}'")
            key, value = arg[2:].split("=", 1)
            overrides.append((key, value))
        else:
            values.update(load_config_file(arg, cls))
        i += 1
    for key, value in overrides:
        if key not in types:
            raise _unknown_key(key, cls, "")
        values[key] = coerce(key, value, types[key])
    return cls(**values)


def format_config(cfg) -> str:
    return "\n".join(f"  {k} = {v!r}" for k, v in dataclasses.asdict(cfg).items())


def save_config(cfg, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
