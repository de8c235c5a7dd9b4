"""One named device mesh (data, fsdp, tensor), the logical-axis rules table, shardings, multi-host start.

Every parameter carries logical axis names (`nn.with_logical_partitioning` in the model); `MeshConfig.axis_rules`
maps them to mesh axes. Changing a parallelism strategy is a config change:

    mesh: {data: -1, fsdp: 1, tensor: 1}   # pure data parallel (every device holds all parameters)
    mesh: {data: 1, fsdp: -1, tensor: 1}   # ZeRO-3 style: parameters and optimizer state split on `embed`
    mesh: {data: 2, fsdp: 2, tensor: 2}    # mixed, with Megatron-style tensor parallel heads/MLP

A parameter dimension whose size does not divide by its mesh axes (the 1025-wide stop-token heads over
`tensor`, for instance) is kept whole on that dimension: it is replicated there rather than refused.
Batches are split over the mesh axes of the logical `batch` axis (("data", "fsdp") in the default rules).
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from valle_jax.config import ConfigError, MeshConfig, TrainConfig

MESH_AXES = ("data", "fsdp", "tensor")


# ---------------------------------------------------------------------------------------------------------
# multi-host start


def initialize_distributed(train: TrainConfig | None = None) -> bool:
    """Start `jax.distributed` when this is a multi-process run; returns True if it was started.

    Explicit: `train.coordinator_address`, `train.num_processes`, `train.process_id` (e.g. two processes on
    localhost). Automatic (no arguments, JAX detects the cluster): Cloud TPU VMs (`TPU_WORKER_HOSTNAMES`,
    `TPU_WORKER_ID`; JAX then asks the metadata server), SLURM (`SLURM_JOB_ID` with more than one task),
    Open MPI (`OMPI_COMM_WORLD_SIZE`), or `VALLE_JAX_DISTRIBUTED=1` to force it. A single-process run does
    nothing. Call before any other JAX use.
    """
    if jax.distributed.is_initialized():
        return True
    t = train or TrainConfig()
    if t.coordinator_address is not None or (t.num_processes or 1) > 1:
        if t.coordinator_address is None or t.num_processes is None or t.process_id is None:
            raise ConfigError("train.coordinator_address, train.num_processes and train.process_id go together "
                              f"(got {t.coordinator_address!r}, {t.num_processes!r}, {t.process_id!r})")  # fmt: skip
        jax.distributed.initialize(coordinator_address=t.coordinator_address, num_processes=int(t.num_processes),
                                   process_id=int(t.process_id))  # fmt: skip
        return True
    if _cluster_detected():
        jax.distributed.initialize()
        return True
    return False


def _cluster_detected() -> bool:
    env = os.environ
    if env.get("VALLE_JAX_DISTRIBUTED", "") in ("1", "true", "yes"):
        return True
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return True
    if "TPU_WORKER_ID" in env or "CLOUD_TPU_TASK_ID" in env:  # Cloud TPU VM: JAX reads the slice from the metadata server
        return True
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1 and "SLURM_JOB_ID" in env:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    return False


# ---------------------------------------------------------------------------------------------------------
# mesh


def mesh_shape(mesh_cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with at most one -1 filled by the remaining devices; the product must be n_devices."""
    sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
    if sizes.count(-1) > 1:
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: sizes must be >= 1 (or -1 = fill)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: {n_devices} devices do not divide by {known}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                          f"{n_devices} are available")  # fmt: skip
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_cfg: MeshConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: every device of every process).

    Axis types are `Auto` (sharding propagated by the compiler from the in/out shardings of `jax.jit`): the
    same meaning on jax 0.10 and 0.11, where `jax.make_mesh` would otherwise default to `Explicit`.
    """
    mesh_cfg = mesh_cfg or MeshConfig()
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(mesh_cfg, len(devices))
    kw: dict[str, Any] = {"devices": devices}
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is not None:
        kw["axis_types"] = (axis_type.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, **kw)
    except TypeError:  # very old jax: no axis_types
        kw.pop("axis_types", None)
        return jax.make_mesh(shape, MESH_AXES, **kw)


# ---------------------------------------------------------------------------------------------------------
# rules -> shardings


def axis_rules(mesh_cfg: MeshConfig | None = None) -> tuple[tuple[str, Any], ...]:
    """The config's rules as flax expects them: ((logical, mesh axis | (mesh axes...) | None), ...)."""
    rules = (mesh_cfg or MeshConfig()).axis_rules
    out = []
    for rule in rules:
        if not isinstance(rule, (list, tuple)) or len(rule) != 2:
            raise ConfigError(f"mesh.axis_rules entry {rule!r}: expected [logical_name, mesh_axis | [axes] | null]")
        name, target = rule
        if isinstance(target, (list, tuple)):
            target = tuple(target)
            bad = [a for a in target if a not in MESH_AXES]
        else:
            bad = [target] if target is not None and target not in MESH_AXES else []
        if bad:
            raise ConfigError(f"mesh.axis_rules entry {rule!r}: unknown mesh axis {bad[0]!r} (axes: {MESH_AXES})")
        out.append((str(name), target))
    return tuple(out)


def _axis_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def spec_for(logical: Sequence[str | None] | P | None, shape: Sequence[int], mesh: Mesh, rules) -> P:
    """Mesh PartitionSpec for one array: logical names -> mesh axes; a dimension that does not divide evenly by
    its mesh axes (or a mesh axis already used by an earlier dimension) stays unsplit."""
    if logical is None:
        return P()
    logical = tuple(logical)
    mesh_axes = tuple(nn.logical_to_mesh_axes(logical, rules)) if logical else ()
    used: set[str] = set()
    out = []
    for dim, axes in zip(shape, mesh_axes):
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        names = tuple(a for a in names if a not in used and mesh.shape.get(a, 1) > 1)
        if names and dim % _axis_size(mesh, names) == 0:
            used.update(names)
            out.append(names[0] if len(names) == 1 else names)
        else:
            out.append(None)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding by logical axis names, through the same rules table as the parameters (the
    flax `nn.logical_axis_rules` context the trainer sets) on the mesh the trainer sets (`jax.sharding.set_mesh`).
    A no-op outside such a context (inference, tests without a mesh). Dimensions that do not divide stay whole."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    rules = nn.get_logical_axis_rules()
    if not rules:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(tuple(logical), x.shape, mesh, rules)))


def param_shardings(params_or_shapes: Any, logical_specs: Any, mesh: Mesh, rules) -> Any:
    """NamedSharding per parameter from its logical axes (`models.valle.logical_axes`) and shape."""
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, spec_for(spec, np.shape(x) if not hasattr(x, "shape") else x.shape, mesh, rules)),
        logical_specs,
        params_or_shapes,
        is_leaf=lambda s: isinstance(s, P) or s is None,
    )


def _dict_key_suffix(path) -> tuple[str, ...]:
    """Trailing run of dict keys of a pytree path (the parameter path inside an optimizer state subtree)."""
    keys: list[str] = []
    for entry in reversed(path):
        if isinstance(entry, jax.tree_util.DictKey):
            keys.append(str(entry.key))
        else:
            break
    return tuple(reversed(keys))


def like_params_shardings(tree_shapes: Any, params_shapes: Any, params_sharding: Any, mesh: Mesh) -> Any:
    """Shardings for a tree holding parameter-shaped subtrees (optimizer moments, accumulated gradients): a leaf
    whose trailing dict-key path and shape match a parameter gets that parameter's sharding, anything else
    (counts, scalars, Prodigy's estimates) is replicated."""
    by_path: dict[tuple[str, ...], tuple[tuple[int, ...], NamedSharding]] = {}
    for (path, shp), (_, shd) in zip(jax.tree_util.tree_flatten_with_path(params_shapes)[0],
                                     jax.tree_util.tree_flatten_with_path(params_sharding)[0]):  # fmt: skip
        by_path[_dict_key_suffix(path)] = (tuple(shp.shape), shd)
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        suffix = _dict_key_suffix(path)
        hit = by_path.get(suffix)
        if hit is not None and hit[0] == tuple(leaf.shape):
            return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree_shapes)


def batch_spec(mesh: Mesh, rules) -> P:
    """PartitionSpec of a batch's leading axis: the mesh axes of the logical `batch` axis (size > 1 only)."""
    axes = nn.logical_to_mesh_axes(("batch",), rules)[0]
    names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    names = tuple(a for a in names if mesh.shape.get(a, 1) > 1)
    if not names:
        return P()
    return P(names[0] if len(names) == 1 else names)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """One sharding for every batch leaf: leading axis split over the batch axes, the rest whole."""
    return NamedSharding(mesh, batch_spec(mesh, rules))


def batch_divisor(mesh: Mesh, rules) -> int:
    """The global batch size must be a multiple of this (number of batch shards)."""
    spec = batch_spec(mesh, rules)
    return _axis_size(mesh, spec[0]) if len(spec) else 1


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ---------------------------------------------------------------------------------------------------------
# host data -> global arrays


def global_batch(local: Any, sharding: NamedSharding) -> Any:
    """Host-local numpy batch (this process's rows of the global batch) -> global jax.Arrays.

    With one process this is a plain sharded `device_put`; with several, each process passes its own slice
    and the global leading size is the sum over processes (`jax.make_array_from_process_local_data`)."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def to_host(tree: Any) -> Any:
    """Global arrays -> full numpy arrays on every process (gathers shards across processes when needed)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{k}={v}" for k, v in mesh.shape.items()) + f" ({mesh.devices.size} {jax.devices()[0].platform} devices, " \
        f"{jax.process_count()} process{'es' if jax.process_count() > 1 else ''})"  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# synthesis


def synthesis_mesh(devices: int | Sequence[Any] | None = None, mesh_cfg: MeshConfig | None = None) -> Mesh:
    """The mesh a synthesis job decodes on in this process: its local devices (all by default, the first N for an
    int, or the given list), data-parallel unless `mesh_cfg` says otherwise (the training rules then split the
    slots over `data` x `fsdp` and, with `tensor` > 1, heads and MLP over `tensor`). A multi-process job gives
    each process its own share of the manifest, so this mesh never spans processes."""
    local = jax.local_devices()
    if devices is None:
        chosen = local
    elif isinstance(devices, int):
        if not 1 <= devices <= len(local):
            raise ConfigError(f"devices = {devices}: this process has {len(local)} local device(s)")
        chosen = local[:devices]
    else:
        chosen = list(devices)
    return make_mesh(mesh_cfg, chosen)
