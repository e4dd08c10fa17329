"""Quantization plugins: int8-weights (full-parameter, stochastic rounding) and bnb-nf4 / bnb-int8 (adapters)."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from hf_lowmem import LowMemTrainer, MissingExtraError, PluginError
from tests.tiny import RandomTokens, logged_losses, tiny_model, train_args


class Counting(torch.utils.data.Dataset):
    """Learnable data: each sequence counts up by one from a random start (the next token is predictable)."""

    def __init__(self, n=256, seq=16, vocab=32):
        self.n, self.seq, self.vocab = n, seq, vocab

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        start = (i * 37) % self.vocab
        ids = (start + torch.arange(self.seq)) % self.vocab
        return {"input_ids": ids, "labels": ids.clone()}


def run(tmp_path, model=None, dataset=None, **kw):
    model = model if model is not None else tiny_model()
    trainer = LowMemTrainer(model=model, args=train_args(tmp_path, **kw), train_dataset=dataset or RandomTokens())
    trainer.train()
    return logged_losses(trainer), trainer


# ---- stochastic rounding ------------------------------------------------------------------------------------
def test_stochastic_rounding_is_unbiased():
    from hf_lowmem_plugins.int8_weights import stochastic_round

    g = torch.Generator().manual_seed(0)
    y = torch.empty(2000).uniform_(-5, 5, generator=g)
    y[:10] = 0.3  # round-to-nearest would give 0 here: a bias of -0.3
    n = 4000
    samples = torch.stack([stochastic_round(y, g) for _ in range(n)])
    assert torch.equal(samples, samples.round())  # integers
    assert bool(((samples == y.floor()) | (samples == y.ceil())).all())  # floor or ceil only
    frac = y - y.floor()
    sd = torch.sqrt(frac * (1 - frac) / n).clamp_min(1e-12)
    z = (samples.mean(0) - y) / sd
    # per element, |z| stays within ~4.5 sigma over 2,000 elements; overall mean error is ~0
    assert z.abs().max() < 4.5
    total_z = (samples.mean(0) - y).sum() / torch.sqrt((frac * (1 - frac) / n).sum())
    assert abs(total_z.item()) < 4
    assert samples[:, :10].mean().item() == pytest.approx(0.3, abs=0.02)
    assert torch.round(y[:10]).mean().item() == 0.0  # what deterministic rounding would have done


def test_quantize_round_trip_error_bounded():
    from hf_lowmem_plugins.int8_weights import dequantize, quantize

    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    w[3, 7] = 1.0  # an outlier only hurts its own block
    for block in (0, 128, 64):
        q, scale = quantize(w, block)
        assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
        assert scale.shape == (64, 1 if block == 0 else 256 // block)
        err = (dequantize(q, scale, torch.float32) - w).abs()
        bound = scale.repeat_interleave(256 // scale.shape[1], dim=1) / 2
        assert bool((err <= bound * (1 + 1e-5)).all())
    q64, s64 = quantize(w, 64)
    q0, s0 = quantize(w, 0)
    row = 5  # a row without the outlier: same error; row 3: per-block is much finer
    e64 = (dequantize(q64, s64, torch.float32) - w)[3, 128:].abs().max()
    e0 = (dequantize(q0, s0, torch.float32) - w)[3, 128:].abs().max()
    assert e64 < e0 / 10
    assert row  # (documentation)


# ---- int8-weights --------------------------------------------------------------------------------------------
def test_int8_weights_training_loss_falls_and_memory_is_int8(tmp_path):
    from hf_lowmem_plugins.int8_weights import int8_modules

    losses, trainer = run(tmp_path, dataset=Counting(), max_steps=30, learning_rate=1e-2,
                          per_device_train_batch_size=8, lowmem_quantization="int8-weights", lowmem_options={"int8-weights": {"block_size": 16}})
    assert losses[-1] < 0.6 * losses[0], losses
    mods = int8_modules(trainer.model)
    assert len(mods) == 2 * 7  # q, k, v, o, gate, up, down per layer; not the LM head
    for _, m in mods:
        assert m.weight_int8.dtype == torch.int8
        assert m.weight.untyped_storage().nbytes() <= m.weight.element_size()  # no full-precision copy kept
        assert m.weight.dtype == torch.float32 and m.weight.shape == (m.out_features, m.in_features)
        assert m.weight_scale.shape == (m.out_features, m.in_features // 16)
    assert type(trainer.model.lm_head) is torch.nn.Linear
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    state = opt.state[mods[0][1].weight]
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg"].shape == mods[0][1].weight.shape


def test_int8_weights_close_to_plain_with_accumulation_and_clipping(tmp_path):
    ref, _ = run(tmp_path / "ref", dataset=Counting(), max_steps=8, learning_rate=1e-2, gradient_accumulation_steps=2,
                 max_grad_norm=0.5)
    got, _ = run(tmp_path, dataset=Counting(), max_steps=8, learning_rate=1e-2, gradient_accumulation_steps=2,
                 max_grad_norm=0.5, lowmem_quantization="int8-weights")
    assert got[0] == pytest.approx(ref[0], abs=0.02)  # int8 rounding of the initial weights only
    assert max(abs(a - b) for a, b in zip(got, ref)) < 0.1
    assert got[-1] < got[0]


def test_int8_weights_compose_with_another_optimizer(tmp_path):
    losses, _ = run(tmp_path, dataset=Counting(), max_steps=20, learning_rate=1e-2, optim="adafactor",
                    per_device_train_batch_size=8,
                    lowmem_quantization="int8-weights")
    assert losses[-1] < 0.8 * losses[0], losses


def test_int8_weights_save_is_a_standard_checkpoint(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _, trainer = run(tmp_path, dataset=Counting(), max_steps=6, learning_rate=1e-2, lowmem_quantization="int8-weights")
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    sd = load_file(str(out / "model.safetensors"))
    assert not [k for k in sd if "int8" in k or "scale" in k]
    assert sd["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    ids = torch.randint(0, 128, (2, 16))
    trainer.model.eval()
    with torch.no_grad():
        a = trainer.model(input_ids=ids).logits
        b = loaded(input_ids=ids).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # and a converted model accepts the standard state dict back (re-quantized: same int8 values)
    from hf_lowmem_plugins.int8_weights import convert_model, int8_modules

    again = tiny_model()
    convert_model(again)
    missing, unexpected = again.load_state_dict(loaded.state_dict(), strict=True)
    assert not missing and not unexpected
    for (n1, m1), (n2, m2) in zip(int8_modules(trainer.model), int8_modules(again)):
        assert torch.equal(m1.weight_int8, m2.weight_int8), n1


def test_int8_weights_refuses_model_without_trainable_linear(tmp_path):
    model = tiny_model()
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(PluginError, match="no trainable nn.Linear"):
        LowMemTrainer(model=model, args=train_args(tmp_path, lowmem_quantization="int8-weights"),
                      train_dataset=RandomTokens())


@pytest.mark.gpu
def test_int8_weights_on_gpu_bf16(tmp_path):
    model = tiny_model(hidden_size=256, intermediate_size=512, num_attention_heads=4).to(torch.bfloat16)
    losses, trainer = run(tmp_path, model=model, dataset=Counting(), use_cpu=False, max_steps=30, learning_rate=1e-2,
                          lowmem_quantization="int8-weights")
    assert losses[-1] < 0.7 * losses[0], losses
    from hf_lowmem_plugins.int8_weights import int8_modules

    _, m = int8_modules(trainer.model)[0]
    assert m.weight_int8.is_cuda and m.weight.dtype == torch.bfloat16


# ---- bnb-nf4 / bnb-int8 ----------------------------------------------------------------------------------------
class LoRA(torch.nn.Module):
    """A minimal adapter (no peft needed): frozen base Linear + trainable low-rank update."""

    def __init__(self, base, r=4):
        super().__init__()
        self.base = base
        g = torch.Generator().manual_seed(base.in_features * 7 + base.out_features)
        self.A = torch.nn.Parameter(torch.randn(r, base.in_features, generator=g) * 0.1)
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x):
        return self.base(x) + (x @ self.A.t()) @ self.B.t()


def adapter_model(train_head=True):
    """Frozen base with adapters on attention and MLP, and (a common setup) a trainable LM head."""
    model = tiny_model()
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(train_head)
    for layer in model.model.layers:
        for proj in ("q_proj", "v_proj"):
            setattr(layer.self_attn, proj, LoRA(getattr(layer.self_attn, proj)))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            setattr(layer.mlp, proj, LoRA(getattr(layer.mlp, proj)))
    return model


@pytest.mark.parametrize("name,cls", [("bnb-nf4", "Linear4bit"), ("bnb-int8", "Linear8bitLt")])
def test_bnb_adapters_train_on_quantized_base(tmp_path, name, cls):
    pytest.importorskip("bitsandbytes")
    model = adapter_model()
    a_before = model.model.layers[0].self_attn.q_proj.A.detach().clone()
    losses, trainer = run(tmp_path, model=model, dataset=Counting(), max_steps=30, learning_rate=2e-2,
                          per_device_train_batch_size=8, lowmem_quantization=name)
    assert losses[-1] < 0.2 * losses[0], losses
    layer = trainer.model.model.layers[0]
    assert type(layer.self_attn.q_proj.base).__name__ == cls
    assert type(layer.self_attn.k_proj).__name__ == cls
    assert type(trainer.model.lm_head) is torch.nn.Linear and trainer.model.lm_head.weight.requires_grad
    assert not torch.equal(layer.self_attn.q_proj.A.detach(), a_before)  # the adapters trained
    assert len(trainer.lowmem_ctx.state[name]["modules"]) == 14


def test_bnb_save_writes_dequantized_standard_weights(tmp_path):
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    model = adapter_model()
    original = model.model.layers[1].mlp.up_proj.base.weight.detach().clone()
    _, trainer = run(tmp_path, model=model, max_steps=2, lowmem_quantization="bnb-int8")
    trainer.save_model(str(tmp_path / "saved"))
    sd = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert not [k for k in sd if k.endswith(("SCB", "weight_format", "absmax", "quant_map"))]
    w = sd["model.layers.1.mlp.up_proj.base.weight"]
    assert w.dtype == torch.float32 and w.shape == original.shape
    assert (w - original).abs().max() < 0.02 * original.abs().max()  # int8 rounding only


@pytest.mark.parametrize("name", ["bnb-nf4", "bnb-int8"])
def test_bnb_refuses_full_parameter_training(tmp_path, name):
    pytest.importorskip("bitsandbytes")
    with pytest.raises(PluginError, match="every parameter of this model is trainable.*int8-weights"):
        LowMemTrainer(model=tiny_model(), args=train_args(tmp_path, lowmem_quantization=name),
                      train_dataset=RandomTokens())


def test_bnb_missing_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(MissingExtraError, match=r"hf-lowmem\[bnb\]"):
        LowMemTrainer(model=adapter_model(), args=train_args(tmp_path, lowmem_quantization="bnb-nf4"),
                      train_dataset=RandomTokens())


def test_bnb_with_peft(tmp_path):
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    model = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    losses, trainer = run(tmp_path, model=model, dataset=Counting(), max_steps=20, learning_rate=2e-2,
                          lowmem_quantization="bnb-nf4")
    assert losses[-1] < losses[0]
    assert math.isfinite(losses[-1])


def test_bnb_int8_statistics_follow_the_weight_to_its_device():
    """A parent's .to()/.cuda() replaces only weight.data of a Linear8bitLt (Module._apply), so bitsandbytes'
    CB/SCB stay on the old device (on CUDA: "ValueError: Expected a cuda device, but got: cpu" in the first
    forward). Each converted layer has a pre-hook that moves them beside the weight. There is one device here,
    so the stale state is built by hand: a fake "moved" weight and statistics marked as elsewhere."""
    pytest.importorskip("bitsandbytes")
    from types import SimpleNamespace

    from hf_lowmem_plugins.bnb_quant import Bnb8bitOptions, _int8_state_follows_weight, _quantized_linear

    lin = torch.nn.Linear(64, 32).requires_grad_(False)
    q = _quantized_linear("bnb-int8", lin, Bnb8bitOptions(), torch.float32)
    assert _int8_state_follows_weight in q._forward_pre_hooks.values()
    x = torch.randn(3, 64)
    torch.testing.assert_close(q(x), lin(x), atol=0.05, rtol=0.05)  # the hook is harmless where all agree

    class Elsewhere:  # a tensor on another device: only .device, .dtype, .shape and .to(device) are used
        def __init__(self, t, device):
            self.t, self.device, self.dtype, self.shape = t, torch.device(device), t.dtype, t.shape

        def to(self, device):
            return self.t.to(device)

    data = torch.randint(-127, 128, (32, 64), dtype=torch.int8)  # the weight's data after the move
    scb = torch.rand(32) + 1
    weight = SimpleNamespace(data=data, CB=Elsewhere(data.clone(), "meta"), SCB=Elsewhere(scb, "meta"))
    state = SimpleNamespace(CB=Elsewhere(data.clone(), "meta"), SCB=Elsewhere(scb, "meta"))
    _int8_state_follows_weight(SimpleNamespace(weight=weight, state=state))
    for holder in (weight, state):
        assert holder.CB is data  # CB is the int8 matrix itself: the moved data
        assert isinstance(holder.SCB, torch.Tensor) and torch.equal(holder.SCB, scb)
    untouched = SimpleNamespace(data=data, CB=None, SCB=scb)
    _int8_state_follows_weight(SimpleNamespace(weight=untouched, state=SimpleNamespace(CB=None, SCB=None)))
    assert untouched.CB is None and untouched.SCB is scb


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["bnb-nf4", "bnb-int8"])
def test_bnb_on_gpu(tmp_path, name):
    pytest.importorskip("bitsandbytes")
    model = adapter_model().to(torch.bfloat16)
    losses, trainer = run(tmp_path, model=model, dataset=Counting(), use_cpu=False, max_steps=30, learning_rate=2e-2,
                          lowmem_quantization=name)
    assert losses[-1] < 0.2 * losses[0], losses
    base = trainer.model.model.layers[0].mlp.up_proj.base
    assert base.weight.is_cuda and base.weight.element_size() == 1  # packed uint8 / int8 on the GPU
