"""Test-wide settings: 8 fake CPU devices (sharding tests), float32 matmuls at full precision."""

import json
import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = ROOT / "tests" / "fixtures"
MANIFEST = json.loads((FIXTURES / "fixtures.json").read_text())
VARIANTS = MANIFEST["variants"]
LLAMA_VARIANTS = sorted(k for k, v in VARIANTS.items() if v["flags"]["arch_type"] == "llama")
ALL_VARIANTS = sorted(VARIANTS)


def fixture_paths(name: str) -> tuple[Path, Path]:
    v = VARIANTS[name]
    return FIXTURES / v["checkpoint"], FIXTURES / v["npz"]


def heads_of(checkpoint: str | Path) -> int | None:
    """Attention heads of a tiny fixture checkpoint (weights cannot say them; the fixtures manifest does)."""
    return next((v["dims"]["heads"] for v in VARIANTS.values() if v["checkpoint"] == Path(checkpoint).name), None)


def cli_env(tmp_path_factory, devices: int = 1) -> dict:
    """The environment of the CLIs a test module starts: CPU with `devices` fake devices, the repository on the
    path, and one persistent compilation cache for the module's runs (each compiles the same programs)."""
    e = dict(os.environ)
    e.update({"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
              "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
              "PYTHONPATH": str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")})  # fmt: skip
    return e


def free_port() -> int:
    """A TCP port free on this machine now (for a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (still run in CI)")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
