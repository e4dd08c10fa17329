#!/usr/bin/env bash
# GPU call 2 (right after call 1, which copied .xfer1): issue 16, quality grid call Q1 of bench/results/quality_gpu.md:
# fine-tuning x0.5 on GPU 0, x4 on GPU 1.
set -u
start=$(date +%s)
source bench/gpu_setup.sh
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/xfer/gguf-*.whl
cp .xfer2/* /tmp/xfer/ && tar xJf /tmp/xfer/assets-small.tar.xz -C /tmp/xfer && python bench/assemble_assets.py /tmp/xfer /tmp/xfer > /tmp/assemble.log 2>&1
echo "assemble rc=$? at $(( $(date +%s) - start )) s"
mkdir -p $OUT/r
R=adamw,bnb-adamw8bit,bnb-lion8bit,adafactor,galore-adamw8bit,galore-adamw,apollo,apollo-mini,adam-mini,galore-adamw-s025
D=(--define 'galore-adamw-s025={"lowmem_optimizer": "galore-adamw", "lowmem_options": {"galore-adamw": {"scale": 0.25}}}')
A=(--model /tmp/xfer/smollm2-135m --corpus /tmp/xfer/corpus/stdlib-code.txt --jobs 8 --threads 2 --timeout 420 --budget-s 470)
for g in 0:0.5 1:4; do CUDA_VISIBLE_DEVICES=${g%%:*} timeout 540 python bench/quality.py --regimes finetune --recipes $R "${D[@]}" \
  --lr-mults 1,${g#*:} "${A[@]}" --out $OUT/r/quality-finetune-x${g#*:}.json > $OUT/q-ft-x${g#*:}.log 2>&1 & done; wait
tail -n 5 $OUT/q-ft-*.log
echo "done at $(( $(date +%s) - start )) s"
