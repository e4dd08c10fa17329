# GPU call 4 (issue 18, x2 call 1 of notes/multigpu-next.md), run as one command line:
source bench/gpu_setup.sh && mkdir -p $OUT && timeout 555 python bench/multigpu.py --model 7b --gpus 1,2 --steps 8 --warmup 3 --timeout 200 --budget-s 520 --modes ddp,fsdp2,fsdp2+8bit-ckpt-sdpa,zero3,zero3+8bit-ckpt-sdpa,ddp+8bit-ckpt-sdpa --out $OUT 2>&1 | tail -n 40
