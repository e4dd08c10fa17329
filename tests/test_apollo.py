"""APOLLO / APOLLO-Mini plugins (normal and layer-wise) against apollo-torch's own optimizer, layer-wise
against normal with accumulation, clipping and DDP, the construction-time learning-rate messages, and the
Adam-mini plugin."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from tests.tiny import RandomTokens, logged_losses, tiny_model, train_args

RANK = 4  # the tiny llama's matrices are 32 x 32, 16 x 32 (k, v) and 32 x 64 / 64 x 32 (MLP): all sides > 4
N_TARGETS = 14  # 2 layers x (q, k, v, o, gate, up, down)


def _run(tmp_path, name, *, options=None, steps=4, ga=1, bs=2, max_grad_norm=0.0, lr=1e-2, snap=True, n=48, **kw):
    from tests.test_galore import _snapshots, _trainer_class

    lowmem_options = kw.pop("lowmem_options", {name: {"rank": RANK, **(options or {})}})
    args = train_args(tmp_path, lowmem_optimizer=name, max_steps=steps, per_device_train_batch_size=bs,
                      gradient_accumulation_steps=ga, max_grad_norm=max_grad_norm, learning_rate=lr,
                      lr_scheduler_type="constant", lowmem_options=lowmem_options, **kw)
    cb = _snapshots() if snap else None
    trainer = _trainer_class()(model=tiny_model(), args=args, train_dataset=RandomTokens(n=n, seq=16),
                               callbacks=[cb] if cb else None)
    if cb:
        cb.model = trainer.model
    trainer.train()
    return trainer, cb


def _inner(trainer):
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


def _updates(snap):
    start = torch.cat([p.detach().flatten() for p in tiny_model().parameters()])
    prev, out = start, []
    for p in snap.params:
        out.append(p - prev)
        prev = p
    return out


def _assert_same_updates(a, b, rtol=1e-5):
    assert len(a) == len(b) and a
    for step, (x, y) in enumerate(zip(a, b)):
        assert x.abs().max() > 1e-5, "the step moved nothing"
        rel = float((x - y).norm() / x.norm())
        assert rel < rtol, f"step {step}: updates differ by {rel:.2e} (relative)"


# ---------------------------------------------------------------------------------------------------
# same updates as apollo-torch's own optimizer
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,scale_type,scale", [("apollo", "channel", 2.0), ("apollo-mini", "tensor", 128.0),
                                                   ("apollo-layerwise", "channel", 2.0),
                                                   ("apollo-mini-layerwise", "tensor", 128.0)])
def test_same_updates_as_apollo_torch(tmp_path, name, scale_type, scale):
    """The plugin (through the Trainer) against apollo-torch's APOLLOAdamW driven by hand on the same batches,
    built the way its README builds it: one group of non-target parameters, one group of targets with
    rank / proj / scale_type / scale / update_proj_gap. apollo-torch seeds each projection with
    ``state["seed"]`` (its constructor: the parameter's position in its groups); the reference gets the
    plugin's rule, ``1 + position in model.parameters()``. A projection refresh happens at step 2."""
    from apollo_torch import APOLLOAdamW
    from hf_lowmem_plugins.galore import GaLoreOptions, select_targets

    steps = 5
    _, snap = _run(tmp_path, name, options={"scale": scale, "update_proj_gap": 2}, steps=steps)

    model = tiny_model()
    targets = {id(m.weight) for _, m in select_targets(model, GaLoreOptions(rank=RANK))}
    params = list(model.parameters())
    assert len(targets) == N_TARGETS
    ref = APOLLOAdamW([{"params": [p for p in params if id(p) not in targets]},
                       {"params": [p for p in params if id(p) in targets], "rank": RANK, "proj": "random",
                        "scale_type": scale_type, "scale": scale, "update_proj_gap": 2, "proj_type": "std"}],
                      lr=1e-2, eps=1e-8, weight_decay=0.0)
    for i, p in enumerate(params):
        ref.state[p]["seed"] = 1 + i
    data = RandomTokens(n=48, seq=16)
    ref_params = []
    for s in range(steps):
        x = torch.stack([data[2 * s + j]["input_ids"] for j in range(2)])
        model(input_ids=x, labels=x).loss.backward()
        ref.step()
        ref.zero_grad()
        ref_params.append(torch.cat([p.detach().flatten().clone() for p in params]))

    class Snap:
        params = ref_params

    _assert_same_updates(_updates(Snap), _updates(snap), rtol=2e-5)


def test_auto_scale_is_n_over_rank_per_matrix(tmp_path):
    trainer, _ = _run(tmp_path, "apollo", steps=1, snap=False)
    opt = _inner(trainer)
    scales = {}
    for g in opt.param_groups:
        if "rank" in g:
            for p in g["params"]:
                scales[tuple(p.shape)] = g["scale"]
    # q/o 32x32 and MLP 64x32 / 32x64: n = 32; k/v 16x32: n = 16
    assert scales == {(32, 32): 32 / RANK, (16, 32): 16 / RANK, (64, 32): 32 / RANK, (32, 64): 32 / RANK}
    assert sum(len(g["params"]) for g in opt.param_groups if "rank" in g) == N_TARGETS
    assert trainer.lowmem_ctx.state["apollo"]["scales"] == [16 / RANK, 32 / RANK]


def test_auto_scale_makes_the_first_update_about_adamws_size():
    """The point of scale="auto": on the first step Adam's update is lr * sign(g) (RMS = lr); APOLLO's with
    scale = n / r has RMS lr * sqrt(r * scale / n) * ||G_i|| / ||R_i||, about lr. The paper's fixed scale 1
    at rank n/4 is half of it."""
    from hf_lowmem_plugins.apollo import ApolloOptions, build_optimizer, matrix_scale

    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(512, 256))
    grad = torch.randn(512, 256, generator=g)
    args = type("A", (), {"learning_rate": 1.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-12,
                          "weight_decay": 0.0})()
    rms = {}
    for scale in ("auto", 1.0):
        opts = ApolloOptions(rank=64, scale=scale)
        w.data.zero_()
        w.grad = grad.clone()
        opt = build_optimizer([{"params": [w], "rank": 64, "proj": "random", "scale_type": "channel",
                                "update_proj_gap": 200, "scale": matrix_scale(w.shape, opts), "proj_type": "std"}],
                              args, opts, {w: 1})
        opt.step()
        rms[scale] = float(w.detach().square().mean().sqrt())
    assert rms["auto"] == pytest.approx(1.0, rel=0.1)
    assert rms[1.0] == pytest.approx(math.sqrt(64 / 256), rel=0.1)


# ---------------------------------------------------------------------------------------------------
# layer-wise = normal, with accumulation and with clipping
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["apollo", "apollo-mini"])
def test_layerwise_with_accumulation_equals_normal(tmp_path, base):
    ref, snap_ref = _run(tmp_path / "ref", base, ga=4, steps=3, options={"update_proj_gap": 2})
    lw, snap_lw = _run(tmp_path / "lw", base + "-layerwise", ga=4, steps=3, options={"update_proj_gap": 2})
    _assert_same_updates(_updates(snap_ref), _updates(snap_lw))
    assert logged_losses(ref) == pytest.approx(logged_losses(lw), rel=1e-6)
    opt = _inner(lw)
    assert {o.state[p]["step"] for p, o in opt.inner.items()} == {3}  # one update per window of 4
    assert all(any(row) for row in snap_lw.grads_mid_window)  # gradients accumulate in .grad inside a window
    assert not any(any(row) for row in snap_lw.grads_before_step)  # and are consumed inside backward


@pytest.mark.parametrize("base", ["apollo", "apollo-mini"])
def test_layerwise_with_clipping_equals_normal(tmp_path, base):
    """max_grad_norm 0.05 clips every step here (the tiny model's norms are ~1.5)."""
    ref, snap_ref = _run(tmp_path / "ref", base, ga=2, steps=3, max_grad_norm=0.05)
    lw, snap_lw = _run(tmp_path / "lw", base + "-layerwise", ga=2, steps=3, max_grad_norm=0.05)
    _assert_same_updates(_updates(snap_ref), _updates(snap_lw))
    norms_ref = [h["grad_norm"] for h in ref.state.log_history if "grad_norm" in h]
    norms_lw = [h["grad_norm"] for h in lw.state.log_history if "grad_norm" in h]
    assert norms_ref == pytest.approx(norms_lw, rel=1e-5) and min(norms_ref) > 0.05  # clipping was active


@pytest.mark.parametrize("name", ["apollo", "apollo-mini-layerwise"])
def test_checkpoint_resume_continues_exactly(tmp_path, name):
    """The optimizer state (apollo-torch's projector objects, the advanced seeds, the limiter's norms) goes
    through the Trainer's weights_only=True checkpoint load; a projection refresh falls after the resume."""
    kw = dict(steps=6, ga=2, max_grad_norm=0.5, options={"update_proj_gap": 4}, save_strategy="steps", save_steps=3,
              snap=False)
    full, _ = _run(tmp_path / "full", name, **kw)
    ckpt = tmp_path / "full" / "checkpoint-3"
    assert (ckpt / "optimizer.pt").exists()
    from tests.test_galore import _trainer_class

    args = train_args(tmp_path / "resumed", lowmem_optimizer=name, max_steps=6, per_device_train_batch_size=2,
                      gradient_accumulation_steps=2, max_grad_norm=0.5, learning_rate=1e-2, lr_scheduler_type="constant",
                      lowmem_options={name: {"rank": RANK, "update_proj_gap": 4}})
    resumed = _trainer_class()(model=tiny_model(), args=args, train_dataset=RandomTokens(n=48, seq=16))
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert logged_losses(resumed)[3:] == pytest.approx(logged_losses(full)[3:], rel=1e-6)
    a = torch.cat([p.detach().flatten() for p in full.model.parameters()])
    b = torch.cat([p.detach().flatten() for p in resumed.model.parameters()])
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_layerwise_under_ddp_equals_one_process(tmp_path):
    """2 gloo processes with micro-batch 2 = 1 process with micro-batch 4 (clipping at 1.0 is on)."""
    from tests.test_accelerate import ddp_matches_single

    name = "apollo-mini-layerwise"
    dist = ddp_matches_single(tmp_path, "ddp.yaml", ["--optimizer", name, "--options", f'{{"{name}": {{"rank": 2}}}}'])
    assert dist["mode"] == "ddp" and dist["plugins"] == [name]


# ---------------------------------------------------------------------------------------------------
# construction-time messages, options, declarations
# ---------------------------------------------------------------------------------------------------

def _construct(tmp_path, name, caplog, **kw):
    from hf_lowmem_plugins import lr_evidence

    from hf_lowmem import LowMemTrainer

    lr_evidence.forget_said()
    args = train_args(tmp_path, lowmem_optimizer=name, **kw)
    with caplog.at_level(logging.INFO, logger="hf_lowmem"):
        caplog.clear()
        LowMemTrainer(model=tiny_model(), args=args, train_dataset=RandomTokens(n=4, seq=8))
        LowMemTrainer(model=tiny_model(), args=args, train_dataset=RandomTokens(n=4, seq=8))  # said once only
    return [r for r in caplog.records if r.name.startswith("hf_lowmem.apollo")]


@pytest.mark.parametrize("name", ["apollo", "apollo-mini"])
def test_lr_message_auto_scale_gives_the_measured_numbers(tmp_path, caplog, name):
    from hf_lowmem_plugins.apollo import EVIDENCE

    recs = _construct(tmp_path, name, caplog, learning_rate=3e-4, max_grad_norm=0.0)
    assert len(recs) == 1
    msg, ev = recs[0].getMessage(), EVIDENCE[name]["auto"]
    assert "sqrt(n / rank)" in msg and "0.0003" in msg
    assert "quality_gpu_pretrain.json" in msg and "quality_gpu_finetune.json" in msg
    for m in ev.regimes:  # both regimes: the gap at your lr, and the best multiplier of what ran there
        assert f"in {m.label} (" in msg and f") {m.gap_pct:+.2f}%" in msg
        if m.best_mult != 1:
            assert f"{m.best_gap_pct:+.2f}% at {m.best_mult:g}x, the best of" in msg
        assert (f"use about {m.best_mult * 3e-4:g}" in msg) == m.fixable
    assert recs[0].levelno == (logging.WARNING if ev.lossy else logging.INFO)
    stuck = [m for m in ev.regimes if m.lossy and not m.fixable and len(m.ran) > 1]
    assert ("came within 2% of AdamW" in msg) == bool(stuck)
    for m in stuck:  # which multipliers of the planned grid were not run, and the closest one that was
        from hf_lowmem_plugins.lr_evidence import PLANNED

        skipped = ", ".join(f"x{k:g}" for k in PLANNED if k not in m.ran)
        assert f"In {m.label} expect that gap" in msg and ((f"({skipped} not run)" in msg) if skipped else
                                                           "not run" not in msg)
        assert (f"the closest was {m.best_mult:g}x ({m.best_mult * 3e-4:g}) at {m.best_gap_pct:+.2f}%" in msg) == \
            (m.best_mult != 1)


def test_adam_mini_lr_message(tmp_path, caplog):
    pytest.importorskip("adam_mini")
    from hf_lowmem import LowMemTrainer
    from hf_lowmem_plugins import adam_mini, lr_evidence

    lr_evidence.forget_said()
    args = train_args(tmp_path, lowmem_optimizer="adam-mini", learning_rate=2e-5)
    with caplog.at_level(logging.INFO, logger="hf_lowmem"):
        for _ in range(2):
            LowMemTrainer(model=tiny_model(), args=args, train_dataset=RandomTokens(n=4, seq=8))
    recs = [r for r in caplog.records if r.name == "hf_lowmem.adam_mini"]
    assert len(recs) == 1  # once
    ev = adam_mini.EVIDENCE
    msg = recs[0].getMessage()
    assert "2e-05" in msg and "eval loss vs AdamW at AdamW's learning rate" in msg
    for m in ev.regimes:
        assert f"in {m.label} (" in msg and f") {m.gap_pct:+.2f}%" in msg
    assert recs[0].levelno == (logging.WARNING if ev.lossy else logging.INFO)


@pytest.mark.parametrize("name,scale,rank,ratios", [("apollo", 1, 256, ("0.67x for n=576", "0.25x for n=4096")),
                                                    ("apollo-mini", 128, 1, ("0.47x for n=576", "0.18x for n=4096"))])
def test_lr_message_fixed_scale_gives_the_factor(tmp_path, caplog, name, scale, rank, ratios):
    recs = _construct(tmp_path, name, caplog, learning_rate=1e-3, max_grad_norm=0.0,
                      lowmem_options={name: {"scale": scale, "rank": RANK if name == "apollo" else 1}})
    assert len(recs) == 1 and recs[0].levelno == logging.WARNING
    msg = recs[0].getMessage()
    assert f"fixed scale={scale}" in msg and "0.001" in msg and "scale=\"auto\"" in msg
    from hf_lowmem_plugins.apollo import ApolloOptions, lr_message

    _, text = lr_message(name, ApolloOptions(rank=rank, scale=scale), 1e-3)
    for r in ratios:  # the factor is computed from the formula, for two widths
        assert r in text
    from hf_lowmem_plugins.apollo import ApolloMiniOptions, EVIDENCE

    # the paper's fixed scale was measured at the default rank: its numbers are given there, and only there
    opts = (ApolloMiniOptions if name == "apollo-mini" else ApolloOptions)(scale=scale)
    _, text = lr_message(name, opts, 1e-3)
    for m in EVIDENCE[name][float(scale)].regimes:
        assert f"in {m.label} (" in text and f") {m.gap_pct:+.2f}%" in text
    assert ("measured" in msg) == (name == "apollo-mini")  # the test's apollo runs at rank 4, not the measured 256


def test_layerwise_clipping_message(tmp_path, caplog):
    # (the learning-rate message is a WARNING of its own where APOLLO is lossy at your lr: not counted here)
    recs = _construct(tmp_path, "apollo-layerwise", caplog, max_grad_norm=1.0)
    warn = [r.getMessage() for r in recs if r.levelno == logging.WARNING and "max_grad_norm" in r.getMessage()]
    assert len(warn) == 1 and "max_grad_norm=1" in warn[0] and "saves no gradient memory" in warn[0]
    assert not [r for r in _construct(tmp_path, "apollo-layerwise", caplog, max_grad_norm=0.0)
                if r.levelno == logging.WARNING and "max_grad_norm" in r.getMessage()]


def test_bad_options(tmp_path):
    from hf_lowmem.errors import PluginError

    for bad, word in [({"scale": "big"}, "scale"), ({"scale": 0}, "scale"), ({"rank": 0}, "rank"),
                      ({"scale_type": "row"}, "scale_type"), ({"target_modules": ["("]}, "regular expression"),
                      ({"ranks": 2}, "norm_growth_limiter")]:
        with pytest.raises(PluginError, match=word):
            train_args(tmp_path, lowmem_optimizer="apollo", lowmem_options={"apollo": bad})


def test_declarations_and_layerwise_refuses_fp16():
    from types import SimpleNamespace

    from hf_lowmem_plugins import apollo

    from hf_lowmem.errors import PluginError
    from hf_lowmem.plugins import load_plugins

    host = load_plugins()
    for name in apollo.VARIANTS:
        info = host.registry[name]
        assert info.modes == ("single", "ddp") and "stream" in info.incompatible and not info.lossless
        assert info.extra == "apollo" and not info.needs_cuda and info.has_memory_model()
    assert host.registry["apollo-mini"].options().rank == 1 and host.registry["apollo-mini"].options().scale_type == "tensor"
    ctx = SimpleNamespace(args=SimpleNamespace(fp16=True, max_grad_norm=0.0, learning_rate=1e-3),
                          options=lambda n: apollo.ApolloOptions())
    with pytest.raises(PluginError, match="bf16"):
        host.registry["apollo-layerwise"].validate(ctx)
    host.registry["apollo"].validate(ctx)  # the normal optimizer steps after the Trainer's scaler unscaled


def test_user_target_modules_reach_the_optimizer(tmp_path):
    trainer, _ = _run(tmp_path, "apollo", options={"target_modules": ["q_proj"]}, steps=1, snap=False)
    low = [p for g in _inner(trainer).param_groups if "rank" in g for p in g["params"]]
    assert {id(p) for p in low} == {id(layer.self_attn.q_proj.weight) for layer in trainer.model.model.layers}


# ---------------------------------------------------------------------------------------------------
# memory models against the state the optimizers really keep
# ---------------------------------------------------------------------------------------------------

def _optimizer_state_bytes(optimizer) -> int:
    """Bytes of every state tensor (dim > 0), apollo-torch's projection matrices inside their projector objects
    included; a layer-wise optimizer's inner optimizers are walked."""
    opt = getattr(optimizer, "optimizer", optimizer)
    inners = list(opt.inner.values()) if hasattr(opt, "inner") else [opt]
    total = 0
    for o in inners:
        for state in o.state.values():
            values = list(state.values()) + [getattr(state.get("projector"), "ortho_matrix", None)]
            total += sum(v.numel() * v.element_size() for v in values if torch.is_tensor(v) and v.dim() > 0)
    return total


@pytest.mark.parametrize("name,options", [("apollo", {"rank": RANK}), ("apollo-mini-layerwise", {}),
                                          ("apollo", {"rank": 16}), ("adam-mini", None)])
def test_memory_model_predicts_the_optimizer_state_exactly(tmp_path, name, options):
    """APOLLO per target m x n: 4 * rank * (2 max(m, n) + min(m, n)) bytes in fp32, AdamW's 8 per other parameter
    (rank 16 leaves the 16 x 32 k/v projections full-rank); Adam-mini: 4 bytes per parameter plus one value per
    row (per head for q and k)."""
    if name == "adam-mini":
        pytest.importorskip("adam_mini")
    from hf_lowmem.planner import PlanInput, TrainSetup, estimate_memory, shape_from_model

    lowmem_options = {name: options} if options is not None else {}
    trainer, _ = _run(tmp_path, name, steps=1, snap=False, lowmem_options=lowmem_options)
    actual = _optimizer_state_bytes(trainer.optimizer)
    plugin = trainer.lowmem_ctx.host.registry[name]
    inp = PlanInput(shape_from_model(tiny_model()), TrainSetup(precision="fp32", device="cpu", max_grad_norm=0.0),
                    {"optimizer": (name,)}, options={name: plugin.parse_options(options)})
    predicted = estimate_memory(inp, trainer.lowmem_ctx.host).gpu["optimizer states"]
    assert predicted == actual > 0
    adamw = 8 * sum(p.numel() for p in trainer.model.parameters())
    assert predicted < adamw


# ---------------------------------------------------------------------------------------------------
# Adam-mini
# ---------------------------------------------------------------------------------------------------

def test_adam_mini_trains_with_the_trainers_decay_and_head_blocks(tmp_path):
    pytest.importorskip("adam_mini")
    trainer, _ = _run(tmp_path, "adam-mini", steps=12, bs=4, n=16, snap=False, lr=1e-2, weight_decay=0.1,
                      lowmem_options={})
    opt = _inner(trainer)
    assert type(opt).__name__ == "Adam_mini" and opt.world_size == 1
    decay = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert decay["model.layers.0.input_layernorm.weight"] == 0.0 and decay["model.layers.0.mlp.up_proj.weight"] == 0.1
    q = opt.state[trainer.model.model.layers[0].self_attn.q_proj.weight]
    assert q["vmean"].numel() == 4  # one second moment per query head
    losses = logged_losses(trainer)
    assert sum(losses[-4:]) < sum(losses[:4]) - 0.2, losses


def test_adam_mini_head_blocks_follow_head_dim(tmp_path):
    """A config whose head_dim is not hidden / heads (here 16 with hidden 32 and 4 heads): Adam-mini's own
    hidden^2 / heads would cut the 64 x 32 query weight into 8 blocks; the plugin gives one per head."""
    pytest.importorskip("adam_mini")
    from hf_lowmem import LowMemTrainer

    args = train_args(tmp_path, lowmem_optimizer="adam-mini", max_steps=1)
    trainer = LowMemTrainer(model=tiny_model(head_dim=16), args=args, train_dataset=RandomTokens(n=4, seq=8))
    trainer.train()
    opt = _inner(trainer)
    assert opt.state[trainer.model.model.layers[0].self_attn.q_proj.weight]["vmean"].numel() == 4
    assert opt.state[trainer.model.model.layers[0].self_attn.k_proj.weight]["vmean"].numel() == 2
