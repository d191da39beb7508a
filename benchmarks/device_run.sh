#!/usr/bin/env bash
# All GPU measurements in one run on the lent machine (carry .device-kit, see README):
#   bash benchmarks/device_run.sh [OUTDIR]
set -uo pipefail
out=${1:-${OUT:-/tmp}}
source .device-kit/setup.sh || exit 1
# Wheels the kit lacks (multiprocess), fetched here with pip download into .whl (carry it too).
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONWARNINGS=ignore
run() { echo "+ $*"; timeout 240 "$@" 2>&1 | grep -v -E "jittable|initialized with|_set_no_error|OLD_ERROR"; }
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  run python3 -m benchmarks.models --device cuda --batch-sizes 1 16 64 --seconds 2
  run python3 -m benchmarks.relax --model painn-small --device cuda --batch 32 --steps 20 --ase-systems 2 --workers 0 4 8 --sampled-systems 24
  run python3 -m benchmarks.relax --model gemnet-oc --device cuda --batch 32 --steps 10 --ase-systems 1 --workers
  run python3 -m benchmarks.adversarial --teacher gemnet-oc --student painn-small --device cuda --batch 16 --steps 5
  run python3 -m kdaug generate --n-systems 8 --teacher chgnet --device cuda --max-steps 20 --max-miller 1 --num-workers 2 --out /tmp/gen
  run python3 -m kdaug inspect /tmp/gen
} | tee "$out/device_log.txt"
