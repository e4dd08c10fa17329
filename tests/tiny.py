"""Tiny models and data for CPU tests."""

from __future__ import annotations

import torch


def tiny_config(model_type: str = "llama", **overrides):
    """A real config of ``model_type`` (llama, mistral, qwen2) small enough for CPU tests."""
    from transformers import AutoConfig

    kw = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **overrides)
    cfg._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


class RandomTokens(torch.utils.data.Dataset):
    """Deterministic random token blocks: example ``i`` is the same in every run."""

    def __init__(self, n: int = 64, seq: int = 16, vocab: int = 128, seed: int = 0):
        self.n, self.seq, self.vocab, self.seed = n, seq, vocab, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 100003 + i)
        ids = torch.randint(0, self.vocab, (self.seq,), generator=g)
        return {"input_ids": ids, "labels": ids.clone()}


def train_args(tmp_path, **kw):
    """LowMemTrainingArguments for a short deterministic CPU run."""
    from hf_lowmem import LowMemTrainingArguments

    base = dict(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3,
                logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
                dataloader_num_workers=0, disable_tqdm=True, lowmem_telemetry=False)
    base.update(kw)
    return LowMemTrainingArguments(**base)


def logged_losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]
