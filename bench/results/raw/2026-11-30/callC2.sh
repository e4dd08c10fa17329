#!/usr/bin/env bash
# GPU call C2 (right after C1, which left SmolLM2's half 1 in /tmp/xfer): SmolLM2 fine-tune compact vs exact tier vs
# AdamW (issue 12) on GPU 0; the 7B SSD tier (issue 14) on GPU 1 (its RAM-tier row: call A, same machine and settings).
set -u
start=$(date +%s)
el() { echo $(( $(date +%s) - start )); }
source bench/gpu_setup.sh
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/xfer/gguf-*.whl
cp .xfer2/* /tmp/xfer/ && tar xJf /tmp/xfer/assets-small.tar.xz -C /tmp/xfer && python bench/assemble_assets.py /tmp/xfer /tmp/xfer > $OUT/assemble.log 2>&1; echo "assemble rc=$? at $(el) s" >> $OUT/assemble.log
( CUDA_VISIBLE_DEVICES=1 timeout 250 python bench/ssd_bench.py --runs ssd --offload_dir /tmp/ssd_bench --timeout 240 --out $OUT/ssd_7b_ssd.json > $OUT/ssd.log 2>&1
  echo "ssd rc=$? at $(el) s" >> $OUT/ssd.log ) &
S='{"lowmem_offload": ["stream"]}'
C='{"lowmem_offload": ["stream"], "lowmem_options": {"stream": {"tier": "compact"}}}'
CUDA_VISIBLE_DEVICES=0 timeout 220 python bench/quality.py --regimes finetune --recipes adamw,stream-exact,stream-compact \
  --define "stream-exact=$S" --define "stream-compact=$C" --lr-mults 1 --jobs 3 --budget-s 0 --timeout 210 \
  --model /tmp/xfer/smollm2-135m --corpus /tmp/xfer/corpus/stdlib-code.txt --out $OUT/quality_stream_tiers.json > $OUT/quality.log 2>&1
echo "quality rc=$? at $(el) s" >> $OUT/quality.log
wait
for f in $OUT/*.log; do echo "== $f"; tail -n 12 $f; done
