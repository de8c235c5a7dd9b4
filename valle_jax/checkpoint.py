"""Model directories and training checkpoints on disk.

A model directory (`config.yaml` + orbax `params/` + `reference.json`, what export needs) is what
`python -m valle_jax.convert import` writes and what synthesis, parity and fine-tuning load. It is written
under a temporary name and renamed at the end: never half-written. In a multi-process run it is a local
artifact of the process that writes or reads it (no cross-process barriers).

A training checkpoint (`TrainCheckpoints`) is one orbax step directory `run_dir/checkpoints/<step>/` holding
`state` (the sharded train state, each process writing its shards), `data` (the grain iterator state of every
process) and `meta` (the run config and a few facts), saved asynchronously; orbax writes each step under a
temporary name and renames it when complete, so a run killed mid-save leaves the previous steps intact.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from valle_jax.config import ConfigError, ModelConfig, load_yaml, save_yaml

CONFIG_FILE = "config.yaml"
PARAMS_DIR = "params"
REFERENCE_FILE = "reference.json"


def _local_checkpointer() -> ocp.StandardCheckpointer:
    """Orbax checkpointer for host-local numpy trees: in a multi-process run only this process takes part."""
    if jax.process_count() == 1:
        return ocp.StandardCheckpointer()
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"local{me}")
    return ocp.StandardCheckpointer(multiprocessing_options=options)


def save_model_dir(path: str | Path, cfg: ModelConfig, params: dict, reference: dict | None = None, force: bool = False) -> Path:
    """Write cfg + params (leaves kept in their own dtype, e.g. bfloat16 as imported) + reference metadata."""
    path = Path(path).absolute()
    if path.exists() and not force:
        raise FileExistsError(f"{path}: already exists (use --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is an ordinary output
    try:
        save_yaml(cfg, tmp / CONFIG_FILE)
        (tmp / REFERENCE_FILE).write_text(json.dumps(reference or {}, indent=1))
        with _local_checkpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, jax.tree.map(np.asarray, params))
            ckptr.wait_until_finished()
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_model_dir(path: str | Path, dtype: Any = None) -> tuple[ModelConfig, dict, dict]:
    """(config, params as numpy in their stored dtype (or cast to `dtype`), reference metadata)."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / PARAMS_DIR).is_dir():
        raise ConfigError(f"{path}: not a valle_jax model directory (expected {CONFIG_FILE} and {PARAMS_DIR}/)")
    cfg = load_yaml(path / CONFIG_FILE)
    with _local_checkpointer() as ckptr:
        meta = ckptr.metadata(path.absolute() / PARAMS_DIR)
        tree = getattr(meta, "item_metadata", meta)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)
        params = ckptr.restore(path.absolute() / PARAMS_DIR, target)
    params = jax.tree.map(np.asarray, params) if dtype is None else cast_tree(params, dtype)
    ref_file = path / REFERENCE_FILE
    reference = json.loads(ref_file.read_text()) if ref_file.is_file() else {}
    return cfg, params, reference


def cast_tree(tree: Any, dtype: Any, to: Any = np.asarray) -> Any:
    """Every leaf of a parameter tree as `to(leaf, dtype)` (numpy by default, `jnp.asarray` for device arrays)."""
    return jax.tree.map(lambda a: to(a, dtype), tree)


# ---------------------------------------------------------------------------------------------------------
# Training checkpoints: train state + data iterator + config, with orbax's CheckpointManager.

CHECKPOINTS_DIR = "checkpoints"
HEALTH_FILE = "checkpoint_health.json"  # in the run dir: {step: true (healthy) | false (unhealthy)}
SET_ASIDE = ".unreadable-"


class CheckpointMismatch(ConfigError):
    """A readable checkpoint whose state does not fit the current config: refused, never set aside."""


class NoUsableCheckpoint(ConfigError):
    """The run dir holds checkpoints, none of which can be resumed from."""


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{"a/b/0/c": shape} of a state tree or of orbax's metadata of one (namedtuples are saved as dicts)."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {"/".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in flat}


def describe_difference(saved: dict[str, tuple], wanted: dict[str, tuple], limit: int = 2) -> str:
    """What differs between two `flat_shapes` trees, briefly (missing / unexpected / reshaped entries)."""
    parts = []
    only_saved = [k for k in saved if k not in wanted]
    only_wanted = [k for k in wanted if k not in saved]
    reshaped = [f"{k} {saved[k]} -> {wanted[k]}" for k in wanted if k in saved and saved[k] != wanted[k]]
    for label, items in (("only in the checkpoint", only_saved), ("expected by the config", only_wanted),
                         ("shape", reshaped)):  # fmt: skip
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


class TrainCheckpoints:
    """Async checkpoints of (train state, data iterator, metadata) under `run_dir/checkpoints`, with a rotation
    that never loses the run's last healthy state.

    Every process of a run constructs it and calls `save` / `restore` at the same steps (orbax coordinates the
    processes). The state must consist of global `jax.Array`s. The data iterator is any grain `DatasetIterator`.

    Health: the params of checkpoint s are *healthy* once the step after s computed a finite loss and gradient
    from them, *unhealthy* when it did not (`mark`, recorded in run_dir/checkpoint_health.json). Rotation keeps
    the newest `keep` checkpoints plus the newest healthy one; resuming skips unhealthy ones.

    Restoring tells two failures apart: a checkpoint that cannot be read (missing or damaged files) is set aside
    as `<step>.unreadable-<time>` and the one before it is tried; one that reads but does not fit the current
    config (another optimizer, other shapes) raises `CheckpointMismatch` and stays where it is.
    """

    def __init__(self, run_dir: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = (Path(run_dir) / CHECKPOINTS_DIR).absolute()
        self.health_path = Path(run_dir).absolute() / HEALTH_FILE
        self.keep = int(keep) if keep and keep > 0 else None
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # rotation is ours (`_rotate`): it keeps the newest healthy checkpoint too
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=self._options)
        self.health: dict[int, bool] = {}
        if self.health_path.is_file():
            try:
                self.health = {int(k): bool(v) for k, v in json.loads(self.health_path.read_text()).items()}
            except (ValueError, AttributeError):
                self.health = {}

    def steps(self) -> list[int]:
        """Complete checkpoints, oldest first (orbax lists only finalized step directories)."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def set_aside(self) -> list[Path]:
        return sorted(p for p in self.directory.glob(f"*{SET_ASIDE}*")) if self.directory.is_dir() else []

    def has_history(self) -> bool:
        """True when the run dir holds checkpoints (complete ones, or ones set aside as unreadable)."""
        return bool(self.steps() or self.set_aside())

    # ----- health -----
    def mark(self, step: int, healthy: bool) -> None:
        """Record whether the params of checkpoint `step` gave a finite next step (primary process writes)."""
        if self.health.get(int(step)) == healthy:
            return
        self.health[int(step)] = bool(healthy)
        if jax.process_index() == 0:
            from valle_jax.fileio import atomic_write_text

            atomic_write_text(self.health_path, json.dumps({str(k): v for k, v in sorted(self.health.items())}))

    def healthy_steps(self) -> list[int]:
        return [s for s in self.steps() if self.health.get(s) is True]

    def _rotate(self) -> None:
        steps = self.steps()
        if self.keep is None or not steps:
            return
        keep = set(steps[-self.keep:])
        healthy = self.healthy_steps()
        if healthy:
            keep.add(healthy[-1])  # out of rotation until a newer healthy one exists
        for s in steps:
            if s not in keep:
                self.manager.delete(s)
        gone = [s for s in self.health if s not in keep and s < max(keep)]  # deleted ones (not a step in flight)
        if gone:
            for s in gone:
                self.health.pop(s)
            if jax.process_index() == 0:
                from valle_jax.fileio import atomic_write_text

                atomic_write_text(self.health_path, json.dumps({str(k): v for k, v in sorted(self.health.items())}))

    # ----- save / restore -----
    def save(self, step: int, state: Any, data_iterator: Any = None, meta: dict | None = None, wait: bool = False) -> bool:
        """Start saving `step` (returns at once unless `wait`; arrays are copied off the devices first)."""
        import grain

        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        saved = self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)
        if wait:
            self.manager.wait_until_finished()
        self._rotate()
        return saved

    def state_metadata(self, step: int) -> Any:
        """Orbax's metadata tree (shapes, dtypes) of checkpoint `step`'s state; raises if it cannot be read."""
        with _local_checkpointer() as ckptr:
            meta = ckptr.metadata(self.directory / str(int(step)) / "state")
        tree = getattr(meta, "item_metadata", meta)
        if tree is None:
            raise FileNotFoundError(f"{self.directory / str(step) / 'state'}: no readable metadata")
        return tree

    def read_meta(self, step: int) -> dict:
        """The `meta` item of checkpoint `step` (the run config and a few facts)."""
        out = self.manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"] or {})

    def check_fits(self, step: int, abstract_state: Any, what: str = "state") -> None:
        """Raise CheckpointMismatch if checkpoint `step`'s state (or its `what` subtree) does not fit
        `abstract_state`; errors reading the metadata propagate (the checkpoint is then unreadable)."""
        saved = flat_shapes(self.state_metadata(step))
        wanted = flat_shapes(abstract_state)
        if what != "state":
            saved = {k: v for k, v in saved.items() if k.startswith(what + "/")}
            wanted = {k: v for k, v in wanted.items() if k.startswith(what + "/")}
        if saved != wanted:
            raise CheckpointMismatch(describe_difference(saved, wanted))

    def restore(self, abstract_state: Any, data_iterator: Any = None, step: int | None = None,
                params_only: bool = False) -> tuple[int, Any, dict]:  # fmt: skip
        """(step, state laid out as `abstract_state` (ShapeDtypeStructs with shardings), meta); the data
        iterator, if given, is set to the saved position in place. Default step: the newest complete checkpoint
        that is not known unhealthy, falling back to older ones if it cannot be read. `params_only`: only the
        params (and the step) are taken from the checkpoint; the rest of the returned state is None."""
        import grain

        steps = self.steps()
        if step is not None:
            candidates = [step]
        else:
            candidates = [s for s in reversed(steps) if self.health.get(s) is not False]
            if not candidates and steps:
                raise NoUsableCheckpoint(f"{self.directory}: every checkpoint ({', '.join(map(str, steps))}) holds "
                                         "params that gave a NaN/inf next step (see checkpoint_health.json)")  # fmt: skip
        if not candidates:
            raise NoUsableCheckpoint(f"{self.directory}: no complete checkpoint")
        errors = []
        for s in candidates:
            try:
                self.check_fits(s, abstract_state, "params" if params_only else "state")
            except CheckpointMismatch as e:
                raise CheckpointMismatch(f"checkpoint {s} ({self.directory / str(s)}) does not fit the current config: "
                                         f"{e}") from None  # fmt: skip
            except Exception as e:  # noqa: BLE001 - the metadata cannot be read: damaged
                if step is not None:
                    raise
                errors.append(f"step {s}: {type(e).__name__}: {e}")
                self._set_aside(int(s), e)
                continue
            target = abstract_state
            if params_only:  # read the whole saved state as it is (any optimizer), keep the params
                saved_tree = self.state_metadata(s)
                target = {k: abstract_state[k] if k == "params" else
                          jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), v)
                          for k, v in saved_tree.items()}  # fmt: skip
            items = {"state": ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                out = self.manager.restore(int(s), args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 - a damaged step: say so, move it aside, try the one before
                if step is not None:
                    raise
                errors.append(f"step {s}: {type(e).__name__}: {e}")
                self._set_aside(int(s), e)
                continue
            state = out["state"]
            if params_only:
                state = {"step": state["step"], "params": state["params"]}
            self._abandon_after(int(s))
            return int(s), state, dict(out["meta"] or {})
        raise NoUsableCheckpoint(f"{self.directory}: no checkpoint could be read (each was set aside as "
                                 f"*{SET_ASIDE}*): " + " | ".join(errors))  # fmt: skip

    def _abandon_after(self, step: int) -> None:
        """Newer checkpoints than the one resumed from (unhealthy ones, passed over) are moved aside as
        `<step>.unhealthy-<time>`: the run continues from `step` and will save those steps again."""
        import time

        newer = [s for s in self.steps() if s > step]
        for s in newer:
            if jax.process_index() == 0:
                (self.directory / str(s)).rename(self.directory / f"{s}.unhealthy-{int(time.time())}")
            self.health.pop(s, None)
        if newer:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices(f"valle_jax_abandon_after_{step}")
            self.manager.reload()

    def _set_aside(self, step: int, error: Exception) -> None:
        """Rename an unreadable step directory to `<step>.unreadable-<time>` (orbax then ignores it, and a later
        save of that step does not collide with it)."""
        import time
        import warnings

        src = self.directory / str(step)
        dst = self.directory / f"{step}{SET_ASIDE}{int(time.time())}"
        first = str(error).splitlines()[0][:300] if str(error) else ""
        warnings.warn(f"{src}: checkpoint could not be restored ({type(error).__name__}: {first}); moved to {dst.name}, "
                      "trying an older one", stacklevel=3)  # fmt: skip
        if jax.process_index() == 0 and src.exists():
            src.rename(dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"valle_jax_set_aside_{step}")
        self.manager.reload()

    def archive(self) -> Path | None:
        """`train.restart=true`: move the checkpoints (and their health record) aside, to `checkpoints.replaced-<time>`,
        so the run starts over without destroying them. Returns where they went."""
        import time

        if not self.directory.exists():
            return None
        self.manager.wait_until_finished()
        dst = self.directory.with_name(f"{CHECKPOINTS_DIR}.replaced-{int(time.time())}")
        if jax.process_index() == 0:
            self.directory.rename(dst)
            if self.health_path.exists():
                self.health_path.rename(dst / HEALTH_FILE)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("valle_jax_archive_checkpoints")
        self.health = {}
        self.manager.close()
        self.manager = ocp.CheckpointManager(self.directory, options=self._options)
        return dst

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
