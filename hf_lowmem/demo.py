"""``hf-lowmem demo``: the main job on an embedded default.

Trains a small Llama-architecture model, built from a config, on a corpus the package generates
(nothing is downloaded), on the GPU if there is one and else on the CPU, and shows the loss falling and
the peak memory used. About a minute on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import time


def demo_config(vocab_size: int = 256):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Train a small Llama on text the package generates (nothing is downloaded) and show the loss "
                     "falling and the memory used. The flags that `hf-lowmem train` also has accept its names "
                     "(--max_steps, --lowmem_optimizer, ...).")
    p.add_argument("--steps", "--max_steps", dest="steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--seq_len", "--block_size", dest="seq_len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--batch_size", "--per_device_train_batch_size", dest="batch_size", type=int, default=8)
    p.add_argument("--grad_accum", "--gradient_accumulation_steps", dest="grad_accum", type=int, default=2)
    p.add_argument("--lr", "--learning_rate", dest="lr", type=float, default=3e-3)
    p.add_argument("--output_dir", default=None,
                   help="save the trained model here (then e.g. `hf-lowmem export OUT --format onnx --output OUT-onnx`); "
                        "default: a temporary folder, removed at the end")
    p.add_argument("--optimizer", "--lowmem_optimizer", dest="optimizer", default=None,
                   help="optimizer plugin (default: the Trainer's AdamW)")
    p.add_argument("--offload", "--lowmem_offload", dest="offload", default=None,
                   help="offload plugins, comma-separated (e.g. stream)")
    p.add_argument("--attention", "--lowmem_attention", dest="attention", default=None)
    p.add_argument("--quantization", "--lowmem_quantization", dest="quantization", default=None)
    p.add_argument("--options", "--lowmem_options", dest="options", default=None, help="per-plugin options as JSON")
    p.add_argument("--cpu", "--use_cpu", dest="cpu", action="store_true", help="use the CPU even if a GPU is there")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print only the summary, as JSON, on stdout")


def run(a: argparse.Namespace) -> dict:
    """Train, print the result (one summary: telemetry's memory and speed, then the losses) and return it."""
    import tempfile

    tmp = tempfile.TemporaryDirectory(prefix="hf-lowmem-demo-") if a.output_dir is None else None
    try:
        if a.json:  # only the JSON on stdout; the Trainer's and telemetry's lines go to stderr
            with contextlib.redirect_stdout(sys.stderr):
                summary = _train(a, tmp.name if tmp else a.output_dir)
            print(json.dumps(summary))
        else:
            summary = _train(a, tmp.name if tmp else a.output_dir)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return summary


def _train(a: argparse.Namespace, output_dir: str) -> dict:
    import torch
    from transformers import LlamaForCausalLM, set_seed

    from hf_lowmem import LowMemTrainer, LowMemTrainingArguments
    from hf_lowmem.sizes import fmt_count
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
        output_dir=output_dir, max_steps=a.steps, per_device_train_batch_size=a.batch_size,
        per_device_eval_batch_size=a.batch_size, gradient_accumulation_steps=a.grad_accum, learning_rate=a.lr,
        lr_scheduler_type="cosine", warmup_steps=min(10, a.steps // 10), logging_steps=max(1, a.steps // 10),
        eval_strategy="no", save_strategy="no", report_to="none", seed=a.seed, use_cpu=not use_cuda,
        bf16=use_cuda and torch.cuda.is_bf16_supported(), dataloader_num_workers=0,
        lowmem_optimizer=a.optimizer, lowmem_offload=a.offload, lowmem_attention=a.attention,
        lowmem_quantization=a.quantization, lowmem_options=a.options,
    )
    trainer = LowMemTrainer(model=model, args=args, train_dataset=train, eval_dataset=evald)
    device = "cuda" if use_cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"hf-lowmem demo: Llama, {fmt_count(n_params)} params, {a.steps} steps of "
          f"{a.batch_size}x{a.grad_accum}x{a.seq_len} tokens on {device}", flush=True)
    eval_before = trainer.evaluate()["eval_loss"]
    if use_cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = trainer.train()  # telemetry prints the time, tokens/s and peak memory at the end
    seconds = time.perf_counter() - t0
    eval_after = trainer.evaluate()["eval_loss"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    telemetry = trainer.lowmem_ctx.state.get("telemetry") or {}
    summary = {
        "device": "cuda" if use_cuda else "cpu", "params_m": round(n_params / 1e6, 3), "steps": a.steps,
        "plugins": trainer.lowmem_ctx.selection.names(),
        "first_logged_loss": round(losses[0], 4) if losses else None,
        "last_logged_loss": round(losses[-1], 4) if losses else None,
        "train_loss": round(out.training_loss, 4),
        "eval_loss_before": round(eval_before, 4), "eval_loss_after": round(eval_after, 4),
        "seconds": round(seconds, 1), "tokens_per_s": telemetry.get("tokens_per_s"),
        "torch_threads": None if use_cuda else torch.get_num_threads(),
        "peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "peak_gpu_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if use_cuda else None,
        "saved_to": None,
    }
    if a.output_dir is not None:
        trainer.save_model()
        summary["saved_to"] = a.output_dir
    saved = (f"; model saved to {a.output_dir} (export it: hf-lowmem export {a.output_dir} --format onnx "
             f"--output {a.output_dir.rstrip('/')}-onnx)" if a.output_dir is not None else "")
    print(f"\nhf-lowmem demo: loss {summary['first_logged_loss']} -> {summary['last_logged_loss']} (logged every "
          f"{args.logging_steps} steps), eval loss {summary['eval_loss_before']} -> {summary['eval_loss_after']}{saved}",
          flush=True)
    return summary
