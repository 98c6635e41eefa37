#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine: installs what is missing
# (scripts/install-system.sh), then lint, types and pytest. The tests start
# their own private Postgres cluster with TimescaleDB preloaded (as the
# postgres user when run as root) and remove it afterwards.
# Extra arguments go to pytest, e.g. scripts/test.sh -k concurrency
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

./scripts/install-system.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/pytest "$@"
