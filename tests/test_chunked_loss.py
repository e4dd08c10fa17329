"""chunked-loss beyond plain parity (tests/test_activations.py): models whose loss it is not, the stream
engine's own chunked loss, windows without a single label, and TRL's SFTTrainer metrics."""

from __future__ import annotations

import math

import pytest
import torch

from hf_lowmem import LowMemTrainer, PluginError
from tests.tiny import RandomTokens, logged_losses, tiny_model, train_args, word_tokenizer


# ---- models whose loss is not the causal-LM loss -----------------------------------------------------------------
def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                               num_heads=2, decoder_start_token_id=0, pad_token_id=0))


def tiny_bert_mlm():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=128, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=32))


@pytest.mark.parametrize("make,kind", [(tiny_t5, "encoder-decoder"), (tiny_bert_mlm, "masked LM")])
def test_a_model_whose_loss_is_not_causal_is_refused_in_one_line(tmp_path, make, kind):
    model = make()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(PluginError, match=rf"chunked-loss computes the causal-LM loss .*{type(model).__name__} is an? "
                                          rf"{kind}.*Drop chunked-loss") as info:
        LowMemTrainer(model=model, args=train_args(tmp_path, lowmem_offload=["chunked-loss"]),
                      train_dataset=RandomTokens())
    assert "\n" not in str(info.value)
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters())
    # before: T5 trained on another loss, silently (19.9 against 5.3 at the first step)


def test_causal_models_are_accepted():
    from hf_lowmem_plugins.chunked_loss import not_causal_lm

    assert not_causal_lm(tiny_model()) is None and not_causal_lm(tiny_model("qwen2")) is None


def test_with_stream_chunked_loss_is_refused_as_redundant(tmp_path):
    with pytest.raises(PluginError, match=r"plugins 'chunked-loss' and 'stream' cannot be combined: redundant: the "
                                          r"stream engine computes the loss in token chunks itself"):
        train_args(tmp_path, lowmem_offload=["stream", "chunked-loss"])


# ---- windows without a label -------------------------------------------------------------------------------------
class Masked(torch.utils.data.Dataset):
    """Two random sequences; those in ``masked`` have every label -100 (completion-only masking of a
    prompt-only example). With one sequence per micro-batch and 2 per window, every window holds both, in
    whatever order the sampler draws them."""

    def __init__(self, masked):
        self.masked = set(masked)

    def __len__(self):
        return 2

    def __getitem__(self, i):
        ids = RandomTokens(n=2, seq=16)[i]["input_ids"]
        return {"input_ids": ids, "labels": torch.full_like(ids, -100) if i in self.masked else ids.clone()}


@pytest.mark.parametrize("masked", [pytest.param({0}, id="a-masked-micro-batch-in-each-window"),
                                    pytest.param({0, 1}, id="windows-without-a-label")])
def test_masked_micro_batches_train_exactly_like_a_plain_trainer(tmp_path, masked):
    """The same logged losses, gradient norms and final weights as a plain LowMemTrainer (before: a window
    without a label divided by 0 and every parameter became NaN)."""
    def run(out, offload):
        trainer = LowMemTrainer(model=tiny_model(), train_dataset=Masked(masked), args=train_args(
            out, max_steps=3, per_device_train_batch_size=1, gradient_accumulation_steps=2, lowmem_offload=offload,
            weight_decay=0.1))
        trainer.train()
        norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
        return logged_losses(trainer), norms, {n: p.detach() for n, p in trainer.model.named_parameters()}

    ref_losses, ref_norms, ref_w = run(tmp_path / "plain", [])
    losses, norms, w = run(tmp_path / "chunked", ["chunked-loss"])
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses + norms)
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-7)
    assert norms == pytest.approx(ref_norms, rel=1e-4, abs=1e-7)
    for n, p in w.items():
        assert torch.isfinite(p).all(), n
        torch.testing.assert_close(p, ref_w[n], rtol=1e-5, atol=1e-6, msg=n)


# ---- TRL's SFTTrainer -------------------------------------------------------------------------------------------
def _sft_run(out, **kw):
    datasets = pytest.importorskip("datasets")
    from trl import SFTConfig, SFTTrainer

    from hf_lowmem import lowmem_args_class, lowmem_trainer_class

    # sequences of 6 to 16 tokens: padded batches, so num_tokens counts what the attention mask keeps
    rows = [{"input_ids": RandomTokens(n=24)[i]["input_ids"][: 6 + (i * 5) % 11].tolist()} for i in range(24)]
    args = lowmem_args_class(SFTConfig)(
        output_dir=str(out), max_steps=3, max_length=16, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        disable_tqdm=True, gradient_checkpointing=False, lowmem_telemetry=False, **kw)
    trainer = lowmem_trainer_class(SFTTrainer)(model=tiny_model(), args=args, train_dataset=datasets.Dataset.from_list(rows),
                                               processing_class=word_tokenizer())
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def test_sft_trainer_keeps_its_metrics_under_chunked_loss(tmp_path):
    """Before: entropy, mean_token_accuracy and num_tokens vanished from the logs. Now they equal what SFTTrainer
    computes itself, step by step, and so does the loss."""
    ref = _sft_run(tmp_path / "sft")
    got = _sft_run(tmp_path / "chunked", lowmem_offload=["chunked-loss"],
                   lowmem_options={"chunked-loss": {"chunk_size": 7}})
    assert len(got) == len(ref) == 3
    for a, b in zip(got, ref):
        assert set(b) >= {"entropy", "mean_token_accuracy", "num_tokens"}
        assert set(a) >= set(b) - {"epoch"}, sorted(set(b) - set(a))
        assert a["num_tokens"] == b["num_tokens"]
        for key in ("loss", "entropy", "mean_token_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert ref[-1]["num_tokens"] > ref[0]["num_tokens"]  # a running count


def test_sft_loss_types_other_than_nll_are_refused(tmp_path):
    with pytest.raises(PluginError, match=r"chunked-loss computes the plain next-token NLL, not SFTConfig's "
                                          r"loss_type='dft'; set loss_type='nll' or drop chunked-loss"):
        _sft_run(tmp_path, lowmem_offload=["chunked-loss"], loss_type="dft")
