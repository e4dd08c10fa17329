#!/usr/bin/env bash
# GPU call B (nvidia-h200-x2, right after call A: /tmp/xfer holds half 1): SmolLM2 fine-tune, compact tier vs exact
# tier vs AdamW (issue 12) on GPU 0 and 1; then the stream engine on 1 and 2 GPUs and DeepSpeed ZeRO-3 offload (issue 15).
set -u
start=$(date +%s)
el() { echo $(( $(date +%s) - start )); }
source bench/gpu_setup.sh
cp .xfer2/* /tmp/xfer/ && python bench/assemble_assets.py /tmp/xfer /tmp/xfer > $OUT/assemble.log 2>&1; echo "assemble rc=$?" >> $OUT/assemble.log
S='{"lowmem_offload": ["stream"]}'
C='{"lowmem_offload": ["stream"], "lowmem_options": {"stream": {"tier": "compact"}}}'
CUDA_VISIBLE_DEVICES=0 timeout 175 python bench/quality.py --regimes finetune --recipes adamw,stream-exact,stream-compact \
  --define "stream-exact=$S" --define "stream-compact=$C" --lr-mults 1 --jobs 3 --budget-s 0 --timeout 165 \
  --model /tmp/xfer/smollm2-135m --corpus /tmp/xfer/corpus/stdlib-code.txt --out $OUT/quality_stream_tiers.json > $OUT/quality.log 2>&1
echo "quality rc=$? at $(el) s" >> $OUT/quality.log
left=$(( 570 - $(el) ))
timeout $left python bench/stream_multigpu.py --init rank0 --timeout 170 --out $OUT/stream_multigpu_7b.json > $OUT/multigpu.log 2>&1
echo "multigpu rc=$? at $(el) s" >> $OUT/multigpu.log
tail -25 $OUT/quality.log; tail -8 $OUT/multigpu.log
