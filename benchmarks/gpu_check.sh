#!/usr/bin/env bash
# The GPU check on a machine with a GPU and no package index: installs what it lacks from
# wheels prepared beforehand in .whl/ (hydra-core, omegaconf, pytest, torchmetrics and their
# dependencies: `pip wheel -w .whl hydra-core omegaconf pytest torchmetrics` where an index is
# reachable), then runs benchmarks/gpu_check.py, writing every figure under $OUT.
#   bash benchmarks/gpu_check.sh            (run from the repository root)
#   bash benchmarks/gpu_check.sh --device cpu --model small ...   (a dry run: gpu_check.py --help)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
if ! python3 -c "import hydra, omegaconf, pytest, torchmetrics" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "hydra-core, omegaconf, pytest or torchmetrics is missing and .whl/ holds no wheels" >&2
    exit 2
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1
exec python3 benchmarks/gpu_check.py --out "$OUT" "$@"
