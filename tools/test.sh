#!/usr/bin/env bash
# The test command: set up (idempotent), then run the whole suite, slow tests included.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/setup.sh
set +e
# two workers (CI has 2 cores), whole files per worker (their module fixtures: compile caches, prompts, servers)
.venv/bin/python -m pytest -q -n "${VALLE_JAX_TEST_WORKERS:-2}" --dist loadfile "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi
exit "$rc"
