"""GPT-2 weights in and out: OpenAI's checkpoints, Hugging Face directories, nanoGPT's ckpt.pt.

    from jaxgpt.pretrained import load_pretrained
    model, model_config = load_pretrained("gpt2")      # or a Hugging Face directory, a ckpt.pt
    logits = model(idx)                                 # (B, T) -> (B, T, V), evaluation mode

Sources `load_weights` understands (`init_from` in a training config takes these and a jaxgpt
out_dir, which jaxgpt.loading reads: this module knows nothing of checkpoints):
  gpt2 | gpt2-medium | gpt2-large | gpt2-xl   the Hugging Face cache, else a download
  a Hugging Face GPT-2 directory               config.json + model.safetensors or pytorch_model.bin
  a nanoGPT checkpoint, .../ckpt.pt            PyTorch state dict; the `_orig_mod.` prefix is stripped,
                                               the characters from its meta.pkl (read_nanogpt)

A source that knows which characters (or BPE) its model reads says so in `Weights.tokenizer_meta`,
the dict a jaxgpt run stores for its tokenizer (jaxgpt.tokenizer's `meta()`): a Hugging Face
directory written by `export_hf` for a char model (its jaxgpt_tokenizer.json), a nanoGPT ckpt.pt
with nanoGPT's meta.pkl (`read_meta_pkl`), and a jaxgpt out_dir (jaxgpt.loading.load_weights). A source
without one reads GPT-2's BPE (its own vocab.json + merges.txt, else tiktoken's), unless it knows
that it does not (`Weights.tokenizer_error`: a nanoGPT char model whose meta.pkl is missing or bad).
`source_tokenizer` decides so for sampling and export; init_from (jaxgpt.start.setup) uses the same
fields, where --tokenizer=gpt2 and --tokenizer_dir may name the BPE of a source that has none.

Every source is read into one flat table of numpy arrays under the Hugging Face names
(`h.0.attn.c_attn.weight`, ...), with every matrix laid out (in, out) as in GPT-2's Conv1D;
`to_params` maps that table name by name onto jaxgpt's parameter tree, and `export_hf` maps a
jaxgpt checkpoint back to a Hugging Face directory. `load_weights(source, lazy=True)` reads a
safetensors directory's table one tensor at a time, as `iter_params` asks for each (QLoRA
quantizes the base as it streams past); other sources are read whole in any case.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import os
import pickle
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxgpt.config import GPT2_SIZES
from jaxgpt.errors import UserError

HUB_REPOS = {name: f"openai-community/{name}" for name in GPT2_SIZES}
HF_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")
# Hugging Face's activation names -> ours
HF_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "exact"}

# one transformer block: (our path inside h.<i>, Hugging Face name inside h.<i>)
BLOCK_TABLE = [
    (("ln_1", "scale"), "ln_1.weight"), (("ln_1", "bias"), "ln_1.bias"),
    (("attn", "c_attn", "kernel"), "attn.c_attn.weight"), (("attn", "c_attn", "bias"), "attn.c_attn.bias"),
    (("attn", "c_proj", "kernel"), "attn.c_proj.weight"), (("attn", "c_proj", "bias"), "attn.c_proj.bias"),
    (("ln_2", "scale"), "ln_2.weight"), (("ln_2", "bias"), "ln_2.bias"),
    (("mlp", "c_fc", "kernel"), "mlp.c_fc.weight"), (("mlp", "c_fc", "bias"), "mlp.c_fc.bias"),
    (("mlp", "c_proj", "kernel"), "mlp.c_proj.weight"), (("mlp", "c_proj", "bias"), "mlp.c_proj.bias"),
]
TOP_TABLE = [
    (("wte", "embedding"), "wte.weight"), (("wpe", "embedding"), "wpe.weight"),
    (("ln_f", "scale"), "ln_f.weight"), (("ln_f", "bias"), "ln_f.bias"),
]
LINEARS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT2_VOCAB = 50257  # GPT-2's BPE tokens; nanoGPT pads a scratch model's vocabulary to 50304
TOKENIZER_FILE = "jaxgpt_tokenizer.json"  # export_hf's description of a tokenizer Hugging Face has no form for


@dataclass
class Weights:
    """What a source holds: the flat table, the architecture, and the tokenizer when it has one."""
    tensors: Mapping[str, np.ndarray]  # Hugging Face names without 'transformer.', matrices (in, out)
    n_head: int
    gelu: str  # 'exact' | 'tanh'
    source: str
    # the tokenizer the model reads, as jaxgpt.tokenizer's meta() (a jaxgpt run's, an exported
    # directory's jaxgpt_tokenizer.json, a nanoGPT meta.pkl's characters); None: GPT-2's BPE
    tokenizer_meta: dict[str, Any] | None = None
    tokenizer_dir: str = ""  # a directory with vocab.json + merges.txt
    tokenizer_file: str = ""  # the file tokenizer_meta was read from, for messages
    # why the model's tokenizer cannot be had, with the fix (a nanoGPT char ckpt.pt whose meta.pkl is
    # missing or bad): raised where the tokenizer is needed, so the weights alone (a LoRA base) still load
    tokenizer_error: str = ""
    # a jaxgpt run in a layout GPT-2's table has no names for (rope, rmsnorm, swiglu, an untied head...):
    # its own parameter tree (numpy) and ModelConfig as a dict; `tensors` is then empty
    params: dict | None = None
    model_config: dict | None = None


def is_pretrained_source(init_from: str) -> bool:
    return init_from not in ("scratch", "resume")


# ----------------------------------------------------------------------------- reading sources

def load_weights(name_or_path: str, lazy: bool = False, meta_pkl: str = "") -> Weights:
    """Reads any supported source into a `Weights` table (numpy, float32, on the host).
    lazy: a safetensors directory's tensors are read only when the table is indexed (LazyTensors).
    meta_pkl: nanoGPT's meta.pkl for a ckpt.pt, instead of looking for it (see `read_nanogpt`)."""
    path = os.path.expanduser(name_or_path)
    ckpt = _nanogpt_file(path)
    if meta_pkl and not ckpt:
        raise UserError(f"--meta_pkl gives the characters of a nanoGPT ckpt.pt, and {name_or_path} is not one "
                        f"(it says itself which tokenizer it reads); drop --meta_pkl")
    if ckpt:
        return read_nanogpt(ckpt, meta_pkl)
    if name_or_path in GPT2_SIZES and not os.path.exists(path):
        return _read_hf_dir(hub_snapshot(name_or_path), source=name_or_path, lazy=lazy)
    if os.path.isfile(path):  # a .safetensors or .bin file: its directory
        return _read_hf_dir(os.path.dirname(path) or ".", source=path, lazy=lazy)
    if os.path.isdir(path):  # a jaxgpt out_dir also holds a config.json (its train config): test it first
        if os.path.isdir(os.path.join(path, "checkpoints")):
            raise UserError(f"{path} is a jaxgpt out_dir; read it with jaxgpt.loading.load or load_weights")
        if os.path.isfile(os.path.join(path, "config.json")):
            return _read_hf_dir(path, source=path, lazy=lazy)
        raise UserError(f"{path} holds no GPT-2 weights: expected config.json + model.safetensors (Hugging Face), "
                        f"ckpt.pt (nanoGPT) or checkpoints/ (a jaxgpt out_dir)")
    names = ", ".join(GPT2_SIZES)
    raise UserError(f"init_from={name_or_path!r} is neither scratch, resume, a GPT-2 name ({names}) nor an "
                    f"existing file or directory; check the path")


def _nanogpt_file(path: str) -> str:
    """The nanoGPT checkpoint `path` names (a file other than .safetensors / .bin, or an out_dir
    holding ckpt.pt but no jaxgpt checkpoints/), else ''."""
    if os.path.isfile(path):
        return "" if path.endswith((".safetensors", ".bin")) else path
    inside = os.path.join(path, "ckpt.pt")
    if os.path.isdir(path) and not os.path.isdir(os.path.join(path, "checkpoints")) and os.path.isfile(inside):
        return inside
    return ""


def hub_snapshot(name: str) -> str:
    """The local directory of an OpenAI GPT-2 checkpoint: from the Hugging Face cache, else downloaded."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError("loading GPT-2 by name needs huggingface_hub: pip install huggingface_hub") from None
    repos = (HUB_REPOS[name], name)  # the current repo id, and the old one older caches hold
    for repo in repos:
        try:
            return snapshot_download(repo, allow_patterns=list(HF_FILES), local_files_only=True)
        except Exception:  # noqa: BLE001 -- not in the cache: try the next id, then the network
            pass
    try:
        return snapshot_download(HUB_REPOS[name], allow_patterns=list(HF_FILES))
    except Exception as e:  # noqa: BLE001 -- offline, proxy, hub errors: all mean "not here"
        raise UserError(f"could not download {name} from the Hugging Face Hub ({type(e).__name__}); run once with "
                        f"network (it is cached after that) or pass a local GPT-2 directory as --init_from=PATH") from None


def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_hf_dir(path: str, source: str, lazy: bool = False) -> Weights:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise UserError(f"{path} has no config.json; a Hugging Face GPT-2 directory needs one")
    hf = _read_json(cfg_path)
    if hf.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{path} holds a {hf.get('model_type')!r} model; only GPT-2 checkpoints load here")
    act = hf.get("activation_function", "gelu_new")
    if act not in HF_GELU:
        raise UserError(f"{path} uses activation {act!r}; jaxgpt knows {', '.join(HF_GELU)}")
    files = _safetensors_files(path)
    if lazy and files:
        table: Mapping[str, np.ndarray] = LazyTensors(files)
    else:
        table = _canonical(_read_hf_tensors(path, files), transpose=False)
    has_tok = all(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "merges.txt"))
    w = Weights(table, n_head=int(hf["n_head"]), gelu=HF_GELU[act], source=source,
                tokenizer_dir=path if has_tok else "")
    tok_file = os.path.join(path, TOKENIZER_FILE)
    if os.path.isfile(tok_file):  # export_hf's char model: the characters it reads
        _set_tokenizer(w, tok_file, _vocab(table), _read_tokenizer_json)
    return w


def _vocab(table: Mapping[str, np.ndarray]) -> int:
    """The model's vocabulary size: wte's rows (0 without a wte, which to_params reports)."""
    return int(shape_of(table, "wte.weight")[0]) if "wte.weight" in table else 0


def _set_tokenizer(w: Weights, path: str, vocab: int, read) -> None:
    """w.tokenizer_meta from the file at `path` (read(path) -> meta), checked against the model's
    vocab; a file that does not read back, or does not fit, becomes w.tokenizer_error instead."""
    from jaxgpt.tokenizer import tokenizer_from_meta

    try:
        meta = read(path)
        n = tokenizer_from_meta(meta).vocab_size
    except UserError as e:
        w.tokenizer_error = str(e)
        return
    char = meta.get("tokenizer") == "char"  # a char model's vocabulary is exact; a BPE one may be padded
    if n > vocab or (char and n != vocab):
        w.tokenizer_error = (f"{path} has {n} tokens but the model in {w.source} reads {vocab}; "
                             f"use the tokenizer file of the data it was trained on")
        return
    w.tokenizer_meta, w.tokenizer_file = meta, path


def _read_tokenizer_json(path: str) -> dict[str, Any]:
    try:
        meta = _read_json(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}); export the model again") from None
    if not isinstance(meta, dict) or meta.get("tokenizer") not in ("char", "gpt2"):
        raise UserError(f"{path} is not a jaxgpt tokenizer description; export the model again")
    if meta["tokenizer"] == "char" and not (isinstance(meta.get("chars"), list)
                                            and all(isinstance(c, str) for c in meta["chars"])
                                            and meta.get("vocab_size") == len(meta["chars"])):
        raise UserError(f"{path} is damaged (its 'chars' and 'vocab_size' disagree); export the model again")
    return meta


def _safetensors_files(path: str) -> list[str]:
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        return [os.path.join(path, os.path.basename(f)) for f in sorted(set(_read_json(index)["weight_map"].values()))]
    return []


class LazyTensors(Mapping):
    """The flat table of safetensors files, each tensor read from disk (float32) when it is indexed
    and held by nobody here: memory holds only what the caller keeps. Names and layout as
    `_canonical` makes them (Hugging Face's Conv1D weights are already (in, out))."""

    def __init__(self, files: list[str]):
        from safetensors import safe_open

        self._where: dict[str, tuple[str, str]] = {}  # our name -> (file, the file's name)
        self._shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            with safe_open(f, framework="numpy") as h:
                for k in h.keys():
                    name = _canonical_name(k)
                    if name is not None:
                        self._where[name] = (f, k)
                        self._shapes[name] = tuple(h.get_slice(k).get_shape())

    def __getitem__(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        f, k = self._where[name]
        with safe_open(f, framework="numpy") as h:
            return np.asarray(h.get_tensor(k), dtype=np.float32)

    def __contains__(self, name) -> bool:  # without reading the tensor
        return name in self._where

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]


def shape_of(table: Mapping[str, np.ndarray], name: str) -> tuple[int, ...]:
    """A tensor's shape, without reading it from a LazyTensors table."""
    return table.shape(name) if isinstance(table, LazyTensors) else np.shape(table[name])


def _read_hf_tensors(path: str, files: list[str]) -> dict[str, np.ndarray]:
    if files:
        from safetensors.numpy import load_file

        out = {}
        for f in files:
            out.update(load_file(f))
        return out
    bin_path = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(bin_path):
        return _torch_load(bin_path)
    raise UserError(f"{path} has no model.safetensors or pytorch_model.bin")


def _torch_load(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise UserError(f"reading {os.path.basename(path)} needs PyTorch (pip install torch); "
                        f"safetensors directories need no PyTorch") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}


def read_nanogpt(path: str, meta_pkl: str = "") -> Weights:
    """nanoGPT's ckpt.pt: {'model': state dict, 'model_args': {...}, 'config': {...}, ...};
    nn.Linear weights are (out, in) and torch.compile'd runs prefix every name with `_orig_mod.`.

    A model whose vocabulary is not GPT-2's (a character model) reads the characters of nanoGPT's
    meta.pkl: `meta_pkl` when given, else the meta.pkl beside the checkpoint, else the one nanoGPT's
    sample.py reads, data/<config['dataset']>/meta.pkl from the current directory. A missing or bad
    one is Weights.tokenizer_error (the weights alone still load, e.g. as a LoRA base)."""
    try:
        import torch
    except ImportError:
        raise UserError("reading a nanoGPT ckpt.pt needs PyTorch: pip install torch") from None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise UserError(f"{path} is not a nanoGPT checkpoint (expected the keys 'model' and 'model_args')")
    state = {k.removeprefix("_orig_mod."): v.float().numpy() for k, v in ckpt["model"].items()}
    w = Weights(_canonical(state, transpose=True), n_head=int(ckpt["model_args"]["n_head"]),
                gelu="exact", source=path)
    vocab = _vocab(w.tensors)
    config = ckpt.get("config")
    dataset = config.get("dataset") if isinstance(config, dict) else None
    candidates = [meta_pkl] if meta_pkl else [os.path.join(os.path.dirname(path), "meta.pkl")]
    if not meta_pkl and isinstance(dataset, str) and dataset:
        candidates.append(os.path.join("data", dataset, "meta.pkl"))
    found = next((c for c in candidates if os.path.isfile(c)), "")
    if found:
        _set_tokenizer(w, found, vocab, read_meta_pkl)
    elif meta_pkl:
        w.tokenizer_error = f"--meta_pkl={meta_pkl} does not exist; pass the meta.pkl nanoGPT wrote for {path}'s data"
    elif vocab < GPT2_VOCAB:  # not GPT-2's BPE: the characters are somewhere else
        w.tokenizer_error = (f"{path} reads {vocab} tokens, not GPT-2's {GPT2_VOCAB}, and its characters are in "
                             f"nanoGPT's meta.pkl, which is at none of {', '.join(candidates)}; pass "
                             f"--meta_pkl=PATH (nanoGPT's prepare.py writes it to data/<dataset>/meta.pkl)")
    return w


class _Refused(pickle.UnpicklingError):
    """A pickle names a class _PlainUnpickler does not build."""


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles only dict, list, str and int (and what pickle builds without naming a class): no
    class is imported, no code from the file runs."""
    ALLOWED = ("dict", "list", "str", "int")

    def find_class(self, module, name):
        if module == "builtins" and name in self.ALLOWED:
            return getattr(builtins, name)
        raise _Refused(f"{module}.{name}")


def read_meta_pkl(path: str) -> dict[str, Any]:
    """The char tokenizer meta of nanoGPT's meta.pkl ({'vocab_size': n, 'itos': {i: ch}, 'stoi':
    {ch: i}}, as data/shakespeare_char/prepare.py writes it): chars[i] = itos[i], checked against
    stoi, so encoding and decoding are exactly nanoGPT's. Read without running code from the file."""
    fix = "meta.pkl may hold only dict, str, int and list, as nanoGPT's prepare.py writes it; rewrite it " \
          "with those or pass the right one with --meta_pkl=PATH"
    try:
        with open(path, "rb") as f:
            obj = _PlainUnpickler(f).load()
    except _Refused as e:
        raise UserError(f"{path} holds a {e} object; {fix}") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); pass nanoGPT's meta.pkl with --meta_pkl=PATH") from None
    except Exception as e:  # noqa: BLE001 -- a truncated or foreign file: UnpicklingError, EOFError, ...
        raise UserError(f"{path} is not a readable pickle ({type(e).__name__}); {fix}") from None

    def bad(why: str) -> UserError:
        return UserError(f"{path} is not nanoGPT's character meta.pkl ({why}); pass the one nanoGPT's "
                         f"prepare.py wrote for this model's data with --meta_pkl=PATH")

    if not isinstance(obj, dict) or not {"vocab_size", "itos", "stoi"} <= set(obj):
        raise bad("expected a dict with 'vocab_size', 'itos' and 'stoi'")
    itos, stoi, n = obj["itos"], obj["stoi"], obj["vocab_size"]
    if type(n) is not int or not isinstance(itos, dict) or not isinstance(stoi, dict):
        raise bad("'vocab_size' must be an int, 'itos' and 'stoi' dicts")
    if sorted(k for k in itos if type(k) is int) != list(range(n)) or len(itos) != n:
        raise bad(f"'itos' must map 0..{n - 1} (vocab_size {n}), it has {len(itos)} entries")
    chars = [itos[i] for i in range(n)]
    if not all(isinstance(c, str) and len(c) == 1 for c in chars):
        raise bad("'itos' must map every id to one character")
    if stoi != {c: i for i, c in enumerate(chars)}:
        raise bad("'stoi' is not the inverse of 'itos'")
    return {"tokenizer": "char", "vocab_size": n, "chars": chars}


def source_tokenizer(w: Weights):
    """The tokenizer a source's model reads: its tokenizer_meta (jaxgpt.tokenizer's meta()), else
    w.tokenizer_error (a source that knows it reads something else but cannot say what), else
    GPT-2's BPE from w.tokenizer_dir's vocab.json + merges.txt or from tiktoken's files."""
    from jaxgpt.tokenizer import load_bpe, tokenizer_from_meta

    if w.tokenizer_meta is not None:
        return tokenizer_from_meta(w.tokenizer_meta)
    if w.tokenizer_error:
        raise UserError(w.tokenizer_error)
    return load_bpe(w.tokenizer_dir)


def _canonical(state: dict[str, Any], transpose: bool) -> dict[str, np.ndarray]:
    """Hugging Face / nanoGPT names -> the flat table: drops 'transformer.', the tied lm_head and
    the attention-mask buffers; transposes nn.Linear weights (out, in) to (in, out)."""
    out = {}
    for k, v in state.items():
        k = _canonical_name(k)
        if k is None:
            continue
        v = np.asarray(v, dtype=np.float32)
        if transpose and k.endswith(LINEARS):
            v = v.T
        out[k] = v
    return out


def _canonical_name(k: str) -> str | None:
    """Our name of a stored tensor, or None for what the table leaves out (the tied lm_head, masks)."""
    k = k.removeprefix("transformer.")
    return None if k == "lm_head.weight" or k.endswith((".attn.bias", ".attn.masked_bias")) else k


# ----------------------------------------------------------------------------- table <-> params

def n_layers(tensors: dict[str, np.ndarray]) -> int:
    return len({k.split(".")[1] for k in tensors if k.startswith("h.")})


def weights_config(w: Weights, **overrides):
    """The ModelConfig of a weights table; block_size, vocab_size, n_layer and n_embd from the shapes."""
    from jaxgpt.model import ModelConfig

    if w.params is not None:
        cfg = ModelConfig.from_dict({**w.model_config, "dropout": 0.0, "lora_rank": 0, "base_quant": ""})
        return dataclasses.replace(cfg, **overrides)
    V, C = shape_of(w.tensors, "wte.weight")
    cfg = ModelConfig(model_type="gpt", vocab_size=int(V), block_size=int(shape_of(w.tensors, "wpe.weight")[0]),
                      n_layer=n_layers(w.tensors), n_head=w.n_head, n_embd=int(C), dropout=0.0,
                      bias="ln_f.bias" in w.tensors, gelu=w.gelu)
    return dataclasses.replace(cfg, **overrides)


def to_params(w: Weights, block_size: int | None = None) -> dict:
    """The flat table -> jaxgpt's nested parameter dict (numpy), with wpe cropped to block_size."""
    params: dict = {}
    for path, value in iter_params(w, block_size):
        tree = params
        for p in path[:-1]:
            tree = tree.setdefault(p, {})
        tree[path[-1]] = value
    return params


def iter_params(w: Weights, block_size: int | None = None) -> Iterator[tuple[tuple, np.ndarray]]:
    """(path in jaxgpt's parameter tree, array) for every parameter, one at a time: with a
    LazyTensors table each is read as it is asked for, and this generator keeps none of them."""
    if w.params is not None:
        yield from _iter_tree(w, block_size)
        return
    t = w.tensors
    context = shape_of(t, "wpe.weight")[0] if "wpe.weight" in t else 0
    if block_size is not None and context and block_size > context:
        raise UserError(f"block_size {block_size} is larger than the {w.source} model's context of "
                        f"{context}; pass --block_size={context} or less")
    bias = "ln_f.bias" in t
    for path, name in TOP_TABLE:
        if name.endswith(".bias") and not bias:
            continue
        if name == "wpe.weight" and block_size is not None:
            yield path, np.array(_get(t, name, w.source)[:block_size])  # a copy: the rest is freed
        else:
            yield path, _get(t, name, w.source)
    for i in range(n_layers(t)):
        for path, name in BLOCK_TABLE:
            if name.endswith(".bias") and not bias:
                continue
            yield ("h", i, *path), _get(t, f"h.{i}.{name}", w.source)


def _iter_tree(w: Weights, block_size: int | None):
    """iter_params of a run's own parameter tree (Weights.params): wpe, if any, cropped to block_size."""
    context = w.model_config["block_size"]
    if block_size is not None and "wpe" in w.params and block_size > context:
        raise UserError(f"block_size {block_size} is larger than the {w.source} model's context of "
                        f"{context}; pass --block_size={context} or less")

    def walk(tree, path):
        for k, v in tree.items():
            if isinstance(v, dict):
                yield from walk(v, (*path, k))
            elif path + (k,) == ("wpe", "embedding") and block_size is not None:
                yield (*path, k), np.array(v[:block_size])
            else:
                yield (*path, k), v

    yield from walk(w.params, ())


def _get(t, name, source):
    if name not in t:
        raise UserError(f"{source} has no tensor {name!r}; is it a GPT-2 checkpoint?")
    return t[name]


def from_params(params: dict, n_layer: int, bias: bool) -> dict[str, np.ndarray]:
    """jaxgpt's parameter dict -> the flat table. A model without biases gets zero biases, which
    computes the same function (Hugging Face's GPT-2 always has them)."""
    out = {}

    def take(tree, path, name):
        for p in path:
            if p not in tree:  # a missing bias: zeros as wide as the weight it belongs to
                return np.zeros(out[name.replace(".bias", ".weight")].shape[-1:], np.float32)
            tree = tree[p]
        return np.asarray(tree, np.float32)

    for path, name in TOP_TABLE:
        out[name] = take(params, path, name)
    for i in range(n_layer):
        for path, name in BLOCK_TABLE:
            out[f"h.{i}.{name}"] = take(params["h"][i], path, f"h.{i}.{name}")
    return out


# ----------------------------------------------------------------------------- public API

def load_params(name_or_path: str, block_size: int | None = None, meta_pkl: str = "", **overrides):
    """(params as numpy, ModelConfig, Weights) from any source; block_size crops the context;
    meta_pkl: see load_weights."""
    w = load_weights(name_or_path, meta_pkl=meta_pkl)
    params = to_params(w, block_size)
    cfg = weights_config(w, **({"block_size": block_size} if block_size else {}), **overrides)
    return params, cfg, w


def load_pretrained(name_or_path: str, dtype: str = "auto"):
    """A ready GPT model (Flax NNX, evaluation mode: no dropout) and its ModelConfig, computing in
    `dtype` ('auto': bfloat16 on GPUs and TPUs, float32 on CPUs)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxgpt.model import abstract_model, with_attention
    from jaxgpt.runtime import resolve_dtype

    params, cfg, _ = load_params(name_or_path, dtype=resolve_dtype(dtype))
    cfg = with_attention(cfg)
    graphdef, state = abstract_model(cfg)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state), cfg


def export_hf(params: dict, model_cfg, directory: str, tokenizer=None, extra_config: dict | None = None) -> str:
    """Writes a Hugging Face GPT-2 directory (config.json, model.safetensors, and the BPE files when
    the tokenizer is a BPE one, else jaxgpt_tokenizer.json, its meta()) that transformers'
    GPT2LMHeadModel.from_pretrained loads, and load_weights reads back with the same tokenizer.
    extra_config: more keys for config.json (transformers keeps unknown ones as attributes)."""
    from safetensors.numpy import save_file

    if model_cfg.model_type != "gpt":
        raise UserError("only GPT models export to the Hugging Face GPT-2 format (this one is a bigram)")
    model_cfg.check_gpt2_layout("export to the Hugging Face GPT-2 format")
    os.makedirs(directory, exist_ok=True)
    flat = from_params(params, model_cfg.n_layer, model_cfg.bias)
    save_file({f"transformer.{k}": np.ascontiguousarray(v) for k, v in flat.items()},
              os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    eot = getattr(tokenizer, "eot", None)
    hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": model_cfg.vocab_size,
          "n_positions": model_cfg.block_size, "n_embd": model_cfg.n_embd, "n_layer": model_cfg.n_layer,
          "n_head": model_cfg.n_head, "n_inner": None,
          "activation_function": "gelu_new" if model_cfg.gelu == "tanh" else "gelu",
          "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "layer_norm_epsilon": 1e-5,
          "initializer_range": 0.02, "tie_word_embeddings": True, "use_cache": True,
          "bos_token_id": eot if eot is not None else 0, "eos_token_id": eot if eot is not None else 0,
          **(extra_config or {})}
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2)
    if tokenizer is not None and hasattr(tokenizer, "write_hf_files"):
        tokenizer.write_hf_files(directory)
    elif tokenizer is not None:  # a char tokenizer has no Hugging Face form: keep jaxgpt's description
        with open(os.path.join(directory, TOKENIZER_FILE), "w", encoding="utf-8") as f:
            json.dump(tokenizer.meta(), f, ensure_ascii=False)
    return directory
