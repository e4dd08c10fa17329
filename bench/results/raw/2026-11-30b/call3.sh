#!/usr/bin/env bash
# GPU call 3 (nvidia-h200-x2, right after the copy call; carries .whl + .xfer2):
# 1) issue 12: the 7B compact tier (sqrt(v) codes, stochastic rounding) beside its ceiling, ALONE on the machine (GPU 0);
# 2) issue 16: the quality grid, fine-tuning SmolLM2-135M on GPU 0 and pretraining a 25M Llama on GPU 1, at once.
set -u
start=$(date +%s)
el() { echo $(( $(date +%s) - start )); }
source bench/gpu_setup.sh
( python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/xfer/gguf-*.whl
  cp .xfer2/* /tmp/xfer/ && tar xJf /tmp/xfer/assets-small.tar.xz -C /tmp/xfer && python bench/assemble_assets.py /tmp/xfer /tmp/xfer > $OUT/assemble.log 2>&1
  echo "assemble rc=$? at $(el) s" >> $OUT/assemble.log ) &
asm=$!
mkdir -p $OUT/r
wait $asm   # the 7B run alone: nothing else on the machine while it is timed
CUDA_VISIBLE_DEVICES=0 timeout 200 python bench/stream_bench.py --runs ceiling:32,compact:32 --steps 4 --timeout 150 \
  --out $OUT/r/stream_7b_tiers_alone.json > $OUT/stream7b.log 2>&1
echo "7b rc=$? at $(el) s" >> $OUT/stream7b.log
B=$(( 560 - $(el) ))
DEF=(--define 'galore-adamw-s025={"lowmem_optimizer": "galore-adamw", "lowmem_options": {"galore-adamw": {"scale": 0.25}}}'
     --define 'apollo-scale1={"lowmem_optimizer": "apollo", "lowmem_options": {"apollo": {"scale": 1}}}'
     --define 'apollo-mini-scale128={"lowmem_optimizer": "apollo-mini", "lowmem_options": {"apollo-mini": {"scale": 128}}}'
     --define 'lion-b99={"lowmem_optimizer": "bnb-lion8bit", "lowmem_options": {"bnb-lion8bit": {"betas": [0.9, 0.99]}}}'
     --recipes adamw,bnb-adamw8bit,bnb-lion8bit,adafactor,galore-adamw8bit,galore-adamw,apollo,apollo-mini,adam-mini,int8-weights,stream-8bit,galore-adamw-s025,apollo-scale1,apollo-mini-scale128,lion-b99
     --model /tmp/xfer/smollm2-135m --corpus /tmp/xfer/corpus/stdlib-code.txt --jobs 12 --threads 1 --timeout 300)
( CUDA_VISIBLE_DEVICES=0 timeout $(( B + 15 )) python bench/quality.py --regimes finetune --budget-s $(( B - 10 )) "${DEF[@]}" \
    --out $OUT/r/quality-finetune.json > $OUT/q-finetune.log 2>&1; echo "finetune rc=$? at $(el) s" >> $OUT/q-finetune.log ) &
( CUDA_VISIBLE_DEVICES=1 timeout $(( B + 15 )) python bench/quality.py --regimes pretrain --budget-s $(( B - 10 )) "${DEF[@]}" \
    --out $OUT/r/quality-pretrain.json > $OUT/q-pretrain.log 2>&1; echo "pretrain rc=$? at $(el) s" >> $OUT/q-pretrain.log ) &
wait
tail -n 12 $OUT/stream7b.log; tail -n 30 $OUT/q-finetune.log; tail -n 30 $OUT/q-pretrain.log
