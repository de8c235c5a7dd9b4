"""What the benchmarks' `--tpu-aot` runs share: the compile-only TPU devices of a topology, and the memory and
cost a compiled program reports (no device needed, only libtpu)."""

from __future__ import annotations

from typing import Any

HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}  # per chip, vendor figures
HBM_GBPS = {"v4": 1228.0, "v5e": 819.0, "v5p": 2765.0, "v6e": 1640.0}

NO_LIBTPU = ("libtpu is not importable here: for jax 0.10.2, `pip install --no-deps --target DIR 'libtpu==0.0.42.*'` "
             "and run with PYTHONPATH=DIR (kept out of the venv, so CPU runs never probe a TPU)")  # fmt: skip


def chip_of(topology: str) -> str | None:
    """The chip family a topology name such as 'v5e:2x4' names (a key of HBM_GIB), or None."""
    return next((n for n in HBM_GIB if n in topology.lower()), None)


def tpu_devices(topology: str) -> tuple[list[Any] | None, str | None]:
    """(the compile-only devices of `topology`, None), or (None, why not)."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return None, NO_LIBTPU
    from jax.experimental import topologies

    try:
        # v4 and v5p chips hold two TensorCores, run as one device ("megacore"), as jobs run them
        extra = {"chip_config_name": "megacore"} if topology.lower().startswith(("v4", "v5p")) else {}
        return list(topologies.get_topology_desc(topology, "tpu", **extra).devices), None
    except Exception as e:  # noqa: BLE001
        return None, f"no TPU topology {topology!r}: {type(e).__name__}: {e}"


def memory_fields(compiled: Any, digits: int = 3) -> dict:
    """A compiled program's memory per device in GiB: each part its analysis reports, and what it needs in all
    (arguments + outputs - donated aliases + temporaries + code)."""
    mem = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")  # fmt: skip
    m = {f: int(getattr(mem, f, 0) or 0) for f in fields} if mem is not None else {}
    need = (m.get("argument_size_in_bytes", 0) + m.get("output_size_in_bytes", 0) - m.get("alias_size_in_bytes", 0)
            + m.get("temp_size_in_bytes", 0) + m.get("generated_code_size_in_bytes", 0))  # fmt: skip
    return {"memory_per_device_gib": round(need / 2**30, digits),
            **{k.replace("_in_bytes", "_gib"): round(v / 2**30, digits) for k, v in m.items()}}  # fmt: skip


def cost_fields(compiled: Any) -> dict:
    """A compiled program's FLOPs and bytes accessed per device, as XLA's cost analysis counts them ({} if none)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports one
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    return {"hlo_tflops_per_device": round(float(cost.get("flops", 0.0)) / 1e12, 4),
            "hlo_gbytes_accessed_per_device": round(float(cost.get("bytes accessed", 0.0)) / 1e9, 3)}  # fmt: skip
