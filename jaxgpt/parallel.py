"""Devices, meshes and shardings: data parallel (dp) and fully sharded data parallel (fsdp).

One mechanism: a 2-D device mesh with axes ('data', 'fsdp'). The global batch is split over
both axes; parameters and optimizer state are split over 'fsdp', each array along its largest
dimension divisible by the axis size, and replicated over 'data'.

    sharding=dp               mesh (N, 1): parameters replicated, batch split N ways
    sharding=fsdp             mesh (1, N): parameters, optimizer state and batch split N ways
    mesh_shape=DxF            D-way data x F-way fsdp (hybrid), e.g. 2x4 on 8 devices

jit places the computation from these shardings (XLA inserts the all-gathers and
reduce-scatters); the step function itself does not change.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxgpt.errors import UserError

AXES = ("data", "fsdp")


def maybe_initialize_distributed(timeout_s: int = 120) -> None:
    """Joins a job of several processes when launched as one; does nothing otherwise.

    Explicit: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID, as `python -m jaxgpt.launch` sets them, or as a user sets them on each node.
    Detected by JAX itself: SLURM or Open MPI with more than one task, or a multi-host Cloud TPU
    slice (TPU_WORKER_HOSTNAMES naming several hosts). On CPUs the processes talk through gloo.
    A process that cannot reach the others within timeout_s ends with one line.
    """
    env = os.environ
    explicit = {}
    if env.get("JAX_NUM_PROCESSES") or env.get("JAX_PROCESS_ID"):
        try:
            explicit = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                            num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
        except (KeyError, ValueError):
            raise UserError("a multi-process start needs JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N and "
                            "JAX_PROCESS_ID=i (0..N-1) together; or start with python -m jaxgpt.launch") from None
    multi = (explicit
             or int(env.get("SLURM_NTASKS", "1")) > 1
             or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
             or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1)
    if not multi or (explicit and explicit["num_processes"] == 1) or jax.distributed.is_initialized():
        return
    # collectives between the CPU devices of several processes (what an accelerator's never use)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(initialization_timeout=timeout_s, **explicit)
    except Exception as e:  # noqa: BLE001 -- any failure to join is the same fact for the user
        where = explicit.get("coordinator_address") or env.get("JAX_COORDINATOR_ADDRESS", "the coordinator")
        raise UserError(f"process {explicit.get('process_id', '?')} could not join the job at {where} within "
                        f"{timeout_s} s ({type(e).__name__}); check that every process was started with the "
                        f"same address and process count") from None


def set_cpu_devices(n: int) -> None:
    """Splits the host CPU into n JAX devices; must run before JAX starts its backends.

    For small models a batch split over the cores (one device each) beats splitting every
    op over them: the laptop recipe runs ~1.4x faster with 2 devices on a 2-core machine."""
    if n > 0:
        jax.config.update("jax_num_cpu_devices", n)


def needs_step_sync(mesh: Mesh) -> bool:
    """XLA's CPU collectives can deadlock when steps of a multi-device program overlap (seen
    here: an all-reduce rendezvous timing out in about 1 run in 3); on several CPU devices the
    loop waits for each step. GPUs and TPUs keep fully asynchronous dispatch."""
    return mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"


def mesh_dims(sharding: str, mesh_shape: str, n_devices: int) -> tuple[int, int]:
    if mesh_shape:
        try:
            parts = [int(p) for p in mesh_shape.lower().split("x")]
        except ValueError:
            raise UserError(f"mesh_shape must look like 'N' or 'DxF' (e.g. 2x4), got {mesh_shape!r}") from None
        if len(parts) == 1:
            parts = [parts[0], 1] if sharding == "dp" else [1, parts[0]]
        if len(parts) != 2 or min(parts) < 1:
            raise UserError(f"mesh_shape must look like 'N' or 'DxF' (e.g. 2x4), got {mesh_shape!r}")
        d, f = parts
    else:
        d, f = (n_devices, 1) if sharding == "dp" else (1, n_devices)
    if sharding == "dp" and f != 1:
        raise UserError(f"mesh_shape {mesh_shape} shards parameters {f} ways; use --sharding=fsdp for that")
    if d * f > n_devices:
        raise UserError(f"mesh_shape {d}x{f} needs {d * f} devices but {n_devices} are visible; "
                        f"use a smaller mesh_shape")
    return d, f


def make_mesh(sharding: str = "dp", mesh_shape: str = "") -> Mesh:
    devices = jax.devices()
    d, f = mesh_dims(sharding, mesh_shape, len(devices))
    return Mesh(np.asarray(devices[:d * f]).reshape(d, f), AXES)


def local_mesh() -> Mesh:
    """A one-device mesh on this process's first device: where a process reads a model on its own
    (jax.devices()[0] belongs to process 0 in a job of several)."""
    return Mesh(np.asarray(jax.local_devices()[:1]).reshape(1, 1), AXES)


def check_batch(mesh: Mesh, batch_size: int) -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise UserError(f"batch_size {batch_size} cannot be split over {n} devices; use a multiple of {n} "
                        f"(e.g. --batch_size={n * max(1, round(batch_size / n))}) or a smaller --mesh_shape")


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Shards an array along its largest dimension divisible by the fsdp size, else replicates it."""
    if fsdp == 1 or not shape:
        return P()
    dims = [d for d in range(len(shape)) if shape[d] % fsdp == 0]
    if not dims:
        return P()
    dim = max(dims, key=lambda d: shape[d])
    return P(*[("fsdp" if d == dim else None) for d in range(len(shape))])


def state_shardings(abstract_tree, mesh: Mesh):
    """A NamedSharding for every array of a pytree (params, optimizer state, step)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda a: NamedSharding(mesh, param_spec(tuple(a.shape), fsdp)), abstract_tree)


def batch_sharding(mesh: Mesh, ndim: int = 3) -> NamedSharding:
    """(A, B, T) micro-batches, or (B, T) with ndim=2: the batch axis split over all devices."""
    spec = (None, AXES, None) if ndim == 3 else (AXES, None)
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs that carry shardings: a restore target for any mesh."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


def bytes_per_device(tree) -> dict:
    """Bytes each device holds of a pytree of jax arrays."""
    out: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def tree_bytes(tree) -> int:
    """Bytes of a pytree's arrays, all devices' shards together (a QTensor: its codes and scales)."""
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def host_value(x) -> np.ndarray:
    """A replicated (e.g. scalar) array as numpy, also when it spans several processes."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def put(tree, shardings):
    """Host (numpy) arrays onto their shardings, also when the mesh spans several processes:
    each process writes only the pieces of its own devices (jax.device_put cannot address
    another process's devices). Every process must hold the same host values."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x[idx])),
                        tree, shardings)


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process of the job (a host-level collective: every process
    must call it at the same point). With one process, the flag itself."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def agree_on(value: str, message: str) -> None:
    """Every process of a job must hold the same `value` (e.g. which checkpoint it read); a
    UserError with `message` on every process otherwise. A host collective: every process calls it
    at the same point. With one process, nothing to check."""
    if jax.process_count() == 1:
        return
    import zlib

    from jax.experimental import multihost_utils

    h = np.asarray(zlib.crc32(value.encode()), dtype=np.uint32)
    if not np.all(multihost_utils.process_allgather(h) == h):
        raise UserError(message)


def launched_index() -> int:
    """This process's index in a job, read from what launchers set (python -m jaxgpt.launch, SLURM,
    Open MPI), without joining the job: for scripts whose work one process does alone (sampling,
    export), which the other processes of a job skip. 0 outside a job."""
    for var in ("JAX_PROCESS_ID", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def process_zero_first(fn, *args, **kwargs):
    """fn(*args, **kwargs) on process 0, then on the others once it is done: for work on a shared
    disk that one process must do (preparing the data) and the others then only read."""
    if jax.process_count() == 1:
        return fn(*args, **kwargs)
    from jax.experimental import multihost_utils

    out = fn(*args, **kwargs) if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("jaxgpt: process 0 done first")
    return out if jax.process_index() == 0 else fn(*args, **kwargs)


def global_batch_from_host(make_rows, shape: tuple[int, ...], sharding: NamedSharding):
    """Builds a global array whose rows each process reads itself: make_rows(index) returns the
    numpy block for one device's slice of the global array (multi-host data loading)."""
    return jax.make_array_from_callback(shape, sharding, make_rows)
