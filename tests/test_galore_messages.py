"""GaLore's messages: a non-finite gradient names the parameter and the step (layer-wise too), and the 8-bit
variant without bitsandbytes names the extras that install both of its packages."""

from __future__ import annotations

import sys

import pytest
import torch

from hf_lowmem import LowMemTrainer
from hf_lowmem.errors import MissingExtraError, PluginError
from tests.tiny import RandomTokens, tiny_model, train_args


@pytest.mark.parametrize("plugin", ["galore-adamw", "galore-adamw-layerwise"])
@pytest.mark.parametrize("method", ["randomized", "svd"])
def test_a_nan_weight_is_named_with_the_step(tmp_path, plugin, method):
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    trainer = LowMemTrainer(model=model, train_dataset=RandomTokens(), args=train_args(
        tmp_path, max_steps=2, lowmem_optimizer=plugin,
        lowmem_options={plugin: {"rank": 4, "init_proj_method": method, "proj_method": method}}))
    with pytest.raises(PluginError, match=r"GaLore: the gradient of model\.layers\.\d\.\w+\.\w+\.weight is not finite "
                                          r"\(NaN or inf\) at optimizer step 1, .*lower the learning rate") as info:
        trainer.train()  # before: torch.linalg's _LinAlgError (eigh or svd), naming no parameter
    assert "\n" not in str(info.value)


def test_galore_8bit_without_bitsandbytes_names_both_extras(monkeypatch):
    """galore_torch imports bitsandbytes itself: a missing bitsandbytes used to be reported as a missing
    galore_torch, with `hf-lowmem[galore]`, which does not bring bitsandbytes back."""
    from hf_lowmem.plugins import get_plugin_host

    for mod in [m for m in sys.modules if m == "galore_torch" or m.startswith(("galore_torch.", "bitsandbytes"))]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # "not installed"
    plugin = get_plugin_host().registry["galore-adamw8bit"]
    with pytest.raises(MissingExtraError, match=r"plugin 'galore-adamw8bit' needs the package 'bitsandbytes'.*"
                                                r"pip install 'hf-lowmem\[galore,bnb\]'"):
        plugin.import_requirements()
