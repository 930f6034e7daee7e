"""The compiled train step's memory at a model shape, from XLA's memory analysis: compiled only,
never run, so a GPT-2 124M step can be measured on a laptop (on a 2-core CPU: 4 to 14 s wall clock,
peak RSS 0.5 GB; running that step would need ~37 GB). What docs/accelerators.md's loss-head
figures come from.

    python scripts/head_memory.py --config configs/train_gpt2.py --gradient_accumulation_steps=1 \
        --dtype=float32 --vocab_size=50304 [--key=value ...]

Flags are training config keys (the model and batch are the config's), plus --vocab_size. Prints
the analysis (temporary, argument, output bytes) as a line of JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def head_chunk(B: int, T: int, V: int) -> int | None:
    """Positions per chunk of the loss head (T: the full logits), None before jaxgpt.head existed."""
    try:
        from jaxgpt.head import chunk_len
    except ImportError:
        return None
    return chunk_len(B, T, V)


def main(argv: list[str]) -> int:
    import jax

    from jaxgpt.config import parse_args
    from jaxgpt.model import model_config
    from jaxgpt.runtime import resolve_dtype
    from jaxgpt.step import abstract_state, make_train_step

    vocab = 65
    rest = []
    for a in argv:
        if a.startswith("--vocab_size="):
            vocab = int(a.split("=", 1)[1])
        else:
            rest.append(a)
    cfg = parse_args(rest).validate(paths=False)
    cfg.dtype = resolve_dtype(cfg.dtype)
    mcfg = model_config(cfg, vocab, log=lambda s: None)
    graphdef, abstract, optimizer = abstract_state(mcfg, cfg)
    step = make_train_step(graphdef, optimizer, cfg)
    A, B, T = cfg.gradient_accumulation_steps, cfg.batch_size, cfg.block_size
    batch = (jax.ShapeDtypeStruct((A, B, T), jax.numpy.int32),) * 2
    t0 = time.perf_counter()
    compiled = step.lower(abstract, batch, jax.random.key(0)).compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    res = {"temp_bytes": m.temp_size_in_bytes, "argument_bytes": m.argument_size_in_bytes,
           "output_bytes": m.output_size_in_bytes, "alias_bytes": m.alias_size_in_bytes,
           "compile_s": round(seconds, 1), "B": B, "T": T, "A": A, "V": vocab, "dtype": cfg.dtype,
           "n_layer": mcfg.n_layer, "n_embd": mcfg.n_embd, "head_chunk": head_chunk(B, T, vocab)}
    print(f"temporary {m.temp_size_in_bytes / 2**30:.3f} GiB ({m.temp_size_in_bytes:,} bytes), arguments "
          f"{m.argument_size_in_bytes / 2**30:.3f} GiB, outputs {m.output_size_in_bytes / 2**30:.3f} GiB; "
          f"compiled in {seconds:.0f} s")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
