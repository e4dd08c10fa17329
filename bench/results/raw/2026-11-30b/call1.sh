#!/usr/bin/env bash
# GPU call 1 (nvidia-h200-x2; carries .whl + .xfer1): leaves SmolLM2's half 1 in /tmp/xfer for call 2, then
# issue 15: the stream engine on 1 and 2 GPUs (7B, 8 GiB cap per GPU) and DeepSpeed ZeRO-3 offload on 2.
set -u
start=$(date +%s)
el() { echo $(( $(date +%s) - start )); }
mkdir -p /tmp/xfer && cp .xfer1/* /tmp/xfer/
source bench/gpu_setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/gpus.txt 2>&1; free -g >> $OUT/gpus.txt; df -h /tmp >> $OUT/gpus.txt
timeout 545 python bench/stream_multigpu.py --init rank0 --ds-steps 3 --timeout 240 --budget-s 540 \
  --out $OUT/stream_multigpu_7b.json > $OUT/multigpu.log 2>&1
echo "multigpu rc=$? at $(el) s" >> $OUT/multigpu.log
# fallback: if stream:2 failed at the 8 GiB cap and time is left, both engine runs again with a stash every layer
ok=$(python3 -c "
import json; d=json.load(open('$OUT/stream_multigpu_7b.json'))
print(any(r.get('gpus')==2 and r.get('tokens_per_s') and 'stream' in str(r.get('mode',r.get('label',''))) for r in d['rows']))" 2>/dev/null)
left=$(( 570 - $(el) ))
if [ "$ok" != "True" ] && [ $left -gt 200 ]; then
  timeout $left python bench/stream_multigpu.py --init rank0 --runs stream:1,stream:2 --stash-every 1 --host-gib 60 \
    --timeout 120 --budget-s $(( left - 5 )) --out $OUT/stream_multigpu_7b_stash1.json > $OUT/multigpu_stash1.log 2>&1
  echo "stash1 rc=$? at $(el) s" >> $OUT/multigpu_stash1.log
fi
ls -la /tmp/xfer >> $OUT/gpus.txt
for f in $OUT/*.log; do echo "== $f"; tail -n 15 $f; done
