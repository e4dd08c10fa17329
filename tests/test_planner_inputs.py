"""The planner's inputs: values that would silently plan something else are refused with one line (a layer
count of 0, a rate of 0, a missing local config that would be looked up on the Hub), and a CPU-only run
does not plan a GPU that is not there."""

from __future__ import annotations

import pytest

from hf_lowmem.errors import PluginError
from hf_lowmem.planner import DeviceSpec, load_model_shape
from tests.tiny import RandomTokens, tiny_config, tiny_model, train_args


def _plan(capsys, *argv):
    from hf_lowmem.cli import main

    code = main(["plan", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


BASE = ["--model", "llama2-7b", "--gpu-memory", "8GiB", "--host-memory", "64GiB", "--assume-installed", "--json"]


@pytest.mark.parametrize("flags,message", [
    (["--layers", "0"], r"--layers 0: the number of decoder layers to plan must be >= 1"),
    (["--layers", "-2"], r"--layers -2: the number of decoder layers"),
    (["--pcie-gbps", "0"], r"--pcie[-_]gbps 0: a rate must be a positive number of GB/s"),
    (["--tflops", "100", "--pcie-gbps", "0"], r"--pcie[-_]gbps 0: a rate must be a positive"),
    (["--tflops", "-5"], r"--tflops -5: a rate must be a positive number of TFLOP/s"),
    (["--tflops", "nan"], r"--tflops nan: a rate must be a positive"),
])
def test_values_that_would_plan_something_else_are_refused(capsys, flags, message):
    """Before: --layers 0 planned all 32 layers; --pcie-gbps 0 planned at the default rate, labelled "(given)"."""
    import re

    code, out, err = _plan(capsys, *BASE, *flags)
    assert code == 1 and out == ""
    assert re.search(message, err) and len(err.strip().splitlines()) == 1, err


def test_a_positive_layer_count_and_rates_are_honoured(capsys):
    code, out, _ = _plan(capsys, *BASE[:-1], "--layers", "2", "--pcie-gbps", "20", "--tflops", "300")
    assert code == 0
    assert ", 2 layers," in out and "300 TFLOP/s, 20 GB/s host<->GPU (given)" in out


def test_the_planner_refuses_them_from_python_too():
    with pytest.raises(PluginError, match=r"num_hidden_layers=0: the number of decoder layers to plan must be an integer >= 1"):
        load_model_shape("llama2-7b", num_hidden_layers=0)
    with pytest.raises(PluginError, match=r"h2d_gbps must be a positive finite rate, got 0"):
        DeviceSpec(h2d_gbps=0)


@pytest.mark.parametrize("name", ["./no/such/config.json", "missing.json", "/no/such/model-folder", "~/no-such-model",
                                  "a/b/c"])
def test_a_missing_local_config_is_refused_without_the_hub(monkeypatch, name):
    import transformers

    def no_hub(*a, **k):
        raise AssertionError("asked the Hub")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    with pytest.raises(PluginError, match=r"no such file or folder\. Give a config\.json"):
        load_model_shape(name)


def test_an_existing_local_config_is_read(tmp_path, monkeypatch):
    tiny_config().save_pretrained(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    assert load_model_shape("./m/config.json").n_layers == load_model_shape("m").n_layers == 2


# ---- a CPU-only run ------------------------------------------------------------------------------------------------
def test_a_gpu_budget_on_a_cpu_run_is_refused_in_one_line(tmp_path):
    """Before: lowmem_gpu_memory="8GiB" on a CPU run chose plugins for a GPU that is not there."""
    from hf_lowmem import LowMemTrainer

    model = tiny_model()
    with pytest.raises(PluginError, match=r"lowmem_gpu_memory='8GiB' is a GPU memory budget, but this run trains on "
                                          r"the CPU \(use_cpu=True\); drop lowmem_gpu_memory, or plan for a GPU machine "
                                          r"with `hf-lowmem plan --model MODEL --gpu_memory 8GiB`") as info:
        LowMemTrainer(model=model, args=train_args(tmp_path, lowmem_gpu_memory="8GiB"), train_dataset=RandomTokens())
    assert "\n" not in str(info.value)


def test_without_a_visible_gpu_the_reason_says_so(tmp_path, monkeypatch):
    import torch

    from hf_lowmem.planner.arguments import refuse_without_gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = train_args(tmp_path, lowmem_gpu_memory="8GiB", use_cpu=False)
    with pytest.raises(PluginError, match=r"trains on the CPU \(no CUDA GPU is visible here\)"):
        refuse_without_gpu(args)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    refuse_without_gpu(args)  # a GPU run: planned
