"""GaLore's layer-wise optimizer: one inner optimizer per parameter (galore-torch's, or apollo-torch's for the
APOLLO plugins), stepped from post-accumulate-grad hooks, with gradient accumulation, exact clipping and DDP
(the ``*-layerwise`` plugins of :mod:`hf_lowmem_plugins.galore`, whose docstring explains how), and
:func:`layerwise_callback`, which attaches its hooks for the length of ``train()``.
"""

from __future__ import annotations

import math

from hf_lowmem.errors import PluginError
from hf_lowmem_plugins.galore_projector import GaLoreProjector

STATE_KEY = "galore"  # ctx.state[STATE_KEY]: what create_optimizer built (for the callback and tests)


_LAYERWISE_CLASS = None


def LayerwiseOptimizer(*args, **kwargs):  # noqa: N802 - behaves as the class
    """Build a layer-wise optimizer: a ``torch.optim.Optimizer`` subclass of :class:`_LayerwiseImpl`,
    created on first use so that importing this module does not import torch."""
    global _LAYERWISE_CLASS
    if _LAYERWISE_CLASS is None:
        import torch

        _LAYERWISE_CLASS = type("LayerwiseOptimizer", (_LayerwiseImpl, torch.optim.Optimizer),
                                {"__module__": __name__, "__doc__": _LayerwiseImpl.__doc__})
    return _LAYERWISE_CLASS(*args, **kwargs)


class _LayerwiseImpl:
    """A facade optimizer over one galore-torch optimizer per parameter, stepped from post-accumulate-grad
    hooks (see the module docstring for accumulation, clipping and DDP). Its ``param_groups`` are the
    inner optimizers' own group dicts, so the Trainer's LR scheduler drives them directly; ``step()`` is
    called by the Trainer once per window and runs the deferred (clipped) updates, if any."""

    def __init__(self, groups, build, projectors, trainer=None, max_grad_norm=0.0, plugin="galore-layerwise"):
        import torch

        self.plugin = plugin
        self.trainer = trainer
        self.max_grad_norm = float(max_grad_norm or 0.0)
        self.inner: dict = {}
        for group in groups:
            hyper = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                self.inner[p] = build([{"params": [p], **hyper}])
        for p, pr in projectors.items():
            self.inner[p].state[p]["projector"] = pr
        torch.optim.Optimizer.__init__(self, [{"params": [p]} for p in self.inner], {})
        self.param_groups = [o.param_groups[0] for o in self.inner.values()]
        self._handles: list = []
        self._ddp = None
        self._world = 1
        self.last_grad_norm: float | None = None
        self._reset_window()

    # -- hooks ------------------------------------------------------------------------------------------
    def attach(self, wrapped_model=None) -> None:
        """Register the per-parameter hooks (idempotent); under DDP, take over gradient synchronisation."""
        import torch.distributed as dist

        if not self._handles:
            self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.inner]
        self._world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        ddp = _find_ddp(wrapped_model)
        if ddp is not None:
            ddp.require_backward_grad_sync = False  # what no_sync() sets: DDP's reducer stays idle
            self._ddp = ddp

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._ddp is not None:
            self._ddp.require_backward_grad_sync = True
            self._ddp = None

    def _syncing(self) -> bool:
        if self.trainer is None:
            return True
        return bool(self.trainer.accelerator.gradient_state.sync_gradients)

    def _reset_window(self) -> None:
        self._sq = None
        self._consumed = 0
        self._deferred: list = []
        self._held: dict = {}

    def _on_grad(self, p) -> None:
        import torch

        if not self._syncing():
            return  # inside an accumulation window: let .grad accumulate
        with torch.no_grad():
            g = p.grad
            if g is None:
                return
            if self._world > 1:
                import torch.distributed as dist

                dist.all_reduce(g)
                g.div_(self._world)
            sq = torch.linalg.vector_norm(g, dtype=torch.float32).square()
            self._sq = sq if self._sq is None else self._sq + sq.to(self._sq.device)
            self._consumed += 1
            opt = self.inner[p]
            if self.max_grad_norm > 0:
                pr = opt.state[p].get("projector")
                if isinstance(pr, GaLoreProjector):
                    pr.pending = pr.project(g)
                else:
                    self._held[p] = g
                p.grad = None
                self._deferred.append(p)
            else:
                opt.step()
                p.grad = None

    # -- the Optimizer interface the Trainer uses ------------------------------------------------------------
    def step(self, closure=None):
        import torch

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._consumed == 0 and any(p.grad is not None for p in self.inner):
            raise PluginError(
                f"{self.plugin}: gradients were accumulated but no hook saw the last micro-batch of the window "
                "(accelerator.gradient_state.sync_gradients was never True during backward), so nothing was updated. "
                "The layer-wise optimizer must be stepped by hf_lowmem's LowMemTrainer, or by a loop that sets "
                "sync_gradients on the last micro-batch (accelerator.accumulate does)."
            )
        norm = math.sqrt(float(self._sq)) if self._sq is not None else 0.0
        if self._deferred:
            coef = min(1.0, self.max_grad_norm / (norm + 1e-6))
            with torch.no_grad():
                for p in self._deferred:
                    opt = self.inner[p]
                    pr = opt.state[p].get("projector")
                    if p in self._held:
                        g = self._held.pop(p)
                        if coef < 1.0:
                            g.mul_(coef)
                        p.grad = g
                    else:
                        if coef < 1.0:
                            pr.pending.mul_(coef)
                        # galore-torch skips parameters without .grad and hands .grad to the projector, which
                        # returns the pending low-rank gradient: a zero-stride placeholder costs no memory.
                        p.grad = torch.zeros((), dtype=p.dtype, device=p.device).expand_as(p)
                    opt.step()
                    p.grad = None
        if self._consumed:
            self.last_grad_norm = norm
        self._reset_window()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for p in self.inner:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self):
        return {"layerwise": [o.state_dict() for o in self.inner.values()]}

    def load_state_dict(self, state_dict):
        saved = state_dict.get("layerwise")
        if saved is None or len(saved) != len(self.inner):
            raise PluginError(f"{self.plugin}: the optimizer state does not come from the same layer-wise optimizer "
                              f"({len(saved or [])} saved parameters, {len(self.inner)} here)")
        for (p, o), sd in zip(self.inner.items(), saved):
            o.load_state_dict(sd)
        self.param_groups = [o.param_groups[0] for o in self.inner.values()]


def _find_ddp(model):
    if model is None:
        return None
    from torch.nn.parallel import DistributedDataParallel

    seen = 0
    while model is not None and seen < 8:
        if isinstance(model, DistributedDataParallel):
            return model
        model = getattr(model, "module", None)
        seen += 1
    return None


def refuse_fp16(name: str, args) -> None:
    """Layer-wise updates run inside backward, before a fp16 gradient scaler could unscale and check the
    gradients: refused in one line (GaLore's and APOLLO's layer-wise plugins)."""
    if getattr(args, "fp16", False):
        raise PluginError(f"plugin {name!r} updates parameters inside backward, before a fp16 gradient scaler could "
                          "unscale and check the gradients: train with bf16=True (or fp32) instead of fp16")


def layerwise_callback(get_optimizer):
    """The ``TrainerCallback`` every layer-wise plugin adds (GaLore's and APOLLO's): it attaches the optimizer's
    per-parameter hooks when ``train()`` begins (and takes over DDP's gradient synchronisation), detaches them
    when it ends, and replaces the ``grad_norm`` the Trainer logs, which it measures after the hooks have freed
    every gradient, by the norm the hooks computed.

    :param get_optimizer: called with no argument at each of those events; returns the run's layer-wise
        optimizer (what :func:`LayerwiseOptimizer` built, e.g. from ``ctx.state``), or ``None`` while there
        is none (the callback then does nothing).
    :return: a ``transformers.TrainerCallback``.
    """
    from transformers import TrainerCallback

    class LayerwiseCallback(TrainerCallback):
        """Attaches the layer-wise hooks for the length of ``train()`` and reports the real gradient norm."""

        def on_train_begin(self, args, state, control, **kw):
            opt = get_optimizer()
            if opt is not None:
                opt.attach(getattr(opt.trainer, "model_wrapped", None))

        def on_train_end(self, args, state, control, **kw):
            opt = get_optimizer()
            if opt is not None:
                opt.detach()

        def on_log(self, args, state, control, logs=None, **kw):
            # The Trainer measures the norm after backward, when the layer-wise hooks have freed every gradient.
            opt = get_optimizer()
            if opt is None or opt.last_grad_norm is None or not logs or "grad_norm" not in logs:
                return
            logs["grad_norm"] = opt.last_grad_norm
            if state.log_history and "grad_norm" in state.log_history[-1]:
                state.log_history[-1]["grad_norm"] = opt.last_grad_norm

    return LayerwiseCallback()
