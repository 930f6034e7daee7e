"""What depends on the machine a run executes on: the compute dtype that 'auto' means, the
precision of float32 matmuls, and the persistent XLA compilation cache the scripts share.

    cfg.dtype = resolve_dtype(cfg.dtype, platform)       # 'auto' -> 'bfloat16' on GPU/TPU, 'float32' on CPU
    with matmul_precision(cfg.matmul_precision): ...     # 'highest' = exact float32 on NVIDIA GPUs
    enable_compilation_cache("")                          # the scripts call this before compiling anything

Nothing here runs at import: JAX is imported inside the functions, so the scripts can still
fix the CPU device count before JAX starts its backends.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

DTYPES = ("auto", "float32", "bfloat16")
MATMUL_PRECISIONS = ("default", "high", "highest")
CACHE_OFF = ("off", "none", "false", "0")
# Programs that compile faster than this are not written to the cache. JAX's default (1 s) would
# leave out most programs of a small model on a CPU, which together still take seconds to compile.
CACHE_MIN_COMPILE_SECS = 0.1
# The default cache lives in the user's home: evict the least recently used programs past this size.
CACHE_MAX_BYTES = 2 << 30


def current_platform() -> str:
    """'cpu', 'gpu' or 'tpu': the platform of the devices JAX uses (starts JAX's backends)."""
    import jax

    return jax.devices()[0].platform


def resolve_dtype(dtype: str, platform: str | None = None) -> str:
    """The compute dtype for `dtype` on `platform` (default: the current one). 'auto' is what
    nanoGPT picks: bfloat16 where matrix units run it natively (GPUs, TPUs), float32 on CPUs,
    where XLA's bf16 matmuls run no faster than float32 (measured) and only add rounding.
    'float32' and 'bfloat16' are kept as they are."""
    if dtype != "auto":
        return dtype
    return "float32" if (platform or current_platform()) == "cpu" else "bfloat16"


def matmul_precision(name: str):
    """A context in which float32 matmuls use the given precision. 'default' leaves JAX's choice:
    on NVIDIA GPUs (Ampere and later) XLA computes float32 matmuls in TF32, with a 10-bit mantissa;
    'high' is TF32 on GPUs and 3-pass bf16 on TPUs; 'highest' is exact float32 everywhere. CPUs
    compute float32 exactly in every mode. bfloat16 matmuls are not affected."""
    if name == "default":
        return contextlib.nullcontext()
    import jax

    return jax.default_matmul_precision(name)


def cache_dir(setting: str = "", environ=None) -> str | None:
    """Where the compilation cache lives: None when `setting` is 'off'; a given directory; else
    $JAX_COMPILATION_CACHE_DIR when set, else $XDG_CACHE_HOME/jaxgpt/xla (~/.cache/jaxgpt/xla)."""
    env = os.environ if environ is None else environ
    if setting.strip().lower() in CACHE_OFF:
        return None
    path = setting.strip() or env.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "jaxgpt", "xla")
    return os.path.abspath(os.path.expanduser(path))


def enable_compilation_cache(setting: str = "") -> str | None:
    """Turns on JAX's persistent compilation cache in cache_dir(setting) (or off): a second run
    with the same shapes loads its compiled programs instead of compiling them again. Must run
    before the process compiles anything (JAX decides once per process whether it uses a cache).
    Returns the directory, or None when off."""
    import jax

    path = cache_dir(setting)
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    # the user's own JAX settings, read by JAX from the environment, win over these defaults
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECS)
    # (JAX needs the filelock package to evict; huggingface_hub, a dependency, brings it)
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ and importlib.util.find_spec("filelock"):
        jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    return path
