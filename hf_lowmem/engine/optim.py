"""The streaming engine's optimizer: AdamW whose states live in (pinned) host memory and whose update runs
on the compute device one parameter at a time, while that parameter's block is being streamed in.

Two state formats:

``fp32``
    exact AdamW: fp32 ``exp_avg`` and ``exp_avg_sq`` (8 bytes/param), updated with PyTorch's own fused
    AdamW kernel, so the result equals ``torch.optim.AdamW(fused=True)`` (the Trainer's default).
``8bit``
    bitsandbytes' block-wise 8-bit AdamW states (2 bytes/param plus one fp32 scale per 256 values), updated
    with bitsandbytes' fused 8-bit kernel; parameters under 4,096 values keep fp32 states, as bitsandbytes does.

The master weights are the model's own parameters (fp32, in host memory), so ``save_pretrained`` and
checkpoints see them directly. ``step()`` does not touch the weights: it records the learning rates and the
clipping coefficient, and the engine applies the update the next time each block is brought to the device
(or at :meth:`StreamEngine.flush`). The arithmetic is the same as an immediate update.
"""

from __future__ import annotations

import math
from typing import Any

import torch

MIN_8BIT_SIZE = 4096
BLOCKSIZE_8BIT = 256


class StreamAdamW(torch.optim.Optimizer):
    """The optimizer object the Trainer sees: param groups (for the LR scheduler), ``step`` (defers to the
    engine), ``state_dict``/``load_state_dict`` (host states, for checkpoints and resume)."""

    def __init__(self, param_groups, engine, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, state_format: str = "fp32"):
        if state_format not in ("fp32", "8bit"):
            raise ValueError(f"state_format must be 'fp32' or '8bit', got {state_format!r}")
        check_hyperparameters(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(param_groups, defaults)
        self.engine = engine
        self.state_format = state_format
        self._group_of: dict[int, int] = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                self._group_of[id(p)] = gi
        self._qmaps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- the Trainer-facing API ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.engine.record_optimizer_step(self)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:  # gradients never live in .grad
        return None

    def state_dict(self) -> dict[str, Any]:
        self.engine.flush()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Copy a checkpoint's states into the host buffers the engine streams from, in place. Each state must
        have the dtype and shape of the buffer it replaces (a uint8 8-bit state stays uint8); a mismatch, e.g. a
        checkpoint of another optimizer or state format, is refused with one line naming the first difference."""
        from hf_lowmem.errors import PluginError

        self.engine.discard_pending()
        groups = state_dict.get("param_groups")
        saved_state = state_dict.get("state")
        if groups is None or saved_state is None or len(groups) != len(self.param_groups):
            raise PluginError("the optimizer state in this checkpoint is not a stream-engine AdamW state with "
                              f"{len(self.param_groups)} parameter group(s); resume with the optimizer and stream "
                              "options the checkpoint was written with, or start without resume_from_checkpoint")
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            st = self.ensure_state(p)
            saved = saved_state.get(i, saved_state.get(str(i)))
            if saved is None:
                raise PluginError(f"the checkpoint's optimizer state has no entry for parameter {i}; it was written "
                                  "for another model or optimizer")
            want = {k for k in st if k != "step"}
            if set(saved) - {"step"} != want:
                raise PluginError(f"the checkpoint's optimizer state of parameter {i} has {sorted(set(saved) - {'step'})}, "
                                  f"this run keeps {sorted(want)} (state format {self.state_format!r}); resume with the "
                                  "stream 'states' option and optimizer the checkpoint was written with")
            for k in want:
                src, dst = saved[k], st[k]
                if not torch.is_tensor(src) or src.dtype != dst.dtype or tuple(src.shape) != tuple(dst.shape):
                    got = f"{src.dtype} {tuple(src.shape)}" if torch.is_tensor(src) else type(src).__name__
                    raise PluginError(f"optimizer state {k!r} of parameter {i}: the checkpoint has {got}, this run "
                                      f"keeps {dst.dtype} {tuple(dst.shape)}; resume with the settings it was saved with")
            for k in want:
                st[k].copy_(saved[k])
            st["step"] = torch.as_tensor(float(saved.get("step", 0)), dtype=torch.float32)
        for group, sg in zip(self.param_groups, groups):
            for k, v in sg.items():
                if k != "params":
                    group[k] = v

    # ---- states ----------------------------------------------------------------------------------------
    def group_of(self, p: torch.Tensor) -> dict:
        return self.param_groups[self._group_of[id(p)]]

    def uses_8bit(self, p: torch.Tensor) -> bool:
        return self.state_format == "8bit" and p.numel() >= MIN_8BIT_SIZE

    def ensure_state(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        if not st:
            dev, n = self.engine.dev, p.numel()
            st["step"] = torch.tensor(0.0)
            if self.uses_8bit(p):
                blocks = (n + BLOCKSIZE_8BIT - 1) // BLOCKSIZE_8BIT
                for k in ("state1", "state2"):
                    st[k] = dev.empty_host(n, torch.uint8).view(p.shape)
                    st[k].zero_()
                for k in ("absmax1", "absmax2"):
                    st[k] = dev.empty_host(blocks, torch.float32)
                    st[k].zero_()
            else:
                for k in ("exp_avg", "exp_avg_sq"):
                    st[k] = dev.empty_host(n, torch.float32).view(p.shape)
                    st[k].zero_()
        return st

    def state_bytes_per_param(self) -> float:
        return 2.0 + 8.0 / BLOCKSIZE_8BIT if self.state_format == "8bit" else 8.0

    def qmaps(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._qmaps:
            import bitsandbytes.functional as F

            self._qmaps[device] = (F.create_dynamic_map(signed=True).to(device),
                                   F.create_dynamic_map(signed=False).to(device))
        return self._qmaps[device]

    # ---- the update, on the device -------------------------------------------------------------------
    @torch.no_grad()
    def update(self, p: torch.Tensor, master: torch.Tensor, grad: torch.Tensor, states: dict[str, torch.Tensor],
               lr: float, clip_coef: float) -> None:
        """One AdamW step of ``master`` (fp32, on the device) in place, with ``states`` on the device.
        ``grad`` is fp32; it is scaled by ``clip_coef``. The step counter lives on the host."""
        group = self.group_of(p)
        beta1, beta2 = group["betas"]
        wd, eps = group["weight_decay"], group["eps"]
        st = self.state[p]
        step = int(st["step"].item()) + 1
        st["step"].fill_(float(step))
        if self.uses_8bit(p):
            import bitsandbytes.functional as F

            q1, q2 = self.qmaps(master.device)
            F.optimizer_update_8bit_blockwise(
                "adam", grad, master, states["state1"], states["state2"], beta1, beta2, 0.0, 0.0, eps, step, lr,
                q1, q2, states["absmax1"], states["absmax2"], weight_decay=wd, gnorm_scale=clip_coef)
            return
        if clip_coef != 1.0:
            grad.mul_(clip_coef)
        step_t = torch.tensor(float(step - 1), device=master.device)
        from torch.optim.adamw import adamw

        adamw([master], [grad], [states["exp_avg"]], [states["exp_avg_sq"]], [], [step_t],
              fused=_fused_ok(master), amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=wd, eps=eps,
              maximize=False)


def check_hyperparameters(*, lr: float, betas, eps: float, weight_decay: float) -> None:
    """Refuse, as ``torch.optim.AdamW`` does, hyperparameters that would train to NaN; one line each, naming the
    training argument to change."""
    from hf_lowmem.errors import PluginError

    def bad(v, lo=0.0, hi=math.inf, hi_open=False):
        try:
            v = float(v)
        except (TypeError, ValueError):
            return True
        return not (math.isfinite(v) and lo <= v and (v < hi if hi_open else v <= hi))

    if bad(lr):
        raise PluginError(f"learning_rate must be a finite number >= 0, got {lr!r}; set e.g. learning_rate=2e-5")
    if len(tuple(betas)) != 2 or any(bad(b, 0.0, 1.0, hi_open=True) for b in betas):
        raise PluginError(f"AdamW betas must be two numbers in [0, 1), got {tuple(betas)!r}; set adam_beta1/adam_beta2")
    if bad(eps):
        raise PluginError(f"adam_epsilon must be a finite number >= 0, got {eps!r}")
    if bad(weight_decay):
        raise PluginError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")


def _fused_ok(t: torch.Tensor) -> bool | None:
    return True if t.device.type in ("cuda", "cpu") else None


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_``'s coefficient, computed the same way (fp32):
    ``max_norm / (norm + 1e-6)``, at most 1."""
    if not max_norm or max_norm <= 0 or math.isinf(max_norm):
        return 1.0
    coef = torch.tensor(max_norm, dtype=torch.float32) / (total_norm.detach().float().cpu() + 1e-6)
    return float(torch.clamp(coef, max=1.0))
