#!/usr/bin/env bash
# One short GPU check, run on a lent GPU machine from the repository root:
#   bash benchmarks/gpu_check.sh        (results under $OUT, or ./gpu_check_out)
# 1) the training tests on the GPU machine;
# 2) training slices/s, tomoloc (bf16, DataLoader workers, pinned memory) vs a bare torchvision
#    forward/backward loop at the same batch: resnet18 and resnet50 at input 128 and 256, both tasks;
#    then localization seconds per 512^3 volume (sorting and rotation models trained briefly on the GPU);
# 3) where a training step's time goes (benchmarks/gpu_overhead.py: network, Lightning, loader);
# 4) only with LONG=1: the rotation localization benchmark with GPU training (20 x 100 steps per holder).
# Sized for one call of about 5 minutes on an H100 without LONG (1 and 2 took 218 s there, 3 about 60 s).
set -uo pipefail
OUT=$(realpath -m "${OUT:-gpu_check_out}")
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_models_losses.py tests/test_training.py 2>&1 | tail -3 | tee "$OUT/tests.txt"
python3 benchmarks/gpu_throughput.py --localize 2>&1 | grep -v -i "warn\|tip\|available\|Loading" | tee "$OUT/throughput.md"
python3 benchmarks/gpu_overhead.py 2>&1 | grep "^|\|device\|Error" | tee "$OUT/overhead.md"
if [ "${LONG:-0}" = 1 ]; then
  cd benchmarks
  for holder in none zmedian; do
    python3 localization.py --batches mixed --devices gpu --epochs 20 --steps 100 --holder "$holder" 2>&1 \
      | grep "^|\|updated" | tee -a "$OUT/localization.md"
  done
  cd ..
fi
cp BENCHMARKS.md "$OUT/BENCHMARKS.device.md"
