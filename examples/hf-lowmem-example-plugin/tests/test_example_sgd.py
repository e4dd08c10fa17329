"""Tests of ``example-sgd``, made with ``hf_lowmem.testing`` (CPU, seconds). Run them with the plugin
installed (``pip install -e examples/hf-lowmem-example-plugin``) or from its folder
(``PYTHONPATH=examples/hf-lowmem-example-plugin pytest examples/hf-lowmem-example-plugin/tests``)."""

import pytest
import torch

from hf_lowmem.errors import PluginError

from hf_lowmem.planner import PlanInput, estimate_memory, load_model_shape, setup_from_args
from hf_lowmem.testing import assert_same_losses, host_with, make_context, state_bytes, tiny_model, train
from hf_lowmem_example import ExampleSGD


def test_it_trains_like_plain_sgd(tmp_path):
    host = host_with(ExampleSGD())
    mine = train(tmp_path / "mine", host=host, lowmem_optimizer="example-sgd",
                 lowmem_options={"example-sgd": {"momentum": 0.8}})
    assert type(mine.optimizer.optimizer) is torch.optim.SGD
    assert mine.lowmem_ctx.state["example-sgd"] == {"steps": 4, "momentum": 0.8}  # its callback ran
    model = tiny_model()
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.8)
    assert_same_losses(mine, train(tmp_path / "plain", model=model, optimizers=(sgd, None)))


def test_its_memory_model_predicts_the_optimizer_state_it_keeps(tmp_path):
    host = host_with(ExampleSGD())
    for momentum in (0.9, 0.0):
        trainer = train(tmp_path / str(momentum), host=host, lowmem_optimizer="example-sgd",
                        lowmem_options={"example-sgd": {"momentum": momentum}})
        ctx = trainer.lowmem_ctx
        plan = PlanInput(load_model_shape(trainer.model), setup_from_args(ctx.args, 16, trainer.model),
                         {"optimizer": ("example-sgd",)}, dict(ctx.selection.options))
        predicted = estimate_memory(plan, host).gpu.get("optimizer states", 0)
        assert predicted == state_bytes(trainer.optimizer) == (4 * trainer.model.num_parameters() if momentum else 0)


def test_its_options_are_checked():
    host = host_with(ExampleSGD())
    ctx = make_context(host, lowmem_optimizer="example-sgd", lowmem_options={"example-sgd": {"nesterov": True}})
    assert ctx.options("example-sgd") == ExampleSGD.options(momentum=0.9, nesterov=True)
    with pytest.raises(PluginError, match="nesterov needs a momentum above 0"):
        make_context(host, lowmem_optimizer="example-sgd", lowmem_options={"example-sgd": {"momentum": 0, "nesterov": True}})
