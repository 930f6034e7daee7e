"""Will the train step fit? XLA's memory analysis of the compiled step against the free memory,
before the first step runs; when it does not fit, one line naming settings that do.

    step = checked_train_step(step, graphdef, optimizer, cfg, state, state_sh, mesh, key, log=print)

The step is lowered and compiled as it will run (the same jitted function, shardings and
arguments) and that compiled executable is what the loop then calls, so the check costs no
compile of its own when the step fits. What it counts, per device (XLA's `memory_analysis()`):
the arguments (the train state and the batch), the outputs not aliased to a donated argument, the
temporaries (activations kept for the backward pass, gradients, the optimizer's intermediates)
and the generated code; plus what the run keeps beside the step (`beside`: the trainer's
checkpoints copy the state to the host while the next steps run, which on a CPU is the same
memory). The evaluation step (a forward pass, run between train steps) is smaller and not counted.

What there is: on a GPU or TPU the device's free memory (bytes_limit - bytes_in_use) plus the
state the device already holds; on a CPU the host's MemAvailable plus the state already resident,
shared by all CPU devices of the process (so the need is the per-device need times their number).
A step may use MEMORY_SHARE of it (jaxgpt.sampling's rule: the rest for fragmentation and the
runtime). Several processes on one host each see the whole host's memory: the check is then
optimistic. $JAXGPT_MEMORY_LIMIT (bytes, or with a K/M/G/T suffix, binary) replaces what there is,
e.g. to test the refusal or to keep a run inside a share of a machine.

Settings suggested on refusal keep the tokens per step: a smaller batch_size with more
gradient_accumulation_steps (the micro-batch's activations shrink, the state does not), or
activation checkpointing (remat). Each suggestion is itself compiled and checked to fit.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxgpt import parallel
from jaxgpt.errors import UserError
from jaxgpt.sampling import MEMORY_SHARE, available_memory

LIMIT_ENV = "JAXGPT_MEMORY_LIMIT"
# the remat policies tried on refusal, in order of speed (jaxgpt.model.REMAT_POLICIES)
REMAT_ORDER = ("dots", "block")


def gib(n: float) -> str:
    """Bytes as GiB, or MiB / KiB below one GiB / MiB, with one decimal."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1024:.1f} KiB"


@dataclass(frozen=True)
class StepMemory:
    """Bytes one device needs while the compiled step runs (XLA's memory analysis)."""
    arguments: int
    outputs: int
    aliased: int  # outputs written into donated arguments (the new state into the old one)
    temporaries: int
    code: int

    @classmethod
    def of(cls, compiled) -> "StepMemory":
        m = compiled.memory_analysis()
        return cls(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                   m.temp_size_in_bytes, m.generated_code_size_in_bytes)

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


class Setting(NamedTuple):
    batch_size: int
    accum: int  # gradient_accumulation_steps
    remat: str  # '' = off

    def flags(self, old: "Setting") -> str:
        """The flags that turn `old` into this setting."""
        out = []
        if self.batch_size != old.batch_size:
            out.append(f"--batch_size={self.batch_size}")
        if self.accum != old.accum:
            out.append(f"--gradient_accumulation_steps={self.accum}")
        if self.remat != old.remat:
            out.append(f"--remat={self.remat or 'none'}")
        return " ".join(out)


def parse_bytes(text: str) -> int:
    """'8000000000', '8G', '7.5GiB', '512M' -> bytes (K, M, G, T are powers of 1024)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise UserError(f"{LIMIT_ENV} must be a number of bytes, optionally with K, M, G or T (e.g. 8G); "
                        f"got {text!r}")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def memory_there(resident: int) -> tuple[int, str]:
    """(bytes the run may have in all, what they are): $JAXGPT_MEMORY_LIMIT when set, else the free
    memory (jaxgpt.sampling.available_memory) plus `resident`, the state already held."""
    limit = os.environ.get(LIMIT_ENV, "").strip()
    if limit:
        return parse_bytes(limit), f"the {LIMIT_ENV} limit"
    free, what = available_memory()
    return free + resident, f"{gib(free)} of {what} + {gib(resident)} the state holds"


def process_rss() -> int | None:
    """This process's resident memory now (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def suggest(need: Callable[[Setting], int], current: Setting, budget: int, n_batch: int,
            first: int | None = None) -> list[tuple[Setting, int]]:
    """Settings at the same tokens per step that fit in `budget`, each checked with need() (which
    compiles): the largest micro-batch without changing remat; the fastest remat policy that keeps
    less and fits at the same batch, else remat=block at the largest micro-batch that fits with it
    (when larger than the first). [] if none does.

    n_batch: the batch must be a multiple of it (the devices it is split over); first: need(current)."""
    tokens = current.batch_size * current.accum
    known: dict[Setting, int] = {} if first is None else {current: first}

    def cost(s: Setting) -> int:
        if s not in known:
            known[s] = need(s)
        return known[s]

    def largest_batch(remat: str) -> tuple[Setting, int] | None:
        # micro-batches below the current one that keep batch_size x accumulation: the need is close
        # to affine in the micro-batch, so two compiles place a line, and the pick is compiled to check
        sizes = [b for b in range(current.batch_size - 1, 0, -1) if tokens % b == 0 and b % n_batch == 0]
        if not sizes:
            return None
        at = lambda b: Setting(b, tokens // b, remat)  # noqa: E731
        small, top = sizes[-1], Setting(current.batch_size, current.accum, remat)
        if cost(at(small)) > budget:
            return None
        slope = (cost(top) - cost(at(small))) / (current.batch_size - small)
        # start where the line says the largest fit is, then one size at a time (a few compiles at most):
        # up while the next larger one fits too, down until one fits (the need grows with the batch)
        i = next((i for i, b in enumerate(sizes) if cost(at(small)) + slope * (b - small) <= budget), len(sizes) - 1)
        if cost(at(sizes[i])) <= budget:
            while i > 0 and cost(at(sizes[i - 1])) <= budget:
                i -= 1
            return at(sizes[i]), cost(at(sizes[i]))
        for b in sizes[i + 1:]:
            if cost(at(b)) <= budget:
                return at(b), cost(at(b))
        return None

    found = largest_batch(current.remat)
    out = [found] if found else []
    # the policies that keep less than the current one (REMAT_ORDER: by speed, and so by memory kept)
    stronger = REMAT_ORDER[REMAT_ORDER.index(current.remat) + 1:] if current.remat else REMAT_ORDER
    for remat in stronger:
        s = current._replace(remat=remat)
        if cost(s) <= budget:
            out.append((s, cost(s)))
            break
    else:  # the strongest policy at a micro-batch larger than the one found without changing remat
        if stronger:
            with_remat = largest_batch(stronger[-1])
            if with_remat and (not found or with_remat[0].batch_size > found[0].batch_size):
                out.append(with_remat)
    return out


def check(need: Callable[[Setting], int], current: Setting, *, resident: int, n_batch: int,
          describe: Callable[[int, bool], str], log: Callable[[str], None] = print) -> None:
    """Refuses (UserError, one line) a step whose need() does not fit, naming settings that do;
    else logs one line. describe(need, fits) says what the need is made of."""
    first = need(current)
    there, what = memory_there(resident)
    budget = int(MEMORY_SHARE * there)
    fits = first <= budget
    if parallel.any_process(not fits) and fits:  # every process of a job must stop together
        raise UserError("another process of this job has not enough memory for the train step (see its error); "
                        "pass the settings it names to every process")
    if fits:
        log(f"memory check: the train step needs about {gib(first)} ({describe(first, True)}) of the {gib(budget)} "
            f"it may use ({100 * MEMORY_SHARE:.0f}% of {gib(there)}: {what}); --memory_check=False skips this check")
        return
    options = suggest(need, current, budget, n_batch, first)
    fix = (" or ".join(f"{s.flags(current)} (about {gib(n)})" for s, n in options)
           + " (the same tokens per step)" if options else
           "no smaller batch_size or remat setting fits at the same tokens per step; use a smaller model or "
           "block_size, more devices, or --sharding=fsdp")
    raise UserError(f"the train step needs about {gib(first)} ({describe(first, False)}), more than the "
                    f"{gib(budget)} it may use ({100 * MEMORY_SHARE:.0f}% of {gib(there)}: {what}); pass {fix}; or "
                    f"--memory_check=False to try anyway")


def checked_train_step(step, graphdef, optimizer, cfg, state, state_sh, mesh, key, *, checkpoint_copy: bool = False,
                       log: Callable[[str], None] = print, masked: bool = False):
    """The compiled train step (the jitted `step` lowered with these arguments), after checking that
    it fits (see the module's docstring); a UserError naming settings that fit if it does not.

    state: the train state, already on the devices (the step's arguments hold it); checkpoint_copy:
    the run checkpoints, which on a CPU adds a host copy of the saved state (params + optimizer)."""
    from jaxgpt.step import make_train_step  # step imports the model; keep this module light to import

    current = Setting(cfg.batch_size, cfg.gradient_accumulation_steps, "" if cfg.remat == "none" else cfg.remat)
    batch_sh, repl = parallel.batch_sharding(mesh, 3), parallel.replicated(mesh)
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    cpu = local[0].platform == "cpu"
    per_device = parallel.bytes_per_device(state)
    # on a CPU all the process's devices share the host's memory; an accelerator has its own
    sharing = len(local) if cpu else 1
    resident = sum(per_device.values()) if cpu else max(per_device.values(), default=0)
    beside = parallel.tree_bytes(state.replace(frozen={})) // jax.process_count() if cpu and checkpoint_copy else 0
    compiled, memory = {}, {}

    def need(s: Setting) -> int:
        fn = step if s == current else make_train_step(
            graphdef, optimizer, dataclasses.replace(cfg, batch_size=s.batch_size, gradient_accumulation_steps=s.accum,
                                                     remat=s.remat), state_sh, batch_sh, repl, masked=masked)
        batch = jax.ShapeDtypeStruct((s.accum, s.batch_size, cfg.block_size), jnp.int32, sharding=batch_sh)
        c = fn.lower(state, (batch, batch), key).compile()
        if s == current:
            compiled[s] = c
        mem = StepMemory.of(c)
        memory[s] = mem
        return sharing * mem.total + beside

    def describe(total: int, fits: bool) -> str:
        m = memory[current]
        parts = [f"{what} {gib(sharing * n)}" for what, n in (
            ("state and batch", m.arguments), ("activations and temporaries", m.temporaries),
            ("new outputs", m.outputs - m.aliased), ("code", m.code)) if sharing * n >= 0.02 * m.total]
        if beside:
            parts.append(f"the checkpoints' host copy of the state {gib(beside)}")
        if sharing > 1:
            parts.append(f"{sharing} CPU devices")
        rss = process_rss() if cpu and fits else None
        if rss is not None:  # what the state already holds is part of the RSS now
            parts.append(f"peak RSS of this process expected near {gib(rss + total - resident)}")
        return ", ".join(parts)

    check(need, current, resident=resident, n_batch=mesh.devices.size, describe=describe, log=log)
    return compiled[current]
