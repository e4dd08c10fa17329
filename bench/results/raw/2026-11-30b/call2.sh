#!/usr/bin/env bash
# GPU call 2 (nvidia-h200-x2, right after the copy call that left SmolLM2's half 1 in /tmp/xfer; carries .whl + .xfer2):
# GPU 0: issue 14, the SSD tier at 13B beside the 7B ceiling, RAM and SSD tiers (one sequence, --deadline);
# GPU 1: issue 12, first the 7B compact tier (4-bit states now sqrt(v) codes with stochastic rounding) beside its ceiling,
# then SmolLM2-135M fine-tune 200 steps, AdamW / exact tier / compact tier, seeds 0-2 (9 jobs at once).
set -u
start=$(date +%s)
el() { echo $(( $(date +%s) - start )); }
source bench/gpu_setup.sh
( CUDA_VISIBLE_DEVICES=0 timeout 560 python bench/ssd_bench.py --runs ceiling,ssd13b,ram,ssd --offload_dir /tmp/ssd_bench \
    --deadline 540 --out $OUT/ssd_13b.json > $OUT/ssd.log 2>&1
  echo "ssd rc=$? at $(el) s" >> $OUT/ssd.log; df -h /tmp >> $OUT/ssd.log ) &
( python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/xfer/gguf-*.whl
  cp .xfer2/* /tmp/xfer/ && tar xJf /tmp/xfer/assets-small.tar.xz -C /tmp/xfer && python bench/assemble_assets.py /tmp/xfer /tmp/xfer > $OUT/assemble.log 2>&1
  echo "assemble rc=$? at $(el) s" >> $OUT/assemble.log ) &
asm=$!
CUDA_VISIBLE_DEVICES=1 timeout 260 python bench/stream_bench.py --runs ceiling:32,compact:32 --steps 4 --timeout 200 \
  --out $OUT/stream_7b_tiers_sr.json > $OUT/stream7b.log 2>&1
echo "7b rc=$? at $(el) s" >> $OUT/stream7b.log
wait $asm
S='{"lowmem_offload": ["stream"]}'
C='{"lowmem_offload": ["stream"], "lowmem_options": {"stream": {"tier": "compact"}}}'
for seed in 0 1 2; do
  ( CUDA_VISIBLE_DEVICES=1 timeout $(( 560 - $(el) )) python bench/quality.py --regimes finetune --recipes adamw,stream-exact,stream-compact \
      --define "stream-exact=$S" --define "stream-compact=$C" --set finetune.seed=$seed --lr-mults 1 --jobs 3 --budget-s 0 \
      --timeout 480 --model /tmp/xfer/smollm2-135m --corpus /tmp/xfer/corpus/stdlib-code.txt \
      --out $OUT/quality_stream_tiers_seed$seed.json > $OUT/quality_seed$seed.log 2>&1
    echo "quality seed $seed rc=$? at $(el) s" >> $OUT/quality_seed$seed.log ) &
done
wait
for f in $OUT/*.log; do echo "== $f"; tail -n 14 $f; done
