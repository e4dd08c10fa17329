"""gradient-checkpointing and the Trainer's own checkpointing flag: a flag that only a default turned on
(TRL's SFTConfig: gradient_checkpointing=True) is taken over with one info line; a flag the user set is
refused with the argument to change, in the names the user's transformers has."""

from __future__ import annotations

import logging

import pytest
import torch

from hf_lowmem import LowMemTrainer, PluginError
from tests.tiny import RandomTokens, tiny_model, train_args, word_tokenizer


def _sft(tmp_path, **kw):
    datasets = pytest.importorskip("datasets")
    from trl import SFTConfig, SFTTrainer

    from hf_lowmem import lowmem_args_class, lowmem_trainer_class

    ds = datasets.Dataset.from_list([{"input_ids": RandomTokens()[i]["input_ids"].tolist()} for i in range(16)])
    args = lowmem_args_class(SFTConfig)(output_dir=str(tmp_path), max_steps=2, max_length=16, per_device_train_batch_size=2,
                     learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                     seed=0, disable_tqdm=True, **kw)
    return lowmem_trainer_class(SFTTrainer)(model=tiny_model(), args=args, train_dataset=ds,
                                            processing_class=word_tokenizer())


def test_sftconfigs_default_is_taken_over_with_one_info_line(tmp_path, caplog):
    """Before: "Drop gradient_checkpointing=True", which the user never set (TRL's default)."""
    from trl import SFTConfig

    assert SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none").gradient_checkpointing is True
    with caplog.at_level(logging.INFO, logger="hf_lowmem"):
        trainer = _sft(tmp_path, lowmem_offload=["gradient-checkpointing"])
    said = [r.getMessage() for r in caplog.records if "by default; the plugin checkpoints the layers instead" in r.message]
    assert len(said) == 1 and said[0].startswith("gradient-checkpointing: SFTConfig turns on ")
    assert not trainer.args.gradient_checkpointing and not getattr(trainer.args, "activation_checkpointing", False)
    trainer.train()
    model = trainer.model
    assert not model.is_gradient_checkpointing  # the Trainer did not checkpoint a second time
    assert trainer.lowmem_ctx.state["gradient-checkpointing"]["layers"] == [0, 1]
    assert all("_hf_lowmem_inner_forward" in layer.__dict__ for layer in model.model.layers)


def test_sftconfig_default_with_activation_offload_names_where_it_came_from(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_lowmem"):
        _sft(tmp_path, lowmem_offload=["activation-offload"])
    assert any("=True (SFTConfig's default): the Trainer's checkpointing keeps checkpoint inputs on the GPU" in r.message
               for r in caplog.records)


def test_a_flag_the_user_set_is_refused_naming_what_to_change(tmp_path):
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    flags = [f for f in ("gradient_checkpointing", "activation_checkpointing") if f in names]
    for flag in flags:  # transformers 5 has both names (one the alias of the other); older ones only the first
        with pytest.raises(PluginError, match=r"gradient_checkpointing=True.* turns on the Trainer's own checkpointing"
                                              r".*set gradient_checkpointing=False.*--gradient_checkpointing false"
                                              r".*or drop gradient-checkpointing from lowmem_offload") as info:
            LowMemTrainer(model=tiny_model(), train_dataset=RandomTokens(),
                          args=train_args(tmp_path, lowmem_offload=["gradient-checkpointing"], **{flag: True}))
        assert "\n" not in str(info.value)
        if "activation_checkpointing" in names:
            assert "activation_checkpointing=False" in str(info.value)


def test_the_sft_run_trains_like_the_plugin_alone(tmp_path):
    """Taken over, the run equals the same run whose SFTConfig says gradient_checkpointing=False."""
    from tests.tiny import logged_losses

    a = _sft(tmp_path / "a", lowmem_offload=["gradient-checkpointing"])
    a.train()
    b = _sft(tmp_path / "b", lowmem_offload=["gradient-checkpointing"], gradient_checkpointing=False)
    b.train()
    assert logged_losses(a) == logged_losses(b)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
