#!/usr/bin/env bash
# GPU call 1 of 2026-11-30 (fifth session): issue 12. Copies the first half of the SmolLM2 assets to /tmp/xfer
# (for call 2), then, alone on the machine (GPU 1 idle): the compact update's time per chunk size, and the 7B
# compact tier against the ceiling with the update's chunk at 4M values (the code as committed), then 16M and 8M
# (CHUNK edited in this copy of the tree; each row records update_chunk).
set -u
start=$(date +%s)
bash .run/copy1.sh > /dev/null
source bench/gpu_setup.sh
mkdir -p $OUT/r
export CUDA_VISIBLE_DEVICES=0
python bench/update_chunk_bench.py --chunks 22,23,24 --out $OUT/r/update_chunks.json 2>&1 | grep -v kernels-community
echo "chunks done at $(( $(date +%s) - start )) s"
timeout 200 python bench/stream_bench.py --runs ceiling:32,compact:32 --steps 4 --timeout 150 --out $OUT/r/stream_7b_chunk22.json > $OUT/s22.log 2>&1
tail -n 4 $OUT/s22.log; echo "4M done at $(( $(date +%s) - start )) s"
for k in 24 23; do
  sed -i "s/^CHUNK = 1 << 2[0-9]/CHUNK = 1 << $k/" hf_lowmem/engine/optim.py hf_lowmem/engine/estimate.py
  grep -h "^CHUNK" hf_lowmem/engine/optim.py hf_lowmem/engine/estimate.py
  timeout 130 python bench/stream_bench.py --runs compact:32 --steps 4 --timeout 120 --out $OUT/r/stream_7b_chunk$k.json > $OUT/s$k.log 2>&1
  tail -n 3 $OUT/s$k.log; echo "2^$k done at $(( $(date +%s) - start )) s"
done
python - <<'PY'
import json, glob, os
for f in sorted(glob.glob(os.environ["OUT"] + "/r/stream_7b_chunk*.json")):
    for r in json.load(open(f))["rows"]:
        print(f.rsplit("/", 1)[1], r["name"], r.get("update_chunk"), r["tokens_per_s"], r.get("host_used_gib"), r.get("peak_gpu_allocated_gib"), r.get("breakdown_per_step", {}).get("optimizer_s"), r.get("error"))
PY
