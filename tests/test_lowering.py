"""Every shipped config's accelerator programs, traced and lowered on this CPU for 'cuda' and 'tpu'
(jaxgpt.lowering, jax.export): the train step, the eval step and the decoding engine's prefill,
extend and refill, at the dtype and attention the config resolves to on that platform. The model
is shrunk (one layer, two heads of the config's head size, 128 positions), everything else is the
config's: dtype, modern options, dropout, LoRA and QLoRA structure, batch and accumulation (at
most 2 micro-batches), the vocabulary of its tokenizer or base model. A failure names the config,
the program and the platform. What lowering cannot see (the device compilers, memory, speed):
docs/accelerators.md."""

import dataclasses
import functools

import pytest

from shrunk import CONFIGS, base_model, shipped, tiny
from jaxgpt import lowering
from jaxgpt import model as model_lib

@functools.lru_cache(maxsize=None)
def config_programs(name: str, platform: str, attn_impl: str = ""):
    """(model config, programs) of a shipped config on `platform`; attn_impl: instead of the config's."""
    cfg = tiny(name)
    m = lowering.for_platform(base_model(name), cfg.dtype, attn_impl or cfg.attn_impl, platform)
    return m, lowering.programs(m, cfg, train=not cfg.eval_only)


CASES = [(name, platform, program) for name in CONFIGS for platform in lowering.PLATFORMS
         for program in lowering.PROGRAMS if not (program == "train_step" and shipped(name).eval_only)]


@pytest.mark.slow
@pytest.mark.parametrize("name, platform, program", CASES)
def test_shipped_config_program_lowers_for_the_accelerator(name, platform, program):
    m, progs = config_programs(name, platform)
    assert m.dtype == ("float32" if shipped(name).dtype == "float32" else "bfloat16")  # what auto means there
    failures = lowering.check({program: progs[program]}, [platform], what=f"configs/{name} ({m.dtype}, "
                                                                            f"attention {m.attn_impl})")
    assert not failures, "\n".join(failures)


SPLASH_CASES = [(name, program) for name in CONFIGS for program in ("train_step", "eval_step")
                if shipped(name).model_type == "gpt" and not (program == "train_step" and shipped(name).eval_only)]


@pytest.mark.slow
@pytest.mark.parametrize("name, program", SPLASH_CASES)
def test_shipped_config_lowers_for_tpu_with_splash_attention(name, program):
    """attn_impl=splash, which auto picks on TPUs for head sizes a multiple of 128 (the shipped
    configs' are 32 and 64, so auto gives XLA's there): the Pallas kernel lowers into each program
    (a config with dropout trains with the explicit attention, and evaluates with splash)."""
    m, progs = config_programs(name, "tpu", "splash")
    assert m.attn_impl == "splash"
    failures = lowering.check({program: progs[program]}, ["tpu"], what=f"configs/{name} (attention splash)")
    assert not failures, "\n".join(failures)
    text = lowering.lower(*progs[program], "tpu").mlir_module()
    uses_splash = not (program == "train_step" and m.dropout > 0)  # attention-weight dropout: explicit
    assert ("tpu_custom_call" in text) == uses_splash  # the kernel is in the program, not a fallback


def test_the_check_names_the_config_program_and_platform_that_fail():
    """Two genuine breaks: float32 fed to cuDNN flash attention (bf16/fp16 only), which auto never
    does (a pick_attention that forgot the dtype would), and the TPU kernel lowered for a GPU."""
    cfg = tiny("shakespeare_char_cpu.py")
    m = dataclasses.replace(base_model("shakespeare_char_cpu.py"), dtype="float32", attn_impl="cudnn")
    failures = lowering.check(lowering.programs(m, cfg), ["cuda"], what="configs/shakespeare_char_cpu.py")
    # only the full-sequence programs use it: decoding keeps the cached attention
    assert [f.split(":")[1].strip() for f in failures] == ["train_step does not lower for cuda",
                                                           "eval_step does not lower for cuda"], failures
    assert all(f.startswith("configs/shakespeare_char_cpu.py: ") for f in failures)
    m = dataclasses.replace(m, dtype="bfloat16", attn_impl="splash")
    eval_only = {"eval_step": lowering.programs(m, cfg)["eval_step"]}
    failures = lowering.check(eval_only, ["cuda", "tpu"], what="configs/shakespeare_char_cpu.py")
    assert len(failures) == 1 and "eval_step does not lower for cuda" in failures[0], failures
    assert "tpu" in failures[0].split("does not lower for cuda:")[1]  # the error says why: TPU parameters


def test_a_break_on_the_tpu_path_only_fails_for_tpu(monkeypatch):
    """A change that breaks only what a TPU runs is caught without a TPU: here splash tiles of 64
    positions (an edit of SPLASH_BLOCKS that forgets the kernel's 128-lane tiles)."""
    monkeypatch.setattr(model_lib, "SPLASH_BLOCKS", (64,))
    cfg = tiny("train_gpt2.py")
    for platform, expected in [("tpu", 1), ("cuda", 0)]:  # auto: splash for a TPU (head size 128 here), XLA for cuda
        m = lowering.for_platform(dataclasses.replace(base_model("train_gpt2.py"), n_embd=256), cfg.dtype, "auto",
                                  platform)
        assert m.attn_impl == ("splash" if platform == "tpu" else "xla")
        failures = lowering.check({"eval_step": lowering.programs(m, cfg)["eval_step"]}, [platform],
                                  what="configs/train_gpt2.py")
        assert len(failures) == expected, failures
        if expected:
            assert failures[0].startswith("configs/train_gpt2.py: eval_step does not lower for tpu: ValueError")
            assert "multiple of 128" in failures[0]


SHARDED = r"""
import json, sys
sys.path.insert(0, "tests")
from shrunk import CONFIGS, base_model, shipped, tiny
from jaxgpt import lowering, parallel
out = []
for name in CONFIGS:
    B = shipped(name).batch_size
    cfg = tiny(name, f"--batch_size={B if B % 2 == 0 else 2 * B}")  # a batch the 2 devices split
    for sharding in ("dp", "fsdp"):
        mesh = parallel.make_mesh(sharding, "")
        for platform, attn in [("cuda", cfg.attn_impl), ("tpu", cfg.attn_impl), ("tpu", "splash")]:
            if attn == "splash" and cfg.model_type != "gpt":
                continue
            m = lowering.for_platform(base_model(name), cfg.dtype, attn, platform)
            progs = lowering.programs(m, cfg, train=not cfg.eval_only, mesh=mesh)
            out += lowering.check(progs, [platform], what=f"configs/{name} ({sharding} x 2, attention {m.attn_impl})")
print(json.dumps(out))
"""


@pytest.mark.slow
def test_shipped_configs_sharded_steps_lower_for_the_accelerators():
    """The train and eval steps as the trainer builds them for 2 devices (the batch sharded: dp;
    the parameters and optimizer state too: fsdp), lowered for cuda and tpu, and with splash for
    tpu: what a multi-device run compiles (a Mosaic kernel, which XLA cannot partition, fails
    here unless it runs per device)."""
    import json
    import subprocess
    import sys

    from conftest import ROOT, subprocess_env

    r = subprocess.run([sys.executable, "-c", SHARDED], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=subprocess_env(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    failures = json.loads(r.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(failures)
