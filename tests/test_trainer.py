"""LowMemTrainer end to end on a tiny Llama: losses equal a plain Trainer when no plugin changes the math
(with and without gradient accumulation), the hooks run in their documented order and their results are
used, and the TRL mixin gives SFTTrainer the same plugins."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import hf_lowmem.plugins as plugins_mod
from hf_lowmem import LowMemTrainer, LowMemTrainingArguments, Plugin, PluginInfo, hookimpl, lowmem_args_class, lowmem_trainer_class
from hf_lowmem.errors import PluginError
from tests.tiny import RandomTokens, logged_losses, tiny_model, train_args

COMMON = dict(max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, save_strategy="no",
              report_to="none", use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def run(trainer_cls, args, model=None, **kw):
    model = model if model is not None else tiny_model(seed=0)
    trainer = trainer_cls(model=model, args=args, train_dataset=RandomTokens(n=64, seq=16), **kw)
    trainer.train()
    return trainer, logged_losses(trainer), flat_params(trainer.model)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Plain transformers.Trainer runs, per gradient-accumulation setting."""
    out = {}
    for ga in (1, 3):
        tmp = tmp_path_factory.mktemp(f"plain-ga{ga}")
        _, losses, params = run(Trainer, TrainingArguments(output_dir=str(tmp), gradient_accumulation_steps=ga, **COMMON))
        assert len(losses) == COMMON["max_steps"]
        out[ga] = (losses, params)
    return out


# ---- loss parity with the plain Trainer ---------------------------------------------------------------------
@pytest.mark.parametrize("ga", [1, 3])
@pytest.mark.parametrize("optimizer,telemetry", [(None, False), (None, True), ("adamw", False)])
def test_losses_equal_a_plain_trainer(tmp_path, reference, ga, optimizer, telemetry):
    ref_losses, ref_params = reference[ga]
    args = train_args(tmp_path, gradient_accumulation_steps=ga, lowmem_optimizer=optimizer, lowmem_telemetry=telemetry)
    trainer, losses, params = run(LowMemTrainer, args)
    assert trainer.state.global_step == COMMON["max_steps"]
    if optimizer is None:
        # the very same code path as the Trainer: bit-identical
        assert losses == ref_losses
        assert torch.equal(params, ref_params)
    else:
        # core's AdamW is unfused on the CPU, the Trainer's default is fused: equal up to rounding
        assert losses == pytest.approx(ref_losses, abs=1e-6, rel=0)
        assert (params - ref_params).abs().max().item() < 1e-6
        assert type(trainer.optimizer.optimizer) is torch.optim.AdamW
    assert losses[0] != losses[-1]  # it trained


def test_two_line_switch_of_an_existing_script(tmp_path, reference):
    """`from hf_lowmem import LowMemTrainer as Trainer, LowMemTrainingArguments as TrainingArguments`,
    and also an old script that still builds a plain TrainingArguments."""
    ref_losses, ref_params = reference[1]
    plain = TrainingArguments(output_dir=str(tmp_path), **COMMON)
    trainer, losses, params = run(LowMemTrainer, plain)
    assert type(trainer.args) is LowMemTrainingArguments
    assert trainer.args.learning_rate == plain.learning_rate and trainer.args.max_steps == plain.max_steps
    assert losses == ref_losses and torch.equal(params, ref_params)


def test_evaluation_equals_a_plain_trainer(tmp_path):
    eval_ds = RandomTokens(n=8, seq=16, seed=1)
    plain = Trainer(model=tiny_model(), args=TrainingArguments(output_dir=str(tmp_path), **COMMON), eval_dataset=eval_ds)
    low = LowMemTrainer(model=tiny_model(), args=train_args(tmp_path), eval_dataset=eval_ds)
    assert low.evaluate()["eval_loss"] == plain.evaluate()["eval_loss"]


# ---- hooks through a recording plugin -------------------------------------------------------------------------
class RecordingCallback(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def recording_plugin(log: list, *, fail_validate: bool = False, replace_model: bool = False):
    mod = types.ModuleType("recording_plugin")

    class RecSGD(Plugin):
        name, kind, help = "rec-sgd", "optimizer", "SGD, recording every hook call"

        def create_optimizer(self, ctx, model, trainer):
            log.append("create_optimizer")
            return torch.optim.SGD(model.parameters(), lr=ctx.args.learning_rate)

        def compute_loss(self, ctx, model, inputs, num_items_in_batch):
            log.append("compute_loss")
            return None  # leave it to the Trainer

    @hookimpl
    def hf_lowmem_register(register):
        register(RecSGD())
        register(PluginInfo(name="rec-offload", kind="offload", help="does nothing, records"))

    @hookimpl
    def hf_lowmem_validate(ctx):
        log.append("validate")
        if fail_validate and ctx.is_selected("rec-sgd"):
            raise PluginError("rec-sgd refuses this machine (test)")

    @hookimpl
    def hf_lowmem_prepare_model(ctx, model, stage):
        log.append(f"prepare:{stage}")
        if replace_model and stage == "offload" and ctx.is_selected("rec-offload"):
            new = tiny_model(seed=1)
            new.replaced_by_plugin = True
            return new
        return None

    @hookimpl
    def hf_lowmem_callbacks(ctx):
        log.append("callbacks")
        return [RecordingCallback()] if ctx.is_selected("rec-sgd") else None

    @hookimpl
    def hf_lowmem_before_save(ctx, model, state_dict):
        log.append("before_save")
        state_dict["model.norm.weight"] = torch.full_like(state_dict["model.norm.weight"], 7.0)

    for name, fn in list(locals().items()):
        if name.startswith("hf_lowmem_"):
            setattr(mod, name, fn)
    return mod


@pytest.fixture
def with_plugin(monkeypatch):
    """Install a host with the recording plugin as the process-wide one; returns (host, log, factory)."""

    def install(**kw):
        log: list = []
        host = plugins_mod.load_plugins(extra_plugins=[("recording", recording_plugin(log, **kw))])
        monkeypatch.setattr(plugins_mod, "_default_host", host)
        return host, log

    return install


def test_hooks_run_in_the_documented_order_and_their_results_are_used(tmp_path, with_plugin):
    from safetensors.torch import load_file

    host, log = with_plugin()
    args = train_args(tmp_path, lowmem_optimizer="rec-sgd", lowmem_offload=["rec-offload"], gradient_accumulation_steps=2)
    trainer = LowMemTrainer(model=tiny_model(), args=args, train_dataset=RandomTokens())
    assert log == ["validate", "prepare:quantization", "prepare:attention", "prepare:offload", "prepare:optimizer",
                   "callbacks"]
    assert trainer.lowmem_ctx.selection.names() == ["rec-sgd", "rec-offload"]
    cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, RecordingCallback))
    log.clear()
    trainer.train()
    assert log[0] == "create_optimizer" and log.count("create_optimizer") == 1
    assert log.count("compute_loss") == COMMON["max_steps"] * 2  # once per micro-batch
    assert type(trainer.optimizer.optimizer) is torch.optim.SGD
    assert cb.steps == COMMON["max_steps"]
    log.clear()
    trainer.save_model(str(tmp_path / "saved"))
    assert log == ["before_save"]
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert torch.all(saved["model.norm.weight"] == 7.0)  # the rewritten dict is what reached the disk
    assert not torch.all(trainer.model.model.norm.weight == 7.0)  # and the model itself is untouched
    assert torch.equal(saved["lm_head.weight"], trainer.model.lm_head.weight.detach())


def test_a_model_returned_by_prepare_model_replaces_the_users(tmp_path, with_plugin):
    with_plugin(replace_model=True)
    trainer = LowMemTrainer(model=tiny_model(), args=train_args(tmp_path, lowmem_offload=["rec-offload"]),
                            train_dataset=RandomTokens())
    assert getattr(trainer.model, "replaced_by_plugin", False)


def test_validation_failure_stops_before_the_model_is_touched(tmp_path, with_plugin):
    _, log = with_plugin(fail_validate=True)
    with pytest.raises(PluginError, match="rec-sgd refuses this machine"):
        LowMemTrainer(model=tiny_model(), args=train_args(tmp_path, lowmem_optimizer="rec-sgd"))
    assert log == ["validate"]


def test_unselected_plugins_do_not_act(tmp_path, with_plugin, reference):
    _, log = with_plugin()
    trainer, losses, params = run(LowMemTrainer, train_args(tmp_path))
    assert log.count("create_optimizer") == 0  # no optimizer plugin selected: none is asked
    assert type(trainer.optimizer.optimizer) is not torch.optim.SGD
    assert losses == reference[1][0]


def test_an_optimizer_the_user_passes_wins_over_plugins(tmp_path, with_plugin):
    _, log = with_plugin()
    model = tiny_model()
    mine = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.5)
    trainer, _, _ = run(LowMemTrainer, train_args(tmp_path, lowmem_optimizer="adamw"), model=model, optimizers=(mine, None))
    assert trainer.optimizer.optimizer is mine
    assert "create_optimizer" not in log


# ---- TRL ---------------------------------------------------------------------------------------------------------
def tiny_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(128)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                   pad_token="t0", eos_token="t1", unk_token="t0")


def test_trl_sft_trainer_with_a_selected_plugin(tmp_path, with_plugin):
    datasets = pytest.importorskip("datasets")  # installed by the test extra
    from trl import SFTConfig, SFTTrainer

    ds = datasets.Dataset.from_list([{"input_ids": RandomTokens()[i]["input_ids"].tolist()} for i in range(32)])
    sft_kw = dict(COMMON, max_steps=3, max_length=16)
    _, log = with_plugin()

    def sft(trainer_cls, args_cls, **lowmem):
        trainer = trainer_cls(model=tiny_model(), args=args_cls(output_dir=str(tmp_path), **sft_kw, **lowmem),
                              train_dataset=ds, processing_class=tiny_tokenizer())
        trainer.train()
        return trainer, logged_losses(trainer)

    _, plain_losses = sft(SFTTrainer, SFTConfig)
    cls, args_cls = lowmem_trainer_class(SFTTrainer), lowmem_args_class(SFTConfig)
    assert issubclass(cls, SFTTrainer) and lowmem_trainer_class(SFTTrainer) is cls
    assert lowmem_trainer_class(Trainer) is LowMemTrainer
    # no plugin: same losses as TRL's own trainer
    _, same_losses = sft(cls, args_cls)
    assert same_losses == plain_losses
    # a selected plugin is used
    log.clear()
    trainer, losses = sft(cls, args_cls, lowmem_optimizer="rec-sgd")
    assert type(trainer.optimizer.optimizer) is torch.optim.SGD and "create_optimizer" in log
    assert trainer.state.global_step == 3 and losses != plain_losses
    # saving works (training_args.bin pickles the dynamically made LowMemSFTConfig)
    trainer.save_model(str(tmp_path / "sft"))
    assert "before_save" in log
    back = torch.load(tmp_path / "sft" / "training_args.bin", weights_only=False)
    assert type(back).__name__ == "LowMemSFTConfig" and back.lowmem_optimizer == "rec-sgd" and back.max_length == 16
    # a plain SFTConfig is upgraded by the mixin too
    trainer = cls(model=tiny_model(), args=SFTConfig(output_dir=str(tmp_path), **sft_kw), train_dataset=ds,
                  processing_class=tiny_tokenizer())
    assert isinstance(trainer.args, args_cls)
