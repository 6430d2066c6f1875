#!/usr/bin/env bash
# Quick start: `bash scripts/dev.sh demo` runs the main job on demo data;
# `bash scripts/dev.sh test` runs the whole test suite, `test-fast` its fast tier (no
# Prefect server, Dask cluster, S3 server or elastix: tests not marked `full`). All set
# up .venv first. Tests run in two processes (pytest-xdist), a module's tests in one of
# them so its servers and clusters are started once; `-n 0` after the command runs
# them in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.venv/prefect-home}"

setup() {
  local stamp=.venv/.installed
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    # uv resolves and installs the same versions as pip in about a fifth of the time
    # (30 s against 155 s on a fresh clone); pip stays the way when uv cannot be had.
    if ! { .venv/bin/pip install -q uv \
        && .venv/bin/uv pip install -q --python .venv/bin/python -c constraints.txt \
             -e '.[test]'; }; then
      .venv/bin/pip install -q --upgrade pip
      .venv/bin/pip install -q -c constraints.txt -e '.[test]'
    fi
    touch "$stamp"
  fi
}

# uv installs no bytecode, and where PYTHONDONTWRITEBYTECODE is set Python never writes
# it: every process of a run (a test run starts hundreds) would compile Prefect, Dask and
# the rest from source again, 8.6 s of CPU to import them against 3.9 s from bytecode.
# The commands below let Python write it, so each module is compiled once, when first
# used (into .venv and the checkout's __pycache__ folders, which git ignores). Compiling
# all of .venv at install instead adds 17 s to set-up.
unset PYTHONDONTWRITEBYTECODE

cmd="${1:-}"; shift || true
case "$cmd" in
  demo)
    setup
    exec .venv/bin/dreg demo "${@:-demo-out}"
    ;;
  test)
    setup
    exec .venv/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder "$@"
    ;;
  test-fast)
    setup
    exec .venv/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder -m "not full" "$@"
    ;;
  setup)
    setup
    ;;
  *)
    echo "usage: bash scripts/dev.sh {demo [DIR]|test [PYTEST ARGS]|test-fast [PYTEST ARGS]|setup}" >&2
    exit 2
    ;;
esac
