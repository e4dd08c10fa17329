"""GaLore plugins: training, target selection, our projector against galore-torch's, staggered refreshes,
and the layer-wise variants with gradient accumulation, clipping, checkpoints and DDP."""

from __future__ import annotations

import json
import math
import os
import socket
import sys

import pytest
import torch

from tests.tiny import RandomTokens, logged_losses, tiny_model, train_args

# refreshes every other step, so they happen in short runs; no oversampling, so that the randomized finder
# (used when rank + oversample <= half the smaller side) runs on the tiny model's 16 x 32 matrices too
SMALL = {"rank": 8, "update_proj_gap": 2, "scale": 1.0, "oversample": 0}
N_TARGETS = 14  # tiny llama: 2 layers x (q, k, v, o, gate, up, down)


def _trainer_class():
    from transformers import TrainerCallback  # noqa: F401

    from hf_lowmem import LowMemTrainer

    class SequentialTrainer(LowMemTrainer):
        """Examples in order, so that a DDP run and a single-process run see the same windows."""

        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    return SequentialTrainer


def _snapshots():
    from transformers import TrainerCallback

    class Snap(TrainerCallback):
        """The parameters after every optimizer step, and what .grad held just before each step."""

        def __init__(self):
            self.params, self.grads_before_step, self.grads_mid_window = [], [], []
            self.model = None

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self.grads_before_step.append([p.grad is not None for p in self.model.parameters()])

        def on_substep_end(self, args, state, control, **kw):
            self.grads_mid_window.append([p.grad is not None for p in self.model.parameters()])

        def on_step_end(self, args, state, control, **kw):
            self.params.append(torch.cat([p.detach().flatten().clone() for p in self.model.parameters()]))

    return Snap()


def _run(tmp_path, name, *, options=None, steps=6, ga=1, bs=2, max_grad_norm=0.0, n=48, snap=False, **kw):
    opts = dict(SMALL, **(options or {}))
    args = train_args(tmp_path, lowmem_optimizer=name, max_steps=steps, per_device_train_batch_size=bs,
                      gradient_accumulation_steps=ga, max_grad_norm=max_grad_norm, learning_rate=1e-2,
                      lowmem_options={name: opts}, **kw)
    model = tiny_model()
    cb = _snapshots() if snap else None
    trainer = _trainer_class()(model=model, args=args, train_dataset=RandomTokens(n=n, seq=16),
                               callbacks=[cb] if cb else None)
    if cb:
        cb.model = trainer.model
    trainer.train()
    return trainer, cb


def _inner(trainer):
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


def _close(a, b, rtol=1e-4, atol=1e-6):
    return torch.allclose(a, b, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------------
# training, classes, targets
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,cls", [("galore-adamw", "GaLoreAdamW"), ("galore-adafactor", "GaLoreAdafactor"),
                                      ("galore-adamw-layerwise", "GaLoreAdamW"),
                                      ("galore-adafactor-layerwise", "GaLoreAdafactor")])
def test_galore_trains_and_builds_the_right_optimizer(tmp_path, name, cls):
    import galore_torch

    from hf_lowmem_plugins.galore import _LayerwiseImpl, projectors_of

    trainer, _ = _run(tmp_path, name, options={"update_proj_gap": 4}, steps=12, bs=4, n=16, max_grad_norm=1.0)
    opt = _inner(trainer)
    want = getattr(galore_torch, cls)
    if name.endswith("-layerwise"):
        assert isinstance(opt, _LayerwiseImpl) and isinstance(opt, torch.optim.Optimizer)
        assert {type(o) for o in opt.inner.values()} == {want}
        assert len(opt.inner) == sum(1 for p in trainer.model.parameters() if p.requires_grad)
    else:
        assert type(opt) is want
        assert any("rank" in g for g in opt.param_groups)
    prs = projectors_of(opt)
    assert len(prs) == N_TARGETS and all(p.t == 12 for p in prs)
    losses = logged_losses(trainer)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.2, losses


def test_auto_targets_are_attention_and_mlp_linears(tmp_path):
    from hf_lowmem_plugins.galore import GaLoreOptions, select_targets

    model = tiny_model()
    names = [n for n, _ in select_targets(model, GaLoreOptions(rank=8))]
    assert len(names) == N_TARGETS
    assert all(".layers." in n and ("self_attn" in n or "mlp" in n) for n in names)
    assert not any("embed" in n or "lm_head" in n for n in names)
    # k_proj / v_proj are 16 x 32 here (2 kv heads of 8): rank 16 leaves them full-rank
    names16 = [n for n, _ in select_targets(model, GaLoreOptions(rank=16))]
    assert len(names16) == N_TARGETS - 4 and not any("k_proj" in n or "v_proj" in n for n in names16)


def test_user_target_modules(tmp_path):
    from hf_lowmem.errors import PluginError
    from hf_lowmem_plugins.galore import GaLoreOptions, select_targets

    model = tiny_model()
    names = [n for n, _ in select_targets(model, GaLoreOptions(rank=8, target_modules=[r"mlp\.(up|down)_proj"]))]
    assert names == ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
                     "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(PluginError, match="match no trainable nn.Linear.*q_proj"):
        select_targets(model, GaLoreOptions(target_modules=["nothing_like_this"]))
    with pytest.raises(PluginError, match="target_modules"):
        select_targets(model, GaLoreOptions(rank=64))  # every side <= 64: nothing to project


def test_targets_reach_the_optimizer(tmp_path):
    trainer, _ = _run(tmp_path, "galore-adamw", options={"target_modules": ["q_proj"]}, steps=1)
    opt = _inner(trainer)
    galore_params = [p for g in opt.param_groups if "rank" in g for p in g["params"]]
    assert len(galore_params) == 2
    assert {id(p) for p in galore_params} == {id(layer.self_attn.q_proj.weight) for layer in trainer.model.model.layers}


# ---------------------------------------------------------------------------------------------------
# options, errors, declarations
# ---------------------------------------------------------------------------------------------------

def test_unknown_and_bad_options(tmp_path):
    from hf_lowmem.errors import PluginError

    with pytest.raises(PluginError) as e:
        train_args(tmp_path, lowmem_optimizer="galore-adamw", lowmem_options={"galore-adamw": {"ranks": 4}})
    msg = str(e.value)
    for opt in ("'ranks'", "rank", "update_proj_gap", "scale", "proj_type", "target_modules", "stagger", "proj_method"):
        assert opt in msg
    for bad, word in [({"proj_type": "diagonal"}, "proj_type"), ({"rank": 0}, "rank"),
                      ({"proj_method": "qr"}, "proj_method"), ({"target_modules": ["("]}, "regular expression")]:
        with pytest.raises(PluginError, match=word):
            train_args(tmp_path, lowmem_optimizer="galore-adamw-layerwise",
                       lowmem_options={"galore-adamw-layerwise": bad})


def test_missing_galore_torch_names_the_extra(tmp_path, monkeypatch):
    from hf_lowmem import LowMemTrainer
    from hf_lowmem.errors import MissingExtraError

    args = train_args(tmp_path, lowmem_optimizer="galore-adamw-layerwise")
    monkeypatch.setitem(sys.modules, "galore_torch", None)
    with pytest.raises(MissingExtraError) as e:
        LowMemTrainer(model=tiny_model(), args=args, train_dataset=RandomTokens(n=4, seq=8))
    assert "hf-lowmem[galore]" in str(e.value) and "galore_torch" in str(e.value)


def test_declared_incompatibilities_and_modes():
    import types

    from hf_lowmem.context import resolve_selection
    from hf_lowmem.errors import PluginError
    from hf_lowmem.plugins import load_plugins
    from hf_lowmem.registry import Plugin
    from hf_lowmem_plugins import core, galore

    fake_stream = types.SimpleNamespace(hf_lowmem_register=lambda register: register(
        Plugin(name="stream", kind="offload", engine=True)))
    host = load_plugins(entry_points=False, extra_plugins=[("core", core), ("galore", galore), ("stream_stub", fake_stream)])
    for name in galore.VARIANTS:
        with pytest.raises(PluginError, match="cannot be combined.*own optimizer"):
            resolve_selection(host, {"optimizer": [name], "offload": ["stream"]}, {}, "single")
        for mode in ("fsdp", "deepspeed"):
            with pytest.raises(PluginError, match=f"does not support {mode}"):
                resolve_selection(host, {"optimizer": [name]}, {}, mode)
        resolve_selection(host, {"optimizer": [name]}, {}, "ddp")  # fine
        info = host.registry[name]
        assert info.extra == ("galore,bnb" if "8bit" in name else "galore") and not info.lossless
        assert info.needs_cuda == ("8bit" in name)


def test_layerwise_refuses_fp16():
    from types import SimpleNamespace

    from hf_lowmem.errors import PluginError
    from hf_lowmem.plugins import get_plugin_host

    from hf_lowmem_plugins.galore import GaLoreOptions

    ctx = SimpleNamespace(args=SimpleNamespace(fp16=True, learning_rate=1e-3), options=lambda name: GaLoreOptions())
    with pytest.raises(PluginError, match="bf16"):
        get_plugin_host().registry["galore-adamw-layerwise"].validate(ctx)
    get_plugin_host().registry["galore-adamw"].validate(ctx)  # the Trainer's scaler unscales before a normal step


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_galore_adamw8bit_needs_cuda(tmp_path):
    from hf_lowmem import LowMemTrainer
    from hf_lowmem.errors import PluginError

    args = train_args(tmp_path, lowmem_optimizer="galore-adamw8bit")
    with pytest.raises(PluginError, match="needs a CUDA GPU"):
        LowMemTrainer(model=tiny_model(), args=args, train_dataset=RandomTokens(n=4, seq=8))


# ---------------------------------------------------------------------------------------------------
# the projector: same as galore-torch's when asked to be; staggered and randomized otherwise
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_our_projector_reproduces_galore_torch(proj_type):
    """stagger off + exact SVD at every refresh = galore-torch's own GaLoreProjector, bit for bit."""
    from galore_torch import GaLoreAdamW

    from hf_lowmem_plugins.galore import GaLoreProjector

    def run(ours: bool):
        torch.manual_seed(0)
        ws = [torch.nn.Parameter(torch.randn(24, 40)), torch.nn.Parameter(torch.randn(40, 24))]
        opt = GaLoreAdamW([{"params": ws, "rank": 6, "update_proj_gap": 3, "scale": 0.5, "proj_type": proj_type}],
                          lr=1e-2, no_deprecation_warning=True)
        if ours:
            for i, w in enumerate(ws):
                opt.state[w]["projector"] = GaLoreProjector(6, 3, 0.5, proj_type, "svd", "svd", index=i)
        g = torch.Generator().manual_seed(1)
        for _ in range(7):
            for w in ws:
                w.grad = torch.randn(w.shape, generator=g)
            opt.step()
        return [w.detach().clone() for w in ws]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_staggered_refreshes_bound_the_per_step_count(tmp_path):
    gap = 4
    counts = {}
    for stagger in (True, False):
        trainer, _ = _run(tmp_path / str(stagger), "galore-adamw",
                          options={"update_proj_gap": gap, "stagger": stagger}, steps=10, bs=1)
        from hf_lowmem_plugins.galore import projectors_of

        prs = projectors_of(trainer.optimizer)
        per_step = [0] * 10
        for pr in prs:
            for t, method in pr.refreshes:
                per_step[t] += 1
                assert method == ("randomized" if t == 0 else "svd")  # the defaults: randomized init, exact refreshes
        counts[stagger] = per_step
    n = N_TARGETS
    # step 0 always initialises every matrix (with the cheap randomized finder by default)
    assert counts[True][0] == counts[False][0] == n
    # stock schedule: everything again at t = 4, 8; nothing in between
    assert counts[False] == [n if t % gap == 0 else 0 for t in range(10)]
    # staggered: every later step pays at most ceil(n / gap), and each matrix still refreshes once per gap
    assert max(counts[True][1:]) <= math.ceil(n / gap)
    assert sum(counts[True][1:9]) == 2 * n  # steps 1..8 cover two full gaps
    assert min(counts[True][1:]) >= 1


def test_randomized_finder_is_accurate_deterministic_and_leaves_the_global_rng_alone():
    from hf_lowmem_plugins.galore import top_singular_vectors

    g = torch.Generator().manual_seed(0)
    m, n, r = 96, 64, 8
    u0, _ = torch.linalg.qr(torch.randn(m, r, generator=g))
    v0, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    a = (u0 * torch.linspace(10, 3, r)) @ v0.t() + 1e-3 * torch.randn(m, n, generator=g)
    state = torch.get_rng_state()
    u_r, none = top_singular_vectors(a, r, "randomized", want="left", seed=(3, 1))
    none2, vh_r = top_singular_vectors(a, r, "randomized", want="right", seed=(3, 1))
    assert none is None and none2 is None  # only the side asked for is computed
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(u_r, top_singular_vectors(a, r, "randomized", want="left", seed=(3, 1))[0])
    uf, vhf = top_singular_vectors(a, r, "randomized", want="full", seed=(4,))
    us, vhs = top_singular_vectors(a, r, "svd")
    # same subspaces as the exact SVD (projectors agree), left and right, orthonormal bases
    for u in (u_r, uf):
        assert u.shape == (m, r) and torch.dist(u @ u.t(), us @ us.t()) < 1e-3
        assert torch.dist(u.t() @ u, torch.eye(r)) < 1e-4
    for vh in (vh_r, vhf):
        assert vh.shape == (r, n) and torch.dist(vh.t() @ vh, vhs.t() @ vhs) < 1e-3
    # a sketch as wide as half the matrix saves nothing: exact SVD instead
    assert torch.equal(top_singular_vectors(a, 30, "randomized", want="left")[0], top_singular_vectors(a, 30, "svd")[0])


def test_randomized_refreshes_train(tmp_path):
    trainer, _ = _run(tmp_path, "galore-adamw-layerwise", options={"proj_method": "randomized", "update_proj_gap": 3},
                      steps=12, bs=4, n=16)
    from hf_lowmem_plugins.galore import projectors_of

    assert {m for pr in projectors_of(trainer.optimizer) for _, m in pr.refreshes} == {"randomized"}
    losses = logged_losses(trainer)
    assert sum(losses[-4:]) < sum(losses[:4]) - 0.8


# ---------------------------------------------------------------------------------------------------
# layer-wise: accumulation, clipping, checkpoints
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["galore-adamw", "galore-adafactor"])
def test_layerwise_with_accumulation_equals_the_normal_optimizer(tmp_path, name):
    """The key property: with 4 micro-batches per step, the layer-wise variant makes the same update per
    optimizer step as the normal one (one update per window, on the whole window's gradient)."""
    ref, snap_ref = _run(tmp_path / "ref", name, ga=4, steps=4, snap=True)
    lw, snap_lw = _run(tmp_path / "lw", name + "-layerwise", ga=4, steps=4, snap=True)
    assert len(snap_ref.params) == len(snap_lw.params) == 4
    start = torch.cat([p.detach().flatten() for p in tiny_model().parameters()])
    prev_ref = prev_lw = start
    for step, (a, b) in enumerate(zip(snap_ref.params, snap_lw.params)):
        upd_ref, upd_lw = a - prev_ref, b - prev_lw
        assert upd_ref.abs().max() > 1e-4, "the step moved nothing"
        rel = (upd_ref - upd_lw).norm() / upd_ref.norm()
        assert rel < 1e-4, f"step {step}: layer-wise update differs from the normal one by {rel:.2e} (relative)"
        prev_ref, prev_lw = a, b
    assert logged_losses(ref) == pytest.approx(logged_losses(lw), rel=1e-5)
    # one update per window: each inner optimizer stepped 4 times, not 16
    opt = _inner(lw)
    assert {o.state[p]["step"] for p, o in opt.inner.items()} == {4}
    # gradients accumulate in .grad during the window, and are gone (consumed inside backward) before step()
    assert all(any(row) for row in snap_lw.grads_mid_window)
    assert not any(any(row) for row in snap_lw.grads_before_step)
    assert all(all(row) for row in snap_ref.grads_before_step)


def test_layerwise_clipping_is_exact():
    """The clipping arithmetic, isolated: same projectors (no refresh during the test), 2 micro-batches per
    window, clipping active on every step. Layer-wise (norm summed inside backward, the low-rank step on
    c * R deferred to step()) equals accumulate, clip_grad_norm_, then the normal optimizer step."""
    import copy
    from types import SimpleNamespace

    from galore_torch import GaLoreAdamW

    from hf_lowmem_plugins.galore import GaLoreOptions, LayerwiseOptimizer, make_projectors, select_targets

    torch.manual_seed(0)
    base = tiny_model()
    opts = GaLoreOptions(rank=8, update_proj_gap=10**6, scale=1.0)

    def setup(model):
        targets = select_targets(model, opts)
        prs = make_projectors(targets, opts)
        g = torch.Generator().manual_seed(5)
        for pr, (_, m) in zip(prs.values(), targets):  # a fixed basis, already "refreshed": no SVD in this test
            m_, n_ = m.weight.shape
            pr.side = "right" if m_ >= n_ else "left"
            q = torch.linalg.qr(torch.randn(n_ if pr.side == "right" else m_, 8, generator=g)).Q
            pr.basis = q.t().contiguous() if pr.side == "right" else q
            pr.t = 1
        tgt = {id(m.weight) for _, m in targets}
        groups = [{"params": [p for p in model.parameters() if id(p) in tgt], "weight_decay": 0.0, "rank": 8,
                   "update_proj_gap": 10**6, "scale": 1.0, "proj_type": "std"},
                  {"params": [p for p in model.parameters() if id(p) not in tgt], "weight_decay": 0.0}]
        return groups, prs

    data = RandomTokens(n=12, seq=16)
    windows = [[torch.stack([data[i]["input_ids"] for i in range(j, j + 2)]) for j in (k, k + 2)] for k in (0, 4, 8)]
    max_norm = 0.3

    ref_model = copy.deepcopy(base)
    groups, prs = setup(ref_model)
    ref = GaLoreAdamW(groups, lr=1e-2, no_deprecation_warning=True)
    for p, pr in prs.items():
        ref.state[p]["projector"] = pr
    ref_norms = []
    for window in windows:
        for x in window:
            (ref_model(input_ids=x, labels=x).loss / 2).backward()
        ref_norms.append(float(torch.nn.utils.clip_grad_norm_(ref_model.parameters(), max_norm)))
        ref.step()
        ref.zero_grad()

    lw_model = copy.deepcopy(base)
    groups, prs = setup(lw_model)
    gs = SimpleNamespace(sync_gradients=False)
    trainer = SimpleNamespace(accelerator=SimpleNamespace(gradient_state=gs))
    lw = LayerwiseOptimizer(groups, lambda g: GaLoreAdamW(g, lr=1e-2, no_deprecation_warning=True), prs,
                            trainer=trainer, max_grad_norm=max_norm)
    lw.attach()
    lw_norms = []
    for window in windows:
        for i, x in enumerate(window):
            gs.sync_gradients = i == len(window) - 1
            (lw_model(input_ids=x, labels=x).loss / 2).backward()
        assert all(p.grad is None for p in lw_model.parameters())
        lw.step()
        lw_norms.append(lw.last_grad_norm)
    lw.detach()

    assert min(ref_norms) > 2 * max_norm, ref_norms  # clipping active on every step
    assert lw_norms == pytest.approx(ref_norms, rel=1e-6)
    for (n, a), b in zip(ref_model.named_parameters(), lw_model.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=2e-7), f"{n}: max |diff| {float((a - b).abs().max()):.2e}"


def test_layerwise_clipping_in_the_trainer(tmp_path):
    """End to end through the Trainer, with clipping active on every step: the same as clip-then-step.

    Projectors are computed once, at step 0 (update_proj_gap 1000), by the randomized finder, which gives the
    same basis for G and c G. With refreshes the runs drift apart, and not because of clipping: the layer-wise
    path refreshes from G, the normal one from c G, whose singular vectors are equal in exact arithmetic
    but, where singular values nearly coincide (at rank 8 in this tiny model they do), differ at the
    rounding level; a refresh amplifies such differences (measured: 3e-6 -> 5e-3 after one refresh), as it
    amplifies any rounding difference between two GaLore runs."""
    opts = {"update_proj_gap": 1000}
    kw = dict(ga=2, steps=4, max_grad_norm=0.3, snap=True, options=opts)
    ref, snap_ref = _run(tmp_path / "ref", "galore-adamw", **kw)
    lw, snap_lw = _run(tmp_path / "lw", "galore-adamw-layerwise", **kw)
    unclipped, snap_u = _run(tmp_path / "u", "galore-adamw-layerwise", ga=2, steps=4, snap=True, options=opts)
    norms_ref = [h["grad_norm"] for h in ref.state.log_history if "loss" in h]
    norms_lw = [h["grad_norm"] for h in lw.state.log_history if "loss" in h]
    assert min(norms_ref) > 0.3 * 1.5, f"clipping must be active for this test to mean anything: {norms_ref}"
    # the logged norm is the real one, not the 0 the Trainer sees after the hooks freed every gradient
    assert norms_lw == pytest.approx(norms_ref, rel=1e-5)
    assert logged_losses(lw) == pytest.approx(logged_losses(ref), rel=1e-6)
    for step, (a, b, u) in enumerate(zip(snap_ref.params, snap_lw.params, snap_u.params)):
        off, effect = float((a - b).abs().max()), float((a - u).abs().max())
        # measured: off 2.9e-6 at most, effect of clipping 3e-3 .. 1e-2 per element
        assert off < 1e-5 and effect > 100 * off, f"step {step}: off by {off:.1e}, clipping moves {effect:.1e}"
    # nothing of full size is held between backward and step(): only non-target parameters keep a gradient
    assert not any(any(row) for row in snap_lw.grads_before_step)


def test_layerwise_clipping_holds_only_low_rank_gradients_for_targets(tmp_path):
    from transformers import TrainerCallback

    from hf_lowmem_plugins.galore import GaLoreProjector

    seen = {}

    class Peek(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            opt = _inner(trainer)
            pending = [o.state[p]["projector"].pending for p, o in opt.inner.items()
                       if isinstance(o.state[p].get("projector"), GaLoreProjector)]
            seen["pending_shapes"] = {tuple(x.shape) for x in pending}
            seen["held"] = {tuple(g.shape) for g in opt._held.values()}
            seen["n_pending"] = len(pending)

    args = train_args(tmp_path, lowmem_optimizer="galore-adamw-layerwise", max_steps=1, max_grad_norm=0.1,
                      lowmem_options={"galore-adamw-layerwise": SMALL})
    trainer = _trainer_class()(model=tiny_model(), args=args, train_dataset=RandomTokens(n=8, seq=16),
                               callbacks=[Peek()])
    trainer.train()
    assert seen["n_pending"] == N_TARGETS
    # rank-8 projections of the 32x32 (q, o), 16x32 (k, v), 64x32 (gate, up) and 32x64 (down) matrices
    assert seen["pending_shapes"] == {(32, 8), (8, 32), (64, 8), (8, 64)}
    assert (128, 32) in seen["held"] and all(len(s) == 1 or s == (128, 32) for s in seen["held"])


@pytest.mark.parametrize("name", ["galore-adamw", "galore-adamw-layerwise"])
def test_checkpoint_resume_continues_exactly(tmp_path, name):
    """Optimizer state (with our projectors) goes through the Trainer's weights_only=True checkpoint load."""
    kw = dict(steps=6, ga=2, max_grad_norm=0.5, save_strategy="steps", save_steps=3)
    full, _ = _run(tmp_path / "full", name, **kw)
    ckpt = tmp_path / "full" / "checkpoint-3"
    assert (ckpt / "optimizer.pt").exists()
    opts = dict(SMALL)
    args = train_args(tmp_path / "resumed", lowmem_optimizer=name, max_steps=6, per_device_train_batch_size=2,
                      gradient_accumulation_steps=2, max_grad_norm=0.5, learning_rate=1e-2,
                      lowmem_options={name: opts})
    resumed = _trainer_class()(model=tiny_model(), args=args, train_dataset=RandomTokens(n=48, seq=16))
    resumed.train(resume_from_checkpoint=str(ckpt))
    from hf_lowmem_plugins.galore import projectors_of

    assert all(p.t == 6 for p in projectors_of(resumed.optimizer))
    # the resumed history starts with the checkpoint's 3 entries
    assert logged_losses(resumed)[:3] == logged_losses(full)[:3]
    assert logged_losses(resumed)[3:] == pytest.approx(logged_losses(full)[3:], rel=1e-6)
    a = torch.cat([p.detach().flatten() for p in full.model.parameters()])
    b = torch.cat([p.detach().flatten() for p in resumed.model.parameters()])
    assert _close(a, b)


def test_layerwise_under_gradient_checkpointing(tmp_path):
    """Checkpointed layers run their backward (and so the hooks) inside a recompute; results are unchanged."""
    kw = dict(ga=2, steps=3, max_grad_norm=0.3, snap=True)
    plain, snap_p = _run(tmp_path / "plain", "galore-adamw-layerwise", **kw)
    ckpt, snap_c = _run(tmp_path / "ckpt", "galore-adamw-layerwise", gradient_checkpointing=True, **kw)
    assert ckpt.model.is_gradient_checkpointing
    assert logged_losses(ckpt) == pytest.approx(logged_losses(plain), rel=1e-6)
    assert _close(snap_c.params[-1], snap_p.params[-1], rtol=0, atol=1e-6)


def test_layerwise_step_without_hooks_is_an_error():
    from hf_lowmem.errors import PluginError
    from hf_lowmem_plugins.galore import LayerwiseOptimizer, _build, galore_param_groups  # noqa: F401
    from hf_lowmem_plugins.galore import GaLoreOptions, make_projectors, select_targets

    model = tiny_model()
    opts = GaLoreOptions(rank=8)
    targets = select_targets(model, opts)
    args = train_args("/tmp/unused")
    groups = [{"params": [p for p in model.parameters()], "weight_decay": 0.0}]
    opt = LayerwiseOptimizer(groups, lambda gs: _build("GaLoreAdamW", gs, args, opts), make_projectors(targets, opts))
    model(input_ids=torch.randint(0, 128, (1, 8)), labels=torch.randint(0, 128, (1, 8))).loss.backward()
    with pytest.raises(PluginError, match="no hook saw the last micro-batch"):
        opt.step()  # hooks never attached: gradients would silently be dropped


# ---------------------------------------------------------------------------------------------------
# DDP: 2 gloo processes against 1 process with twice the micro-batch
# ---------------------------------------------------------------------------------------------------

# projectors from step 0 only: a refresh would amplify the rounding difference between an all-reduced sum of
# two half-batch gradients and one full-batch gradient (see test_layerwise_clipping_in_the_trainer)
DDP_CFG = dict(name="galore-adamw-layerwise", steps=4, ga=2, max_grad_norm=0.3, options={**SMALL, "update_proj_gap": 1000})


def _ddp_worker(rank, world, port, out_dir, bs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    from transformers import TrainerCallback

    flags = []

    class Watch(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            flags.append({"ddp_sync": getattr(trainer.model_wrapped, "require_backward_grad_sync", None),
                          "grads": sum(p.grad is not None for p in trainer.model.parameters())})

    c = DDP_CFG
    args = train_args(os.path.join(out_dir, f"rank{rank}"), lowmem_optimizer=c["name"], max_steps=c["steps"],
                      per_device_train_batch_size=bs, gradient_accumulation_steps=c["ga"],
                      max_grad_norm=c["max_grad_norm"], learning_rate=1e-2, lowmem_options={c["name"]: c["options"]})
    trainer = _trainer_class()(model=tiny_model(), args=args, train_dataset=RandomTokens(n=32, seq=16),
                               callbacks=[Watch()])
    trainer.train()
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"losses": logged_losses(trainer), "params": flat.tolist(), "flags": flags,
                   "wrapped": type(trainer.model_wrapped).__name__, "mode": trainer.lowmem_ctx.mode,
                   "norms": [h["grad_norm"] for h in trainer.state.log_history if "loss" in h]}, f)


@pytest.mark.slow  # ~30-60 s: two spawned processes import torch and transformers
def test_layerwise_ddp_matches_a_single_process(tmp_path):
    import torch.multiprocessing as mp

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path), 2), nprocs=2, join=True)
    r0, r1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1))
    assert r0["wrapped"] == "DistributedDataParallel" and r0["mode"] == "ddp"
    # DDP's own gradient sync is off, and the hooks consumed every gradient (DDP did not write any back)
    assert all(f == {"ddp_sync": False, "grads": 0} for f in r0["flags"] + r1["flags"]), r0["flags"]
    assert torch.equal(torch.tensor(r0["params"]), torch.tensor(r1["params"])), "ranks diverged"

    # the same run in one process with twice the micro-batch (4 = 2 ranks x 2)
    c = DDP_CFG
    single, _ = _run(tmp_path / "single", c["name"], steps=c["steps"], ga=c["ga"], bs=4, max_grad_norm=c["max_grad_norm"],
                     n=32, options=c["options"])
    assert min(r0["norms"]) > c["max_grad_norm"], "clipping should be active"
    assert r0["losses"] == pytest.approx(logged_losses(single), rel=1e-5)
    assert r0["norms"] == pytest.approx([h["grad_norm"] for h in single.state.log_history if "loss" in h], rel=1e-5)
    # without the hooks' all-reduce each rank follows its own half-batch gradient: the ranks then differ by
    # 0.053 (measured); with it, both equal the single process up to the rounding of the summation order
    flat = torch.cat([p.detach().flatten() for p in single.model.parameters()])
    assert _close(torch.tensor(r0["params"]), flat, rtol=0, atol=2e-5)


# ---------------------------------------------------------------------------------------------------
# GPU: the 8-bit variant (galore-torch's AdamW8bit needs CUDA)
# ---------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.3])  # update inside the hook / deferred to step()
def test_galore_adamw8bit_on_gpu_trains_and_layerwise_matches(tmp_path, max_grad_norm):
    """galore-torch's 8-bit AdamW (CUDA only), normal and layer-wise with accumulation and active clipping
    (the deferred low-rank step through galore-torch's data swap). Projectors from step 0 only, as in
    test_layerwise_clipping_in_the_trainer; 8-bit state quantization can turn rounding differences into
    one quantization step, hence the tolerance relative to how far training moved the parameters."""
    import galore_torch

    kw = dict(ga=2, steps=8, bs=4, n=16, use_cpu=False, max_grad_norm=max_grad_norm, snap=True,
              options={"min_8bit_size": 64, "update_proj_gap": 1000})
    ref, snap_ref = _run(tmp_path / "ref", "galore-adamw8bit", **kw)
    lw, snap_lw = _run(tmp_path / "lw", "galore-adamw8bit-layerwise", **kw)
    assert type(_inner(ref)) is galore_torch.GaLoreAdamW8bit
    assert {type(o) for o in _inner(lw).inner.values()} == {galore_torch.GaLoreAdamW8bit}
    p = ref.model.model.layers[0].mlp.down_proj.weight
    assert p.is_cuda and _inner(ref).state[p]["state1"].dtype == torch.uint8  # the low-rank state is 8-bit
    assert _inner(ref).state[p]["state1"].shape == (8, 64)
    norms = [h["grad_norm"] for h in ref.state.log_history if "loss" in h]
    if max_grad_norm:
        assert min(norms) > max_grad_norm, norms  # clipping active
    losses = logged_losses(ref)
    assert sum(losses[-2:]) < sum(losses[:2])
    assert logged_losses(lw) == pytest.approx(losses, rel=1e-3)
    start = torch.cat([q.detach().flatten() for q in tiny_model().parameters()]).cuda()
    moved = float((snap_ref.params[-1] - start).norm())
    off = float((snap_lw.params[-1] - snap_ref.params[-1]).norm())
    assert off < 0.02 * moved, f"layer-wise is {off:.2e} from the normal run, which moved {moved:.2e}"
