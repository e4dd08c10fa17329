"""LowMemTrainingArguments: validation errors at construction, the upgrade of a plain TrainingArguments,
HfArgumentParser exposure, TRL config classes, and distributed-mode enforcement (identical on every rank).

Test plugins with options, incompatibilities and restricted modes are registered next to the installed
ones (``load_plugins(extra_plugins=...)``) and installed as the process-wide host, which is what the
arguments validate against."""

from __future__ import annotations

import dataclasses
import pickle
import types
from dataclasses import dataclass

import pytest
from transformers import HfArgumentParser, TrainingArguments

import hf_lowmem.plugins as plugins_mod
from hf_lowmem import LowMemTrainingArguments, hookimpl, lowmem_args_class, upgrade_args
from hf_lowmem.args import LowMemFields
from hf_lowmem.context import distributed_mode
from hf_lowmem.errors import PluginError
from hf_lowmem.registry import PluginInfo


@dataclass
class WidgetOptions:
    rank: int = 8
    scale: float = 0.25

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"rank must be positive, got {self.rank}")


def _test_plugins():
    mod = types.ModuleType("argtest_plugins")

    @hookimpl
    def hf_lowmem_register(register):
        register(PluginInfo(name="widget-opt", kind="optimizer", help="an optimizer with options",
                            options=WidgetOptions,
                            incompatible={"single-attn": "widget-opt needs the attention's softmax statistics"}))
        register(PluginInfo(name="single-attn", kind="attention", help="single-process only", modes=("single",)))
        register(PluginInfo(name="gizmo-quant", kind="quantization", help="not with offload", modes=("single", "ddp"),
                            incompatible={"offload": "quantized weights are already on the GPU"}))
        register(PluginInfo(name="shelf-offload", kind="offload", help="offload one"))
        register(PluginInfo(name="rack-offload", kind="offload", help="offload two", modes=("single", "ddp", "fsdp")))

    mod.hf_lowmem_register = hf_lowmem_register
    return mod


@pytest.fixture
def host(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED",
                "HF_LOWMEM_PLUGINS", "HF_LOWMEM_DISABLE_PLUGINS", "HF_LOWMEM_STRICT_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    h = plugins_mod.load_plugins(extra_plugins=[("argtest", _test_plugins())])
    monkeypatch.setattr(plugins_mod, "_default_host", h)
    return h


def make(tmp_path, **kw):
    return LowMemTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kw)


# ---- names and kinds ------------------------------------------------------------------------------------
def test_valid_selection(host, tmp_path):
    args = make(tmp_path, lowmem_optimizer="widget-opt", lowmem_offload="shelf-offload, rack-offload",
                lowmem_options='{"widget-opt": {"rank": 4}}')
    sel = args.lowmem_selection()
    assert sel.by_kind["optimizer"] == ["widget-opt"]
    assert sel.by_kind["offload"] == ["shelf-offload", "rack-offload"]
    assert sel.options["widget-opt"] == WidgetOptions(rank=4, scale=0.25)
    assert args.lowmem_options == {"widget-opt": {"rank": 4}}


def test_none_strings_select_nothing(host, tmp_path):
    args = make(tmp_path, lowmem_optimizer="None", lowmem_attention=" ", lowmem_offload="none")
    assert (args.lowmem_optimizer, args.lowmem_attention, args.lowmem_offload) == (None, None, [])
    assert args.lowmem_selection().names() == []


def test_unknown_name_lists_the_available_ones(host, tmp_path):
    with pytest.raises(PluginError) as e:
        make(tmp_path, lowmem_optimizer="adamv")
    msg = str(e.value)
    assert "unknown optimizer plugin 'adamv'" in msg
    assert "Available: " in msg and "adamw" in msg and "widget-opt" in msg
    assert "single-attn" not in msg  # only plugins of the asked kind are offered
    assert "hf-lowmem plugins" in msg


def test_unknown_offload_name(host, tmp_path):
    with pytest.raises(PluginError, match=r"unknown offload plugin 'shelf-ofload'\. Available: .*rack-offload.*shelf-offload"):
        make(tmp_path, lowmem_offload=["shelf-ofload"])


def test_wrong_kind_says_which_argument_to_use(host, tmp_path):
    with pytest.raises(PluginError) as e:
        make(tmp_path, lowmem_attention="adamw")
    msg = str(e.value)
    assert "unknown attention plugin 'adamw'" in msg
    assert "'adamw' is an optimizer plugin: select it with lowmem_optimizer" in msg
    available = msg.split("Available: ")[1].split(".")[0].split(", ")
    assert available == host.registry.names("attention") and "single-attn" in available


def test_plugin_errors_are_value_errors(host, tmp_path):
    # HfArgumentParser-based scripts and TRL catch ValueError from argument classes
    with pytest.raises(ValueError):
        make(tmp_path, lowmem_quantization="nope")


# ---- options ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,match", [
    ("{not json", r"lowmem_options must be JSON like"),
    ('["widget-opt"]', r"lowmem_options must map plugin names to option dicts"),
    ('{"widget-opt": 3}', r"lowmem_options must map plugin names to option dicts"),
    (42, r"lowmem_options must map plugin names to option dicts"),
])
def test_bad_options_json(host, tmp_path, raw, match):
    with pytest.raises(PluginError, match=match):
        make(tmp_path, lowmem_optimizer="widget-opt", lowmem_options=raw)


def test_unknown_option_lists_the_valid_ones(host, tmp_path):
    with pytest.raises(PluginError) as e:
        make(tmp_path, lowmem_optimizer="widget-opt", lowmem_options={"widget-opt": {"rnak": 4}})
    assert str(e.value) == ("plugin 'widget-opt' has no option(s) ['rnak']; its options are: "
                            "rank (default 8), scale (default 0.25)")


def test_bad_option_value(host, tmp_path):
    with pytest.raises(PluginError, match=r"bad options for plugin 'widget-opt': rank must be positive, got 0"):
        make(tmp_path, lowmem_optimizer="widget-opt", lowmem_options={"widget-opt": {"rank": 0}})


def test_options_for_a_plugin_without_options(host, tmp_path):
    with pytest.raises(PluginError, match=r"plugin 'adamw' takes no options, got \['lr'\]"):
        make(tmp_path, lowmem_optimizer="adamw", lowmem_options={"adamw": {"lr": 1}})


def test_options_for_a_plugin_that_is_not_selected(host, tmp_path):
    with pytest.raises(PluginError, match=r"options given for plugin\(s\) \['widget-opt'\] that are not selected; "
                                          r"selected: \['adamw'\]"):
        make(tmp_path, lowmem_optimizer="adamw", lowmem_options={"widget-opt": {"rank": 2}})


# ---- combinations -------------------------------------------------------------------------------------------
def test_incompatible_pair_gives_the_reason(host, tmp_path):
    with pytest.raises(PluginError) as e:
        make(tmp_path, lowmem_optimizer="widget-opt", lowmem_attention="single-attn")
    msg = str(e.value)
    assert "cannot be combined: widget-opt needs the attention's softmax statistics" in msg
    assert "'widget-opt'" in msg and "'single-attn'" in msg


def test_incompatible_with_a_whole_kind(host, tmp_path):
    with pytest.raises(PluginError, match=r"plugins 'gizmo-quant' and 'rack-offload' cannot be combined: "
                                          r"quantized weights are already on the GPU"):
        make(tmp_path, lowmem_quantization="gizmo-quant", lowmem_offload=["rack-offload"])
    make(tmp_path, lowmem_quantization="gizmo-quant", lowmem_optimizer="widget-opt")  # fine without offload


def test_one_plugin_per_kind_except_offload(host):
    from hf_lowmem.context import resolve_selection

    with pytest.raises(PluginError, match=r"only one optimizer plugin can be selected, got \['adamw', 'widget-opt'\]"):
        resolve_selection(host, {"optimizer": ["adamw", "widget-opt"]}, {}, "single")


# ---- distributed modes ---------------------------------------------------------------------------------------
def test_distributed_mode_from_environment(monkeypatch):
    for var in ("WORLD_SIZE", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(var, raising=False)
    assert distributed_mode() == "single"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed_mode() == "single"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed_mode() == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert distributed_mode() == "fsdp"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert distributed_mode() == "deepspeed"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert distributed_mode() == "ddp"
    assert distributed_mode(types.SimpleNamespace(fsdp=["full_shard"], deepspeed=None)) == "fsdp"
    assert distributed_mode(types.SimpleNamespace(fsdp=[], deepspeed="ds.json")) == "deepspeed"


def test_fsdp_environment_refuses_a_single_only_plugin_at_construction(host, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    with pytest.raises(PluginError) as e:
        make(tmp_path, lowmem_attention="single-attn")
    assert str(e.value) == ("plugin 'single-attn' does not support fsdp runs (it supports: single). "
                            "Choose another plugin or launch without that mode.")
    make(tmp_path, lowmem_offload=["rack-offload"])  # rack-offload declares fsdp


@pytest.mark.parametrize("env,mode,plugin", [
    ({"WORLD_SIZE": "2"}, "ddp", "single-attn"),
    ({"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"}, "fsdp", "gizmo-quant"),
    ({"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"}, "deepspeed", "rack-offload"),
])
def test_unsupported_mode_is_refused_with_the_same_message_on_every_rank(host, tmp_path, monkeypatch, env, mode, plugin):
    kind = host.registry[plugin].kind
    field = f"lowmem_{kind}"
    value = [plugin] if kind == "offload" else plugin
    # Built in single mode (TrainingArguments would otherwise try to join a real process group here),
    # then checked as each rank of a 2-process launch would check it.
    args = make(tmp_path, **{field: value})
    messages = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        # each rank is its own process with its own plugin host: simulate that too
        fresh = plugins_mod.load_plugins(extra_plugins=[("argtest", _test_plugins())])
        with pytest.raises(PluginError) as e:
            args.lowmem_selection(fresh)
        messages.append(str(e.value))
    assert messages[0] == messages[1]
    assert f"plugin {plugin!r} does not support {mode} runs (it supports: " in messages[0]
    assert ", ".join(host.registry[plugin].modes) in messages[0]


def test_first_party_plugins_declare_valid_modes():
    from hf_lowmem.registry import MODES

    host = plugins_mod.load_plugins()
    for info in host.registry:
        assert info.modes and set(info.modes) <= set(MODES), info
        assert "single" in info.modes, f"{info.name} cannot run on one device?"


# ---- upgrade of a plain TrainingArguments ---------------------------------------------------------------------
def test_plain_training_arguments_are_upgraded_with_the_same_values(host, tmp_path):
    plain = TrainingArguments(
        output_dir=str(tmp_path), learning_rate=3e-4, per_device_train_batch_size=3, gradient_accumulation_steps=2,
        warmup_steps=5, lr_scheduler_type="cosine", weight_decay=0.1, seed=7, report_to="none", logging_steps=3,
        use_cpu=True, max_steps=11, adam_beta2=0.95, max_grad_norm=0.5,
    )
    up = upgrade_args(plain)
    assert type(up) is LowMemTrainingArguments
    diffs = {f.name: (getattr(plain, f.name), getattr(up, f.name))
             for f in dataclasses.fields(plain) if getattr(plain, f.name) != getattr(up, f.name)}
    assert diffs == {}
    assert up.lowmem_optimizer is None and up.lowmem_offload == [] and up.lowmem_options == {}
    assert up.to_dict()["learning_rate"] == 3e-4
    # overrides, and idempotence
    up2 = upgrade_args(plain, lowmem_optimizer="widget-opt", lowmem_options={"widget-opt": {"scale": 1.0}})
    assert up2.lowmem_selection().options["widget-opt"].scale == 1.0
    assert upgrade_args(up) is up
    # the upgrade validates too
    with pytest.raises(PluginError, match="unknown optimizer plugin"):
        upgrade_args(plain, lowmem_optimizer="nope")


def test_upgrade_of_default_arguments(host, tmp_path):
    plain = TrainingArguments(output_dir=str(tmp_path))
    up = upgrade_args(plain)
    assert all(getattr(plain, f.name) == getattr(up, f.name) for f in dataclasses.fields(plain))


def test_upgrade_of_none(host):
    args = upgrade_args(None)
    assert isinstance(args, LowMemTrainingArguments) and args.output_dir == "tmp_trainer"


# ---- HfArgumentParser ------------------------------------------------------------------------------------------
LOWMEM_FIELDS = [f for f in dataclasses.fields(LowMemFields)]


def test_every_lowmem_field_has_help_text():
    assert len(LOWMEM_FIELDS) >= 9
    for f in LOWMEM_FIELDS:
        assert f.name.startswith("lowmem_")
        assert len(f.metadata.get("help", "")) > 20, f"{f.name} has no help text"


def test_hf_argument_parser_exposes_every_lowmem_field(host):
    parser = HfArgumentParser(LowMemTrainingArguments)
    for f in LOWMEM_FIELDS:
        (action,) = [a for a in parser._actions if f"--{f.name}" in a.option_strings]
        assert action.dest == f.name and action.help == f.metadata["help"]
    text = parser.format_help()
    for f in LOWMEM_FIELDS:
        assert f"--{f.name}" in text
    assert "`hf-lowmem plugins` lists them" in " ".join(text.split())


def test_hf_argument_parser_round_trip(host, tmp_path):
    parser = HfArgumentParser(LowMemTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(args=[
        "--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none",
        "--lowmem_optimizer", "widget-opt", "--lowmem_offload", "shelf-offload", "rack-offload",
        "--lowmem_options", '{"widget-opt": {"rank": 2}}', "--lowmem_telemetry", "false",
        "--lowmem_gpu_memory", "8GiB",
    ])
    assert isinstance(args, LowMemTrainingArguments)
    assert args.lowmem_optimizer == "widget-opt"
    assert args.lowmem_offload == ["shelf-offload", "rack-offload"]
    assert args.lowmem_options == {"widget-opt": {"rank": 2}}
    assert args.lowmem_telemetry is False and args.lowmem_gpu_memory == "8GiB"
    with pytest.raises(PluginError, match="unknown optimizer plugin 'nope'"):
        parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), "--use_cpu", "--lowmem_optimizer", "nope"])


# ---- other TrainingArguments subclasses (TRL) ---------------------------------------------------------------------
def test_lowmem_args_class_for_trl_config(host, tmp_path):
    from trl import SFTConfig

    cls = lowmem_args_class(SFTConfig)
    assert cls is lowmem_args_class(SFTConfig)  # one class per base
    assert issubclass(cls, SFTConfig) and issubclass(cls, LowMemFields)
    assert lowmem_args_class(cls) is cls and lowmem_args_class(TrainingArguments) is LowMemTrainingArguments
    names = {f.name for f in dataclasses.fields(cls)}
    assert {"max_length", "dataset_text_field"} <= names and {f.name for f in LOWMEM_FIELDS} <= names
    sft = SFTConfig(output_dir=str(tmp_path), max_length=64, use_cpu=True, report_to="none", learning_rate=2e-4)
    up = upgrade_args(sft, lowmem_optimizer="widget-opt")
    assert type(up) is cls and up.max_length == 64 and up.learning_rate == 2e-4
    assert all(getattr(sft, f.name) == getattr(up, f.name) for f in dataclasses.fields(sft))
    with pytest.raises(PluginError, match="unknown attention plugin"):
        cls(output_dir=str(tmp_path), use_cpu=True, lowmem_attention="nope")
    parser = HfArgumentParser(cls)
    assert "--lowmem_optimizer" in parser.format_help() and "--max_length" in parser.format_help()


def test_arguments_pickle(host, tmp_path):
    """Trainer.save_model writes training_args.bin with torch.save: the arguments must pickle, the
    dynamically made TRL classes included."""
    from trl import SFTConfig

    for args in (make(tmp_path, lowmem_optimizer="widget-opt"),
                 upgrade_args(SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
                              lowmem_optimizer="widget-opt")):
        back = pickle.loads(pickle.dumps(args))
        assert type(back) is type(args) and back == args
