"""The bitsandbytes and Adafactor optimizer plugins: they train, build the right optimizer, validate
options, and name the extra to install when their package is missing."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.tiny import RandomTokens, logged_losses, tiny_model, train_args

BNB = ["bnb-adamw8bit", "bnb-paged-adamw8bit", "bnb-paged-adamw32bit", "bnb-lamb8bit", "bnb-lion8bit"]
CLASSES = {"bnb-adamw8bit": "AdamW8bit", "bnb-paged-adamw8bit": "PagedAdamW8bit",
           "bnb-paged-adamw32bit": "PagedAdamW32bit", "bnb-lamb8bit": "LAMB8bit", "bnb-lion8bit": "Lion8bit"}


def _train(tmp_path, name, options=None, steps=12, **kw):
    from hf_lowmem import LowMemTrainer

    args = train_args(tmp_path, lowmem_optimizer=name, max_steps=steps, learning_rate=1e-2,
                      per_device_train_batch_size=4, lowmem_options={name: options} if options else None, **kw)
    trainer = LowMemTrainer(model=tiny_model(), args=args, train_dataset=RandomTokens(n=16, seq=16))
    trainer.train()
    return trainer


def _inner(trainer):
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it


def _falls(losses):
    # 16 examples, 4 per step: steps 1-4 are the first epoch, 9-12 the third
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.2, f"loss did not fall: first epoch {first:.3f}, third epoch {last:.3f} ({losses})"


@pytest.mark.parametrize("name", BNB)
def test_bnb_trains_on_cpu_with_the_right_class(tmp_path, name):
    import bitsandbytes as bnb

    trainer = _train(tmp_path, name, {"min_8bit_size": 256})
    opt = _inner(trainer)
    assert type(opt) is getattr(bnb.optim, CLASSES[name])
    _falls(logged_losses(trainer))
    # the Trainer's weight-decay groups and learning rate reached the optimizer
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, trainer.args.weight_decay]
    model = trainer.model
    emb = model.get_input_embeddings().weight
    mlp = model.model.layers[0].mlp.down_proj.weight  # 32 x 64 = 2048 elements >= min_8bit_size
    if name == "bnb-paged-adamw32bit":
        assert opt.state[mlp]["state1"].dtype == torch.float32
    else:
        assert opt.state[mlp]["state1"].dtype == torch.uint8, "8-bit state expected above min_8bit_size"
        # embeddings keep 32-bit state (embeddings_32bit, default on)
        assert opt.state[emb]["state1"].dtype == torch.float32


def test_bnb_embedding_override_is_per_optimizer_and_optional(tmp_path):
    import bitsandbytes as bnb

    trainer = _train(tmp_path, "bnb-adamw8bit", {"min_8bit_size": 256, "embeddings_32bit": False}, steps=2)
    opt = _inner(trainer)
    emb = trainer.model.get_input_embeddings().weight
    assert opt.state[emb]["state1"].dtype == torch.uint8
    # nothing leaked into bitsandbytes' process-wide manager
    assert id(emb) not in bnb.optim.GlobalOptimManager.get_instance().pid2config
    assert opt.mng is not bnb.optim.GlobalOptimManager.get_instance()


def test_bnb_min_8bit_size_keeps_small_tensors_32bit(tmp_path):
    trainer = _train(tmp_path, "bnb-adamw8bit", {"min_8bit_size": 10**6}, steps=1)
    opt = _inner(trainer)
    assert all(s["state1"].dtype == torch.float32 for s in opt.state.values())


def test_lion_betas_option(tmp_path):
    trainer = _train(tmp_path, "bnb-lion8bit", {"betas": [0.95, 0.98]}, steps=1)
    g = _inner(trainer).param_groups[0]
    assert tuple(g["betas"]) == (0.95, 0.98)


def test_adafactor_trains_with_finetuning_defaults(tmp_path):
    from transformers.optimization import Adafactor

    trainer = _train(tmp_path, "adafactor")
    opt = _inner(trainer)
    assert type(opt) is Adafactor
    g = opt.param_groups[0]
    assert (g["relative_step"], g["scale_parameter"], g["warmup_init"]) == (False, False, False)
    assert g["beta1"] is None
    # factored second moment for matrices, no first moment
    st = opt.state[trainer.model.model.layers[0].mlp.down_proj.weight]
    assert "exp_avg_sq_row" in st and "exp_avg" not in st
    _falls(logged_losses(trainer))


def test_adafactor_relative_step_uses_its_own_schedule(tmp_path):
    from transformers.optimization import AdafactorSchedule

    trainer = _train(tmp_path, "adafactor", {"relative_step": True, "scale_parameter": True}, steps=3)
    assert isinstance(trainer.lr_scheduler, AdafactorSchedule)
    assert _inner(trainer).param_groups[0]["relative_step"] is True
    # the logged learning rate is Adafactor's own step size (AdafactorSchedule reports 0 before the first update,
    # then rms(p) * min(1e-2, 1/sqrt(step))), not the Trainer's linear schedule, which would start at 1e-2
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "loss" in h]
    assert len(lrs) == 3 and lrs[0] == 0.0 and 0 < lrs[-1] < 1e-2, lrs


@pytest.mark.parametrize("name,bad", [("bnb-adamw8bit", {"percentile_clipping": 5}),
                                      ("bnb-lamb8bit", {"max_unorm": 0.5}),
                                      ("adafactor", {"lr": 1.0})])
def test_unknown_option_lists_the_valid_ones(tmp_path, name, bad):
    from hf_lowmem.errors import PluginError

    with pytest.raises(PluginError) as e:
        train_args(tmp_path, lowmem_optimizer=name, lowmem_options={name: bad})
    msg = str(e.value)
    assert repr(next(iter(bad))) in msg and "its options are" in msg
    assert ("min_8bit_size" in msg) if name.startswith("bnb") else ("relative_step" in msg)


@pytest.mark.parametrize("name,bad,word", [("bnb-adamw8bit", {"min_8bit_size": -1}, "min_8bit_size"),
                                           ("bnb-adamw8bit", {"betas": [0.9]}, "betas"),
                                           ("adafactor", {"warmup_init": True}, "relative_step")])
def test_bad_option_value_is_a_plugin_error(tmp_path, name, bad, word):
    from hf_lowmem.errors import PluginError

    with pytest.raises(PluginError, match=word):
        train_args(tmp_path, lowmem_optimizer=name, lowmem_options={name: bad})


def test_missing_bitsandbytes_names_the_extra(tmp_path, monkeypatch):
    from hf_lowmem import LowMemTrainer
    from hf_lowmem.errors import MissingExtraError

    args = train_args(tmp_path, lowmem_optimizer="bnb-adamw8bit")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(MissingExtraError) as e:
        LowMemTrainer(model=tiny_model(), args=args, train_dataset=RandomTokens(n=4, seq=8))
    assert "hf-lowmem[bnb]" in str(e.value) and "bnb-adamw8bit" in str(e.value)


def test_missing_bitsandbytes_at_optimizer_creation_names_the_extra(tmp_path, monkeypatch):
    """Optimizer creation checks too (a host that skipped validation still gets the install hint)."""
    from hf_lowmem.errors import MissingExtraError
    from hf_lowmem.testing import make_context

    ctx = make_context(lowmem_optimizer="bnb-lion8bit")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(MissingExtraError, match=r"hf-lowmem\[bnb\]"):
        ctx.plugin("optimizer").create_optimizer(ctx, tiny_model(), trainer=None)


def test_registry_declares_the_plugins():
    from hf_lowmem.plugins import get_plugin_host

    reg = get_plugin_host().registry
    for name in BNB:
        info = reg[name]
        assert (info.kind, info.extra, info.requires, info.lossless, info.needs_cuda) == (
            "optimizer", "bnb", ("bitsandbytes",), False, False)
    assert reg["adafactor"].kind == "optimizer" and not reg["adafactor"].lossless


def test_lamb8bit_runs_under_the_adam_kernel_name_with_the_same_arithmetic(monkeypatch):
    """bitsandbytes 0.50 has no CUDA block-wise "lamb" kernel (LAMB8bit.step raises "ValueError: Unsupported
    optimizer name: lamb" on the GPU); its CPU kernels run "lamb" as the Adam update. The plugin names the
    kernel "adam" where the CUDA table lacks "lamb": bit-identical to bitsandbytes' own LAMB8bit on the CPU."""
    import bitsandbytes as bnb

    from hf_lowmem_plugins import bnb_optim

    torch.manual_seed(0)
    params = [torch.randn(64, 64), torch.randn(64)]  # 8-bit state, and a small tensor with 32-bit state
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    ours, theirs = [p.clone() for p in params], [p.clone() for p in params]
    opt_ours = bnb.optim.LAMB8bit(ours, lr=1e-2, weight_decay=0.1, min_8bit_size=256)
    opt_theirs = bnb.optim.LAMB8bit(theirs, lr=1e-2, weight_decay=0.1, min_8bit_size=256)
    monkeypatch.setattr(bnb_optim, "_cuda_blockwise_kernels", lambda: {"adam", "lion"})  # the 0.50 CUDA table
    bnb_optim._lamb_on_available_kernels(opt_ours)
    assert opt_ours.optimizer_name == "adam" and opt_theirs.optimizer_name == "lamb"
    for gs in grads:
        for o, t, g in zip(ours, theirs, gs):
            o.grad, t.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    assert opt_ours.state[ours[0]]["state1"].dtype == torch.uint8
    assert opt_ours.state[ours[1]]["state1"].dtype == torch.float32
    for o, t in zip(ours, theirs):
        assert torch.equal(o, t)
    # a bitsandbytes whose CUDA backend has a "lamb" kernel keeps it; no CUDA backend: the CPU takes either name
    again = bnb.optim.LAMB8bit([torch.randn(8, requires_grad=True)])
    monkeypatch.setattr(bnb_optim, "_cuda_blockwise_kernels", lambda: {"adam", "lamb"})
    bnb_optim._lamb_on_available_kernels(again)
    assert again.optimizer_name == "lamb"
    monkeypatch.setattr(bnb_optim, "_cuda_blockwise_kernels", lambda: None)
    bnb_optim._lamb_on_available_kernels(again)
    assert again.optimizer_name == "adam"


@pytest.mark.gpu
@pytest.mark.parametrize("name", BNB)
def test_bnb_trains_on_gpu(tmp_path, name):
    from hf_lowmem import LowMemTrainer

    args = train_args(tmp_path, lowmem_optimizer=name, max_steps=12, learning_rate=1e-2, per_device_train_batch_size=4,
                      use_cpu=False, lowmem_options={name: {"min_8bit_size": 256}})
    trainer = LowMemTrainer(model=tiny_model(), args=args, train_dataset=RandomTokens(n=16, seq=16))
    trainer.train()
    opt = _inner(trainer)
    p = trainer.model.model.layers[0].mlp.down_proj.weight
    assert p.is_cuda and opt.state[p]["state1"].is_cuda
    _falls(logged_losses(trainer))
