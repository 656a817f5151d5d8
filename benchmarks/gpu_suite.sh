#!/usr/bin/env bash
# One-shot GPU suite: every figure that needs a GPU, as one markdown table (docs/benchmarks.md,
# "One-shot GPU suite"). Arguments go to benchmarks/gpu_suite.py: --out FILE, --dry-run,
# --sections abcd, --repeats N. Exit status: 0 ok, 1 a parity check failed, 2 it cannot run here.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The project's virtual environment, unless $PYTHON names another interpreter with lifelong installed.
python="${PYTHON:-$root/.venv/bin/python}"
if [[ ! -x "$python" ]]; then
    echo "gpu_suite.sh: no Python at $python (create the venv, or set PYTHON)" >&2
    exit 2
fi
exec "$python" "$root/benchmarks/gpu_suite.py" "$@"
