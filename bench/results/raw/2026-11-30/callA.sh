#!/usr/bin/env bash
# GPU call A (nvidia-h200-x2): disk (issue 14), the 7B real path deterministic (issue 12) on GPU 0 beside the
# 7B real path with bnb-adamw8bit (issue 11) on GPU 1, then the 7B SSD tier vs RAM tier (issue 14) on GPU 0.
set -u
start=$(date +%s)
el() { echo $(( $(date +%s) - start )); }
source bench/gpu_setup.sh
mkdir -p /tmp/xfer && cp .xfer1/* /tmp/xfer/
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader; free -g | head -2; df -h /tmp | tail -1; nproc
timeout 75 python bench/disk_bench.py --dir /tmp/diskbench --size 8GiB --out $OUT/disk_h200x2.json > $OUT/disk.log 2>&1
echo "disk rc=$? at $(el) s" >> $OUT/disk.log
( CUDA_VISIBLE_DEVICES=1 timeout 330 python bench/stream_bench.py --runs none --real-path /tmp/llama7b_b --real-optimizer bnb-adamw8bit --host-gib 64 --timeout 320 --out $OUT/stream_7b_realpath_bnb.json > $OUT/realpath_bnb.log 2>&1
  echo "realpath_bnb rc=$? at $(el) s" >> $OUT/realpath_bnb.log ) &
CUDA_VISIBLE_DEVICES=0 timeout 330 python bench/stream_bench.py --runs none --real-path /tmp/llama7b --timeout 320 --out $OUT/stream_7b_realpath.json > $OUT/realpath.log 2>&1
echo "realpath rc=$? at $(el) s" >> $OUT/realpath.log
left=$(( 575 - $(el) ))
CUDA_VISIBLE_DEVICES=0 timeout $left python bench/ssd_bench.py --offload_dir /tmp/ssd_bench --timeout $(( left / 2 )) --out $OUT/ssd_7b.json > $OUT/ssd.log 2>&1
echo "ssd rc=$? at $(el) s" >> $OUT/ssd.log
wait
tail -4 $OUT/*.log
