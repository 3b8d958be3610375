#!/usr/bin/env bash
# One short GPU check, run on a lent GPU machine from the repository root:
#   bash benchmarks/gpu_check.sh        (results under $OUT, or ./gpu_check_out)
# 1) the training tests on the GPU machine; 2) training throughput, tomoloc vs a bare loop;
# 3) the rotation localization benchmark with GPU training (longer schedules than the CPU default).
set -uo pipefail
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_models_losses.py tests/test_training.py 2>&1 | tail -3 | tee "$OUT/tests.txt"
python3 benchmarks/gpu_throughput.py 2>&1 | grep -v -i "warn\|tip\|available\|Loading" | tee "$OUT/throughput.md"
cd benchmarks
for holder in none zmedian; do
  python3 localization.py --batches mixed --devices gpu --epochs 20 --steps 100 --holder "$holder" 2>&1 \
    | grep "^|\|updated" | tee -a "$OUT/localization.md"
done
cp ../BENCHMARKS.md "$OUT/BENCHMARKS.device.md"
