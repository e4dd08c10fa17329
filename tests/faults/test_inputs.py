"""Bad arguments, broken and rogue plugins, NaN/inf hyperparameters and weights, fully masked batches, and
reproducible ``hf-lowmem train --seed``: each gets one line saying what to change, and the user's files
stay as they were. Cases that another helper's fix will turn green are ``xfail(strict=True)`` with the
owner in the reason, so they fail loudly once fixed."""

from __future__ import annotations

import math
import types

import pytest
import torch

import hf_lowmem.plugins as plugins_mod
from hf_lowmem import LowMemTrainer, Plugin, hookimpl
from hf_lowmem.errors import PluginError, PluginLoadError
from tests.faults.tinyrun import snapshot
from tests.tiny import RandomTokens, logged_losses, tiny_model, train_args


@pytest.fixture
def user_folder(tmp_path):
    """An output folder that already holds the user's work."""
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "model.safetensors").write_bytes(b"weights")
    (out / "NOTES.md").write_text("mine\n")
    return out


BAD_ARGUMENTS = {
    "misspelled optimizer": ({"lowmem_optimizer": "adamw8bit"}, PluginError,
                             r"unknown optimizer plugin 'adamw8bit'\. Available: .*bnb-adamw8bit"),
    "options that are not JSON": ({"lowmem_options": "{rank: 4"}, PluginError, r"lowmem_options must be JSON like"),
    "options of an unselected plugin": ({"lowmem_options": {"galore-adamw": {"rank": 4}}}, PluginError,
                                        r"options given for plugin\(s\) \['galore-adamw'\] that are not selected"),
    "misspelled option": ({"lowmem_optimizer": "galore-adamw", "lowmem_options": {"galore-adamw": {"rnak": 4}}},
                          PluginError, r"plugin 'galore-adamw' has no option\(s\) \['rnak'\]; its options are: .*rank"),
    "redundant pairing": ({"lowmem_offload": ["stream", "gradient-checkpointing"]}, PluginError,
                          r"cannot be combined: redundant"),
    "a budget without a unit": ({"lowmem_gpu_memory": "8"}, ValueError, r"8.*(unit|GiB|GB)"),
    "NaN learning rate": ({"learning_rate": float("nan")}, PluginError,
                          r"learning_rate=nan cannot train: it must be a finite number >= 0, e.g. 1e-5 \(--learning_rate\)"),
    "infinite learning rate under stream": ({"learning_rate": math.inf, "lowmem_offload": ["stream"]}, PluginError,
                                            r"learning_rate=inf cannot train"),
    "negative learning rate under stream": ({"learning_rate": -1.0, "lowmem_offload": ["stream"]}, PluginError,
                                            r"learning_rate=-1.0 cannot train"),
    "adam_beta2 of 1": ({"adam_beta2": 1.0}, PluginError, r"adam_beta2=1.0 cannot train: it must be in \[0, 1\)"),
    "NaN weight decay": ({"weight_decay": float("nan")}, PluginError, r"weight_decay=nan cannot train"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_get_one_line_and_touch_nothing(user_folder, case):
    kwargs, error, message = BAD_ARGUMENTS[case]
    before = snapshot(user_folder)
    model = tiny_model()
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=message) as info:
        LowMemTrainer(model=model, args=train_args(user_folder, **kwargs), train_dataset=RandomTokens())
    assert "\n" not in str(info.value).strip()
    assert snapshot(user_folder) == before
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))  # the model was not touched


# ---- plugins that misbehave ------------------------------------------------------------------------------------------
def plugin_module(name: str, **hooks) -> types.ModuleType:
    mod = types.ModuleType(name)
    for key, fn in hooks.items():
        setattr(mod, key, hookimpl(fn))
    return mod


def rogue_module(calls: list):
    class RogueSGD(Plugin):
        name, kind, help = "rogue-sgd", "optimizer", "SGD, and it would answer every optimizer request"

        def create_optimizer(self, ctx, model, trainer):
            calls.append(ctx.selected("optimizer"))
            return torch.optim.SGD(model.parameters(), lr=0.5)  # ignores the selection

    def hf_lowmem_register(register):
        register(RogueSGD())

    return plugin_module("rogue", hf_lowmem_register=hf_lowmem_register)


@pytest.mark.parametrize("selected", ["adamw", None, "rogue-sgd"])
def test_a_create_optimizer_that_ignores_the_selection_cannot_replace_the_users_choice(tmp_path, monkeypatch, selected):
    calls: list = []
    host = plugins_mod.load_plugins(extra_plugins=[("rogue", rogue_module(calls))])
    monkeypatch.setattr(plugins_mod, "_default_host", host)  # what the arguments are checked against
    trainer = LowMemTrainer(model=tiny_model(), args=train_args(tmp_path, max_steps=1, lowmem_optimizer=selected),
                            train_dataset=RandomTokens(), plugin_host=host)
    trainer.train()
    kind = type(trainer.optimizer.optimizer)
    if selected == "rogue-sgd":  # its own plugin selected: used
        assert kind is torch.optim.SGD and calls == ["rogue-sgd"]
    else:  # the selected plugin's optimizer, or the Trainer's own; the rogue module is not even asked
        assert kind is torch.optim.AdamW and calls == []


def test_a_selected_optimizer_plugin_that_returns_nothing_is_an_error(tmp_path, monkeypatch):
    class LazyOpt(Plugin):
        name, kind, help = "lazy-opt", "optimizer", "returns None"

    def hf_lowmem_register(register):
        register(LazyOpt())

    mod = plugin_module("lazy", hf_lowmem_register=hf_lowmem_register)
    host = plugins_mod.load_plugins(extra_plugins=[("lazy", mod)])
    monkeypatch.setattr(plugins_mod, "_default_host", host)
    trainer = LowMemTrainer(model=tiny_model(), args=train_args(tmp_path, max_steps=1, lowmem_optimizer="lazy-opt"),
                            train_dataset=RandomTokens(), plugin_host=host)
    with pytest.raises(PluginError, match=r"optimizer plugin 'lazy-opt' \(module 'lazy'\) created no optimizer"):
        trainer.train()  # before: the Trainer's own AdamW, silently
    assert trainer.state.global_step == 0


def test_broken_plugins_are_named_and_isolated():
    def raises(register):
        raise RuntimeError("boom")

    misspelled = plugin_module("typo", hf_lowmem_create_optimiser=lambda ctx, model, trainer: None)
    host = plugins_mod.load_plugins(extra_plugins=[("raises", plugin_module("raises", hf_lowmem_register=raises)),
                                                   ("typo", misspelled)])
    assert [f.entry_point for f in host.failures] == ["raises", "typo"]
    assert "RuntimeError: boom" in str(host.failures[0]) and "hf_lowmem_create_optimiser" in str(host.failures[1])
    assert "adamw" in host.registry  # the others keep working
    with pytest.raises(PluginLoadError, match=r"plugin 'typo' .* failed to load.*strict mode"):
        plugins_mod.load_plugins(strict=True, extra_plugins=[("typo", misspelled)])


@pytest.mark.parametrize("var,value", [("HF_LOWMEM_PLUGINS", "junk"), ("HF_LOWMEM_DISABLE_PLUGINS", "stream")])
def test_an_environment_filter_that_left_a_plugin_out_is_named(tmp_path, monkeypatch, var, value):
    from hf_lowmem import LowMemTrainingArguments

    monkeypatch.setenv(var, value)
    monkeypatch.setattr(plugins_mod, "_default_host", None)
    with pytest.raises(PluginError, match=rf"unknown offload plugin 'stream'\..* Note: {var}='{value}' left out the "
                                          r"plugin module\(s\) .*stream.*; unset it"):
        LowMemTrainingArguments(output_dir=str(tmp_path), use_cpu=True, lowmem_offload=["stream"])
    assert list(tmp_path.iterdir()) == []


# ---- NaN / inf and fully masked batches -----------------------------------------------------------------------------
def test_galore_with_a_nan_weight_names_the_parameter(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    trainer = LowMemTrainer(model=model, train_dataset=RandomTokens(),
                            args=train_args(tmp_path, max_steps=1, lowmem_optimizer="galore-adamw",
                                            lowmem_options={"galore-adamw": {"rank": 4}}))
    with pytest.raises(PluginError, match=r"the gradient of model\.layers\.0\.self_attn\.q_proj\.weight is not finite "
                                          r"\(NaN or inf\) at optimizer step 1.*lower the learning rate") as info:
        trainer.train()  # before: _LinAlgError from torch.linalg.eigh
    assert "\n" not in str(info.value)


class MaskedTokens(torch.utils.data.Dataset):
    """Every label masked (-100), as completion-only SFT masking gives for a prompt-only example."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        ids = RandomTokens(n=16, seq=16)[i]["input_ids"]
        return {"input_ids": ids, "labels": torch.full_like(ids, -100)}


MASKED = [pytest.param([], id="plain"),
          pytest.param(["chunked-loss"], id="chunked-loss"),
          pytest.param(["stream"], id="stream")]


@pytest.mark.parametrize("offload", MASKED)
def test_a_fully_masked_batch_trains_on_like_a_plain_trainer(tmp_path, offload):
    trainer = LowMemTrainer(model=tiny_model(), args=train_args(tmp_path, max_steps=2, lowmem_offload=offload),
                            train_dataset=MaskedTokens())
    trainer.train()
    params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    assert torch.isfinite(params).all()
    assert all(math.isfinite(x) for x in logged_losses(trainer))


# ---- hf-lowmem train --seed ----------------------------------------------------------------------------------------
def test_cli_train_with_the_same_seed_gives_the_same_model(tmp_path):
    from safetensors.torch import load_file

    from hf_lowmem.cli_train import run_argv
    from tests.tiny import tiny_config

    cfg = tmp_path / "config.json"
    tiny_config(vocab_size=260).to_json_file(cfg)
    data = tmp_path / "data.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)

    def train(seed: int, name: str) -> dict:
        out = tmp_path / name
        run_argv(["--model", str(cfg), "--data", str(data), "--block_size", "16", "--output_dir", str(out),
                  "--max_steps", "2", "--per_device_train_batch_size", "2", "--save_strategy", "no", "--report_to",
                  "none", "--use_cpu", "true", "--seed", str(seed), "--disable_tqdm", "true", "--lowmem_telemetry", "false"])
        return load_file(str(out / "model.safetensors"))

    a, b, c = train(7, "a"), train(7, "b"), train(8, "c")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # before: a fresh random model each time
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert data.read_text().startswith("the quick brown fox") and cfg.is_file()
