#!/usr/bin/env bash
# The test command: set up (idempotent), then run the whole suite, slow tests included.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/setup.sh
set +e
# one persistent JAX compilation cache for this run (both workers and the CLIs the tests start): the same small
# models are compiled by many test files; a fresh folder each run, removed at the end, so nothing carries over
cache=$(mktemp -d "${TMPDIR:-/tmp}/valle_jax_test_cache.XXXXXX")
trap 'rm -rf "$cache"' EXIT
export JAX_COMPILATION_CACHE_DIR=$cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
# two workers (CI has 2 cores), whole files per worker (their module fixtures: compile caches, prompts, servers)
.venv/bin/python -m pytest -q -n "${VALLE_JAX_TEST_WORKERS:-2}" --dist loadfile "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi
exit "$rc"
