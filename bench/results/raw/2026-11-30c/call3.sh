#!/usr/bin/env bash
# GPU call 3 (right after call 2; /tmp/xfer and /tmp/site in place): issue 16, quality grid call Q2 of
# bench/results/quality_gpu.md: fine-tuning x8 on GPU 0; pretraining x0.5 and x8 on GPU 1, then fine-tuning x2
# for the recipes that lack it.
set -u
start=$(date +%s)
source bench/gpu_setup.sh
mkdir -p $OUT/r
R=adamw,bnb-adamw8bit,bnb-lion8bit,adafactor,galore-adamw8bit,galore-adamw,apollo,apollo-mini,adam-mini,galore-adamw-s025
D=(--define 'galore-adamw-s025={"lowmem_optimizer": "galore-adamw", "lowmem_options": {"galore-adamw": {"scale": 0.25}}}')
A=(--model /tmp/xfer/smollm2-135m --corpus /tmp/xfer/corpus/stdlib-code.txt --jobs 8 --threads 2 --timeout 420 --budget-s 470)
DEF=(--define 'galore-adamw-s025={"lowmem_optimizer": "galore-adamw", "lowmem_options": {"galore-adamw": {"scale": 0.25}}}'
     --define 'apollo-scale1={"lowmem_optimizer": "apollo", "lowmem_options": {"apollo": {"scale": 1}}}'
     --define 'apollo-mini-scale128={"lowmem_optimizer": "apollo-mini", "lowmem_options": {"apollo-mini": {"scale": 128}}}'
     --define 'lion-b99={"lowmem_optimizer": "bnb-lion8bit", "lowmem_options": {"bnb-lion8bit": {"betas": [0.9, 0.99]}}}'
     --recipes adamw,bnb-adamw8bit,bnb-lion8bit,adafactor,galore-adamw8bit,galore-adamw,apollo,apollo-mini,adam-mini,int8-weights,stream-8bit,galore-adamw-s025,apollo-scale1,apollo-mini-scale128,lion-b99
     --model /tmp/xfer/smollm2-135m --corpus /tmp/xfer/corpus/stdlib-code.txt --jobs 12 --threads 1 --timeout 300)
CUDA_VISIBLE_DEVICES=0 timeout 540 python bench/quality.py --regimes finetune --recipes $R "${D[@]}" --lr-mults 1,8 "${A[@]}" \
  --out $OUT/r/quality-finetune-x8.json > $OUT/q-ft-x8.log 2>&1 &
( CUDA_VISIBLE_DEVICES=1 timeout 380 python bench/quality.py --regimes pretrain "${DEF[@]}" --lr-mults 1,0.5,8 --budget-s 350 \
    --out $OUT/r/quality-pretrain-x05-x8.json > $OUT/q-pre.log 2>&1
  CUDA_VISIBLE_DEVICES=1 timeout 170 python bench/quality.py --regimes finetune --recipes adamw,adam-mini,apollo-mini,galore-adamw-s025 \
    "${D[@]}" --lr-mults 1,2 "${A[@]}" --budget-s 150 --out $OUT/r/quality-finetune-x2-fill.json > $OUT/q-ft-x2.log 2>&1 ) &
wait
tail -n 4 $OUT/q-*.log
echo "done at $(( $(date +%s) - start )) s"
