"""A GPT-2-shaped Hugging Face directory with random weights, written here, offline: for trying
finetuning recipes and measuring memory on the real shapes when OpenAI's weights cannot be
downloaded.

    python scripts/random_gpt2.py --size=gpt2-medium --out=gpt2-medium-random
    python train.py --config configs/finetune_code_qlora.py --init_from=gpt2-medium-random ...

Writes config.json, model.safetensors (float32; weights N(0, 0.02), LayerNorm scales 1, biases 0,
as GPT-2 initializes) and a byte-level BPE tokenizer (vocab.json + merges.txt: the 256 byte
tokens and <|endoftext|>, no merges: one token per byte; the model keeps GPT-2's 50257 rows).
model.safetensors is streamed to disk one tensor at a time, so even gpt2-xl (6.2 GB) needs
no more memory than its largest tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxgpt.config import GPT2_SIZES  # noqa: E402
from jaxgpt.tokenizer import bytes_to_unicode  # noqa: E402

VOCAB, CONTEXT = 50257, 1024


def tensor_shapes(n_layer: int, c: int) -> list[tuple[str, tuple[int, ...]]]:
    """Hugging Face GPT-2 names and shapes (Conv1D weights are (in, out))."""
    out = [("transformer.wte.weight", (VOCAB, c)), ("transformer.wpe.weight", (CONTEXT, c))]
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        out += [(p + "ln_1.weight", (c,)), (p + "ln_1.bias", (c,)),
                (p + "attn.c_attn.weight", (c, 3 * c)), (p + "attn.c_attn.bias", (3 * c,)),
                (p + "attn.c_proj.weight", (c, c)), (p + "attn.c_proj.bias", (c,)),
                (p + "ln_2.weight", (c,)), (p + "ln_2.bias", (c,)),
                (p + "mlp.c_fc.weight", (c, 4 * c)), (p + "mlp.c_fc.bias", (4 * c,)),
                (p + "mlp.c_proj.weight", (4 * c, c)), (p + "mlp.c_proj.bias", (c,))]
    return out + [("transformer.ln_f.weight", (c,)), ("transformer.ln_f.bias", (c,))]


def write_safetensors(path: str, shapes, seed: int) -> None:
    """The safetensors format written directly: an 8-byte header length, a JSON header of names,
    dtypes, shapes and byte ranges, then the raw little-endian data, tensor after tensor."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes:
        n = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in shapes:
            if name.endswith(".bias"):
                x = np.zeros(shape, np.float32)
            elif ".ln_" in name:
                x = np.ones(shape, np.float32)
            else:
                x = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype("<f4")
            f.write(x.tobytes())


def write_byte_tokenizer(out: str) -> None:
    chars = bytes_to_unicode()
    vocab = {chars[b]: b for b in range(256)}
    vocab["<|endoftext|>"] = 256
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")


def write_random_gpt2(size: str, out: str, seed: int = 0) -> str:
    n_layer, n_head, c = GPT2_SIZES[size]
    os.makedirs(out, exist_ok=True)
    write_safetensors(os.path.join(out, "model.safetensors"), tensor_shapes(n_layer, c), seed)
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": VOCAB, "n_positions": CONTEXT,
           "n_embd": c, "n_layer": n_layer, "n_head": n_head, "activation_function": "gelu_new",
           "layer_norm_epsilon": 1e-5, "bos_token_id": 256, "eos_token_id": 256, "tie_word_embeddings": True}
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    write_byte_tokenizer(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="gpt2-medium", choices=list(GPT2_SIZES))
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    write_random_gpt2(a.size, a.out, a.seed)
    print(f"wrote a random {a.size} to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
