"""``hf-lowmem demo``: the main job on an embedded default.

Trains a small Llama-architecture model, built from a config, on a corpus the package generates
(nothing is downloaded), on the GPU if there is one and else on the CPU, and shows the loss falling and
the peak memory used. About a minute on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def demo_config(vocab_size: int = 256):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--output-dir", default="out/demo")
    p.add_argument("--optimizer", default=None, help="optimizer plugin (default: the Trainer's AdamW)")
    p.add_argument("--offload", default=None, help="offload plugins, comma-separated (e.g. stream)")
    p.add_argument("--attention", default=None)
    p.add_argument("--quantization", default=None)
    p.add_argument("--options", default=None, help="per-plugin options as JSON")
    p.add_argument("--cpu", action="store_true", help="use the CPU even if a GPU is there")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(a: argparse.Namespace) -> dict:
    import torch
    from transformers import LlamaForCausalLM, set_seed

    from hf_lowmem import LowMemTrainer, LowMemTrainingArguments
    from hf_lowmem.textdata import ByteTokenizer, TokenBlocks, demo_corpus

    set_seed(a.seed)
    use_cuda = torch.cuda.is_available() and not a.cpu
    tok = ByteTokenizer()
    ids = tok(demo_corpus())
    cut = int(len(ids) * 0.95)
    train, evald = TokenBlocks(ids[:cut], a.seq_len), TokenBlocks(ids[cut:], a.seq_len)
    model = LlamaForCausalLM(demo_config(tok.vocab_size))
    n_params = sum(p.numel() for p in model.parameters())
    args = LowMemTrainingArguments(
        output_dir=a.output_dir, max_steps=a.steps, per_device_train_batch_size=a.batch_size,
        per_device_eval_batch_size=a.batch_size, gradient_accumulation_steps=a.grad_accum, learning_rate=a.lr,
        lr_scheduler_type="cosine", warmup_steps=min(10, a.steps // 10), logging_steps=max(1, a.steps // 10),
        eval_strategy="no", save_strategy="no", report_to="none", seed=a.seed, use_cpu=not use_cuda,
        bf16=use_cuda and torch.cuda.is_bf16_supported(), dataloader_num_workers=0,
        lowmem_optimizer=a.optimizer, lowmem_offload=a.offload, lowmem_attention=a.attention,
        lowmem_quantization=a.quantization, lowmem_options=a.options,
    )
    trainer = LowMemTrainer(model=model, args=args, train_dataset=train, eval_dataset=evald)
    device = "cuda" if use_cuda else "cpu"
    print(f"hf-lowmem demo: Llama, {n_params / 1e6:.2f}M params, {a.steps} steps of "
          f"{a.batch_size}x{a.grad_accum}x{a.seq_len} tokens on {device}; plugins: "
          f"{trainer.lowmem_ctx.selection.names() or 'none'}", flush=True)
    eval_before = trainer.evaluate()["eval_loss"]
    if use_cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    eval_after = trainer.evaluate()["eval_loss"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {
        "device": device, "params_m": round(n_params / 1e6, 3), "steps": a.steps,
        "plugins": trainer.lowmem_ctx.selection.names(),
        "first_logged_loss": round(losses[0], 4) if losses else None,
        "last_logged_loss": round(losses[-1], 4) if losses else None,
        "train_loss": round(out.training_loss, 4),
        "eval_loss_before": round(eval_before, 4), "eval_loss_after": round(eval_after, 4),
        "seconds": round(seconds, 1),
        "peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "peak_gpu_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if use_cuda else None,
    }
    if a.json:
        print(json.dumps(summary))
    else:
        print(f"\nloss {summary['first_logged_loss']} -> {summary['last_logged_loss']} (logged every "
              f"{args.logging_steps} steps); eval loss {summary['eval_loss_before']} -> {summary['eval_loss_after']}")
        gpu = f", peak GPU allocated {summary['peak_gpu_allocated_gib']} GiB" if use_cuda else ""
        print(f"{seconds:.1f} s; peak host RSS {summary['peak_host_rss_gib']} GiB{gpu}")
    return summary
