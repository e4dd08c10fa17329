#!/usr/bin/env bash
# GPU call 4 (right after the copy call): issue 16, the three fine-tuning jobs at AdamW's lr that timed out in call 3
# (12 jobs shared GPU 0 there), alone on GPU 0, beside AdamW again.
set -u
start=$(date +%s)
source bench/gpu_setup.sh
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/xfer/gguf-*.whl
cp .xfer2/* /tmp/xfer/ && tar xJf /tmp/xfer/assets-small.tar.xz -C /tmp/xfer && python bench/assemble_assets.py /tmp/xfer /tmp/xfer > /tmp/assemble.log 2>&1
echo "assemble rc=$? at $(( $(date +%s) - start )) s"
mkdir -p $OUT/r
CUDA_VISIBLE_DEVICES=0 timeout 150 python bench/quality.py --regimes finetune --recipes adamw,bnb-adamw8bit,bnb-lion8bit,galore-adamw8bit \
  --lr-mults 1 --jobs 4 --budget-s 0 --timeout 140 --model /tmp/xfer/smollm2-135m --corpus /tmp/xfer/corpus/stdlib-code.txt \
  --out $OUT/r/quality-finetune-x1-rerun.json 2>&1 | tail -n 14
echo "done at $(( $(date +%s) - start )) s"
