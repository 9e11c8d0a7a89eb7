#!/bin/sh
# One device call for the GPU runs still open (benchmarks/gpu/README.md): train the default set on the
# packed PBC cells, then hemoweb's training step against bare timm. Everything lands in $OUT.
set -e
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/hemoweb-gpu}
mkdir -p "$OUT"
nvidia-smi -L || true
python3 benchmarks/gpu/train_set.py --pack .gpu --out "$OUT" --device "${DEVICE:-cuda}" --epochs "${EPOCHS:-30}" \
    --max-steps "${MAX_STEPS:-0}" 2>&1 | tee "$OUT/train_set.log"
python3 benchmarks/train_throughput.py --device "${DEVICE:-cuda}" --arch mobilenetv3_large_100 --size "${SIZE:-224}" \
    --batch "${BATCH:-128}" --steps "${STEPS:-50}" 2>&1 | tee "$OUT/train_throughput.log"
cp benchmarks/results/train_throughput_"${DEVICE:-cuda}".* "$OUT/"
