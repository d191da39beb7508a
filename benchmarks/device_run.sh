#!/usr/bin/env bash
# The GPU measurements the open issues wait for, as prepared runs on the lent machine (carry .device-kit, see
# README). Each part fits one session's device time (15 min, about 2-3 of them for the machine's start):
#   bash benchmarks/device_run.sh generate [OUTDIR]  # #13 and #14: generate end to end (GemNet-OC fp32 and
#                                                    # TF32, CHGNet with graph workers), KD training steps,
#                                                    # GemNet-OC memory per system; ~9 min
#   bash benchmarks/device_run.sh study [OUTDIR]     # #15: configs/studies/gpu-emt.yml, target ~8 min
#   bash benchmarks/device_run.sh models [OUTDIR]    # model forwards, relaxer, adversarial (measured before)
#   bash benchmarks/device_run.sh peers [OUTDIR]     # #23: relaxation vs torch-sim, fairchem ml_relax and ASE,
#                                                    # training vs fairchem's OCPTrainer; ~9 min. torch-sim and
#                                                    # its dependencies travel as wheels in .whl (README, Benchmarks)
set -uo pipefail
part=${1:?usage: device_run.sh generate|study|models|peers [OUTDIR]}
out=${2:-${OUT:-/tmp}}
source .device-kit/setup.sh || exit 1
# Wheels the kit lacks (multiprocess), fetched here with pip download into .whl (carry it too).
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONWARNINGS=ignore
run() { local limit=$1; shift; echo "+ $*"; timeout "$limit" "$@" 2>&1 | grep -v -E "jittable|initialized with|_set_no_error|OLD_ERROR"; }
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  git log -1 --format="commit %h"
  case $part in
    generate)
      run 150 python3 -m benchmarks.generate --teacher gemnet-oc --device cuda --batch 64 --systems 64 \
        --optimizer fire --max-steps 50 --fmax-of-start 0.5 --workers 8 --sampler-workers 8 --sampled-systems 32
      run 120 python3 -m benchmarks.generate --teacher gemnet-oc --device cuda --precision tf32 --batch 64 \
        --systems 64 --optimizer fire --max-steps 50 --fmax-of-start 0.5 --workers 8 --sampler-workers
      run 100 python3 -m benchmarks.generate --teacher chgnet --device cuda --batch 32 --systems 48 --max-steps 50 \
        --workers 8 --graph-workers 8 --sampler-workers
      run 60 python3 -m benchmarks.train --device cuda --teacher gemnet-oc --student painn-big --batch 16 --seconds 4
      run 45 python3 -m benchmarks.train --device cuda --teacher painn-big --student painn-small --batch 16 \
        --seconds 4 --modes vanilla1 vanilla2 n2n
      run 60 python3 -m benchmarks.batch_memory --teacher gemnet-oc --device cuda
      ;;
    study)
      run 560 python3 -m kdaug study configs/studies/gpu-emt.yml --out "$out/gpu-emt"
      ;;
    models)
      run 240 python3 -m benchmarks.models --device cuda --batch-sizes 1 16 64 --seconds 2
      run 240 python3 -m benchmarks.relax --model painn-small --device cuda --batch 32 --steps 20 --ase-systems 2 \
        --workers 0 4 8 --sampled-systems 24
      run 240 python3 -m benchmarks.relax --model gemnet-oc --device cuda --batch 32 --steps 10 --ase-systems 1 \
        --workers
      run 240 python3 -m benchmarks.adversarial --teacher gemnet-oc --student painn-small --device cuda --batch 16 \
        --steps 5
      ;;
    peers)
      run 200 python3 -m benchmarks.peers --model painn-small --device cuda --systems 32 --max-atoms 2000 \
        --max-steps 30 --workers 8
      run 200 python3 -m benchmarks.peers --model chgnet --device cuda --systems 16 --max-atoms 1000 --max-steps 30 \
        --workers 8 --optimizers fire
      run 120 python3 -m benchmarks.peers_train --student painn-small --device cuda --systems 24 --batch 16
      ;;
    *) echo "unknown part $part: expected generate, study, models or peers"; exit 2 ;;
  esac
} | tee "$out/device_$part.txt"
