"""Distributed modes: every plugin's declared modes (PluginInfo.modes) are enforced before training
starts, with a message that is identical on every rank, and layer-wise optimizers work under DDP.

Two levels: a simulation of each rank's environment (WORLD_SIZE, ACCELERATE_USE_FSDP,
ACCELERATE_USE_DEEPSPEED) for every registered plugin, and real 2-process ``accelerate launch`` runs in
which a third-party plugin that does not declare the mode is refused on both ranks, without a hang.
"""

from __future__ import annotations

import re

import pytest

import hf_lowmem.plugins as plugins_mod
from hf_lowmem import LowMemTrainingArguments
from hf_lowmem.errors import PluginError
from hf_lowmem.registry import MODES
from tests.test_accelerate import ddp_matches_single, launch
from tests.test_plugins import make_dist

MODE_ENV = {
    "single": {},
    "ddp": {"WORLD_SIZE": "2"},
    "fsdp": {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"},
    "deepspeed": {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"},
}
DIST_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED",
             "HF_LOWMEM_PLUGINS", "HF_LOWMEM_DISABLE_PLUGINS", "HF_LOWMEM_STRICT_PLUGINS")


@pytest.fixture
def clean_env(monkeypatch):
    for var in DIST_VARS:
        monkeypatch.delenv(var, raising=False)
    plugins_mod.reset_plugin_host()
    yield monkeypatch
    plugins_mod.reset_plugin_host()


def rank_verdicts(args, mode: str, monkeypatch) -> list[str | None]:
    """What each of 2 ranks decides: each has its own environment and its own freshly loaded plugins."""
    verdicts = []
    for rank in ("0", "1"):
        for var in DIST_VARS[:5]:
            monkeypatch.delenv(var, raising=False)
        for k, v in {**MODE_ENV[mode], "RANK": rank, "LOCAL_RANK": rank}.items():
            monkeypatch.setenv(k, v)
        try:
            args.lowmem_selection(plugins_mod.load_plugins())
            verdicts.append(None)
        except PluginError as e:
            verdicts.append(str(e))
    for var in DIST_VARS[:5]:
        monkeypatch.delenv(var, raising=False)
    return verdicts


def test_every_plugin_is_held_to_its_declared_modes_identically_on_every_rank(clean_env, tmp_path):
    host = plugins_mod.load_plugins()
    assert len(host.registry) >= 1
    refused = 0
    for info in host.registry:
        value = [info.name] if info.kind == "offload" else info.name
        # built in single mode: TrainingArguments would otherwise join a real process group right here
        args = LowMemTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                       **{f"lowmem_{info.kind}": value})
        for mode in MODE_ENV:  # "dp" is one process: test_dataparallel_is_refused_with_the_way_out below
            verdicts = rank_verdicts(args, mode, clean_env)
            assert verdicts[0] == verdicts[1], (info.name, mode, verdicts)
            if mode in info.modes:
                assert verdicts[0] is None, (info.name, mode, verdicts[0])
            else:
                refused += 1
                assert verdicts[0] == (f"plugin {info.name!r} does not support {mode} runs (it supports: "
                                       f"{', '.join(info.modes)}). Choose another plugin or launch without that mode.")
    print(f"{refused} (plugin, mode) pairs refused")


def test_the_trainer_refuses_before_touching_the_model(clean_env, tmp_path):
    """The same check guards LowMemTrainer itself (e.g. arguments built before the launcher set the env)."""
    from hf_lowmem import LowMemTrainer

    host = plugins_mod.load_plugins()
    single_only = next((i for i in host.registry if i.modes == ("single",)), None)
    assert single_only is not None, "no first-party plugin is single-only any more: pick another for this test"
    value = [single_only.name] if single_only.kind == "offload" else single_only.name
    args = LowMemTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                   **{f"lowmem_{single_only.kind}": value})

    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"the model was touched ({name}) before the mode check")

    clean_env.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(PluginError, match=rf"plugin '{single_only.name}' does not support fsdp runs"):
        LowMemTrainer(model=Untouchable(), args=args)


# ---- real 2-process launches -------------------------------------------------------------------------------------
RESTRICTED = """
    from hf_lowmem import hookimpl, PluginInfo

    @hookimpl
    def hf_lowmem_register(register):
        register(PluginInfo(name="single-only-opt", kind="optimizer", help="one process only", modes=("single",)))
        register(PluginInfo(name="no-fsdp-opt", kind="optimizer", help="not FSDP", modes=("single", "ddp")))
    """


@pytest.mark.parametrize("config,plugin,mode", [
    ("ddp.yaml", "single-only-opt", "ddp"),
    ("fsdp2.yaml", "no-fsdp-opt", "fsdp"),
])
def test_a_launch_with_an_unsupported_plugin_fails_fast_on_every_rank(tmp_path, config, plugin, mode):
    site = make_dist(tmp_path / "site", "restricted-plugins", {"restricted_mod": RESTRICTED},
                     {"restricted": "restricted_mod"})
    r, _ = launch(config, ["--steps", "50", "--optimizer", plugin, "--losses-out", str(tmp_path / "never.json")],
                  tmp_path, env={"PYTHONPATH": str(site)}, timeout=600)  # a hang fails here
    assert r.returncode != 0
    assert not (tmp_path / "never.json").exists()  # no step was trained
    messages = re.findall(r"\[rank(\d)\]: hf_lowmem\.errors\.PluginError: (.*)", r.stderr)
    assert sorted(rank for rank, _ in messages) == ["0", "1"], r.stderr[-4000:]
    assert messages[0][1] == messages[1][1]
    supported = "single" if plugin == "single-only-opt" else "single, ddp"
    assert messages[0][1] == (f"plugin {plugin!r} does not support {mode} runs (it supports: {supported}). "
                              "Choose another plugin or launch without that mode.")


# ---- layer-wise optimizers under DDP ------------------------------------------------------------------------------
def test_galore_layerwise_under_ddp_equals_one_process(tmp_path):
    name = "galore-adamw-layerwise"
    host = plugins_mod.load_plugins()
    assert name in host.registry and "ddp" in host.registry[name].modes
    opts = '{"galore-adamw-layerwise": {"rank": 8}}'
    dist = ddp_matches_single(tmp_path, "ddp.yaml", ["--optimizer", name, "--options", opts])
    assert dist["mode"] == "ddp" and dist["plugins"] == [name]


def test_dataparallel_is_refused_with_the_way_out(clean_env, tmp_path):
    """A plain ``python script.py`` that sees several GPUs makes the Trainer use torch.nn.DataParallel
    (``args.n_gpu > 1``). Seen on a 2-GPU machine: GaLore layer-wise failed mid-run with "Expected all
    tensors to be on the same device" and bnb-int8 with "'Tensor' object has no attribute 'CB'". Plugins
    that do not declare "dp" are now refused before training, saying how to launch instead."""
    from hf_lowmem.context import DP_HINT, distributed_mode

    host = plugins_mod.load_plugins()
    dp_refused = sorted(i.name for i in host.registry if "dp" not in i.modes)
    for name in ("galore-adamw8bit-layerwise", "bnb-int8", "int8-weights", "stream", "activation-offload"):
        assert name in dp_refused, name
    assert "adamw" not in dp_refused and "gradient-checkpointing" not in dp_refused
    for name in ("galore-adamw-layerwise", "adamw"):
        info = host.registry[name]
        value = [name] if info.kind == "offload" else name
        args = LowMemTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                       **{f"lowmem_{info.kind}": value})
        assert distributed_mode(args) == "single"
        args._n_gpu = 2  # what TrainingArguments computes for one process that sees 2 GPUs
        assert distributed_mode(args) == "dp"
        if name == "adamw":
            assert args.lowmem_selection(host) is not None
            continue
        with pytest.raises(PluginError) as e:
            args.lowmem_selection(host)
        assert str(e.value) == (f"plugin {name!r} does not support dp runs (it supports: single, ddp). " + DP_HINT)
        assert "CUDA_VISIBLE_DEVICES=0" in str(e.value) and "accelerate launch" in str(e.value)
