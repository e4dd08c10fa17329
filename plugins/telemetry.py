"""Training telemetry: what a run costs, in the Trainer's own logs.

On by default (``LowMemTrainingArguments(lowmem_telemetry=True)``; ``--lowmem_telemetry false`` turns it
off). This module registers no named plugin: it only contributes a callback through
the event ``hf_lowmem_callbacks``, which every loaded module hears. At every training log it adds

``lowmem/gpu_peak_alloc_gib``, ``lowmem/gpu_peak_reserved_gib``
    peak GPU memory since the process started, as ``torch.cuda.max_memory_allocated`` / ``..._reserved``
    count it (peaks are never reset, so anyone else reading those counters still sees the run's peak);
``lowmem/host_peak_rss_gib``
    peak resident host memory of the process (``getrusage``: the kernel's own high-water mark, which
    includes pinned memory and everything before training, e.g. loading the model);
``lowmem/tokens_per_s``, ``lowmem/mfu``
    throughput over the steps since the previous log (time spent in evaluation and checkpointing is left
    out), and model FLOPs utilisation: ``tokens/s x 6 x matmul parameters`` (the usual 6N convention: the
    embedding lookup is free, a tied LM head counts; attention's sequence-length-dependent FLOPs are left
    out, so MFU is slightly understated at long sequences) over the device's dense bf16 peak (fp32 peak
    for fp32 training) times the number of processes (values keep 4 significant digits, so a tiny model's
    MFU of ~1e-7 is logged as such, not as 0). Omitted on the CPU and on GPUs missing from
    :data:`PEAK_TFLOPS` (set ``HF_LOWMEM_PEAK_TFLOPS`` to give the peak).

Tokens are counted the way the Trainer counts FLOPs (``floating_point_ops``: 6 x non-embedding
parameters x ``input_ids`` elements per micro-batch), so no extra synchronisation is added to the step;
the GPU is synchronised only at the steps that log, so their time includes the GPU's work.

Because hf-lowmem's plugin callbacks run before the Trainer's own ones, the keys reach the progress bar,
``state.log_history`` and every ``report_to`` integration (TensorBoard, W&B, ...). At the end of training
a summary is printed (and kept in ``ctx.state["telemetry"]``), with the planner's prediction beside the
measurement when ``lowmem_gpu_memory`` chose the plan.

``lowmem_plot="path.png"`` (``"auto"``: ``OUTPUT_DIR/lowmem_telemetry.png``) writes a PNG of the loss (and
the eval loss), memory and throughput over the run, each y axis fitted to its lines; it needs the ``plot``
extra (matplotlib). A field rather than an environment variable, because it belongs to the run like
``output_dir``, shows in ``--help`` and is checked at construction (a missing matplotlib fails before
training, not after it).

(Over 400 lines: the callback, its end-of-run summary and its plot read the same samples and belong together.)
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from hf_lowmem import hookimpl
from hf_lowmem.anatomy import embeddings, lm_head
from hf_lowmem.context import mixed_precision_dtype

logger = logging.getLogger("hf_lowmem")

GiB = 2**30
PREFIX = "lowmem/"

#: GPU name substring -> (dense bf16/fp16 tensor TFLOP/s, fp32 TFLOP/s), spec sheets. Checked in order, so
#: more specific names come first. Our H200 measured 784 TFLOP/s on a bf16 8192^3 matmul (spec 989).
PEAK_TFLOPS: list[tuple[str, float, float]] = [
    ("GH200", 989.4, 67.0), ("H200", 989.4, 67.0), ("H100 PCIe", 756.0, 51.0), ("H100 NVL", 835.0, 60.0),
    ("H100", 989.4, 67.0), ("H800", 989.4, 67.0), ("H20", 148.0, 44.0),
    ("B200", 2250.0, 80.0), ("A100", 312.0, 19.5), ("A800", 312.0, 19.5), ("L40S", 362.0, 91.6),
    ("L40", 181.0, 90.5), ("L4", 121.0, 30.3), ("A10G", 70.0, 31.2), ("A10", 125.0, 31.2),
    ("RTX 6000 Ada", 364.0, 91.1), ("RTX 4090", 165.2, 82.6), ("RTX 4080", 97.5, 48.7),
    ("RTX 3090", 71.0, 35.6), ("A6000", 154.8, 38.7), ("V100", 125.0, 15.7), ("T4", 65.0, 8.1),
]


def device_peak_tflops(name: str, fp32: bool = False) -> float | None:
    """The dense peak of a GPU by its name (``torch.cuda.get_device_name``), or ``HF_LOWMEM_PEAK_TFLOPS``."""
    env = os.environ.get("HF_LOWMEM_PEAK_TFLOPS")
    if env:
        return float(env)
    for key, bf16, f32 in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return f32 if fp32 else bf16
    return None


def matmul_params(model: Any) -> int:
    """Parameters that take part in matmuls: all but the input embedding's, plus a tied LM head."""
    total = sum(p.numel() for p in model.parameters())
    emb, out = embeddings(model), lm_head(model)
    n_emb = sum(p.numel() for p in emb.parameters()) if emb is not None else 0
    tied = emb is not None and out is not None and getattr(out, "weight", None) is getattr(emb, "weight", 0)
    return total - n_emb + (out.weight.numel() if tied else 0)


def _sig(x: float, digits: int = 4) -> float:
    """``x`` rounded to ``digits`` significant digits: a tiny model's MFU (~1e-7) or memory stays non-zero,
    where a fixed number of decimals would log 0."""
    return float(f"{x:.{digits}g}")


def _percent(x: float) -> str:
    return f"{x:.1%}" if x >= 1e-3 else f"{100 * x:.2g}%"


def host_peak_rss() -> int:
    """Peak resident set size of this process, in bytes."""
    try:
        import resource

        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(ru if sys.platform == "darwin" else ru * 1024)
    except ImportError:  # Windows
        import psutil

        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))


def host_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class TelemetryMixin:
    """The telemetry callback's logic; :data:`TelemetryCallback` adds ``transformers.TrainerCallback`` (whose
    no-op events it relies on), made on first use so that loading this plugin imports nothing heavy."""

    def __init__(self, ctx: Any = None, plot: str | None = None):
        self.ctx = ctx
        self.plot = plot
        self.samples: list[dict] = []  # per optimizer step: memory now
        self.points: list[dict] = []  # per log: throughput
        self.losses: list[tuple[int, float]] = []  # (step, training loss) per training log
        self.eval_losses: list[tuple[int, float]] = []  # (step, eval loss) per evaluation
        self.summary: dict | None = None
        self._reset_run()

    # ---- bookkeeping ------------------------------------------------------------------------------
    def _reset_run(self) -> None:
        self.cuda = False
        self.device = None
        self.device_name = "cpu"
        self.peak_tflops: float | None = None
        self.world = 1
        self.n_hf = 0
        self.flops_per_token = 0
        self.t0 = self.boundary = time.perf_counter()
        self.interval_time = self.train_time = 0.0
        self.flos_at_log = self.flos_at_begin = 0.0

    def _now(self) -> float:
        return time.perf_counter()

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def _gpu(self) -> dict[str, float]:
        if not self.cuda:
            return {}
        import torch

        return {
            "alloc": torch.cuda.memory_allocated(self.device), "reserved": torch.cuda.memory_reserved(self.device),
            "peak_alloc": torch.cuda.max_memory_allocated(self.device),
            "peak_reserved": torch.cuda.max_memory_reserved(self.device),
        }

    def _logging_due(self, args: Any, state: Any) -> bool:
        steps = getattr(state, "logging_steps", None) or args.logging_steps
        strategy = str(getattr(args.logging_strategy, "value", args.logging_strategy))
        due = strategy == "steps" and steps and state.global_step % max(1, int(steps)) == 0
        return bool(due or (args.logging_first_step and state.global_step == 1)
                    or (state.max_steps and state.global_step >= state.max_steps))

    # ---- the callback ------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import torch

        self._reset_run()
        self.samples, self.points, self.summary = [], [], None
        self.losses, self.eval_losses = [], []
        dev = getattr(args, "device", None)
        self.cuda = torch.cuda.is_available() and dev is not None and torch.device(dev).type == "cuda"
        if self.cuda:
            self.device = torch.device(dev)
            self.device_name = torch.cuda.get_device_name(self.device)
            self.peak_tflops = device_peak_tflops(self.device_name, fp32=mixed_precision_dtype(args) is None)
        self.world = max(1, int(getattr(args, "world_size", 1) or 1))
        if model is not None:
            try:
                self.n_hf = int(model.num_parameters(exclude_embeddings=True)) if hasattr(model, "num_parameters") else 0
                self.flops_per_token = 6 * matmul_params(model)
            except Exception:  # an exotic model: no throughput, memory still works
                self.n_hf = 0
        self.flos_at_log = self.flos_at_begin = float(state.total_flos or 0.0)
        self.t0 = self.boundary = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        if self._logging_due(args, state):
            self._sync()
        now = self._now()
        dt = max(0.0, now - self.boundary)
        self.boundary = now
        self.interval_time += dt
        self.train_time += dt
        if len(self.samples) < 100_000:
            self.samples.append({"step": state.global_step, "time": now - self.t0, "rss": host_rss(), **self._gpu()})

    def _pause(self, *args, **kwargs):  # evaluation and checkpointing are not training time
        self.boundary = self._now()

    on_evaluate = _pause
    on_save = _pause
    on_predict = _pause

    def _mfu(self, tokens_per_s: float) -> float:
        """Model FLOPs utilisation of every process together, at this throughput (needs ``peak_tflops``)."""
        return _sig(tokens_per_s * self.flops_per_token / (self.peak_tflops * 1e12 * self.world))

    def metrics(self, state) -> dict[str, float]:
        """The telemetry keys for a log over the steps since the previous one."""
        out: dict[str, float] = {}
        g = self._gpu()
        if g:
            out[PREFIX + "gpu_peak_alloc_gib"] = _sig(g["peak_alloc"] / GiB)
            out[PREFIX + "gpu_peak_reserved_gib"] = _sig(g["peak_reserved"] / GiB)
        out[PREFIX + "host_peak_rss_gib"] = _sig(host_peak_rss() / GiB)
        flos = float(state.total_flos or 0.0)
        if self.n_hf > 0 and flos > self.flos_at_log and self.interval_time > 0:
            tokens = (flos - self.flos_at_log) / (6.0 * self.n_hf)
            tps = tokens / self.interval_time
            out[PREFIX + "tokens_per_s"] = round(tps, 1)
            if self.peak_tflops:
                out[PREFIX + "mfu"] = self._mfu(tps)
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        for key, series in (("loss", self.losses), ("eval_loss", self.eval_losses)):
            if isinstance(logs.get(key), (int, float)):
                series.append((state.global_step, float(logs[key])))
        if not ("loss" in logs or "train_runtime" in logs):
            return
        final = "train_runtime" in logs
        if final:  # the whole run
            self.interval_time, self.flos_at_log = self.train_time, self.flos_at_begin
        new = self.metrics(state)
        logs.update(new)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and all(k in last for k in logs if k not in new):
            last.update(new)  # the Trainer copied `logs` into its history just before calling on_log
        if not final:
            self.points.append({"step": state.global_step, "time": self._now() - self.t0, **new})
        self.flos_at_log = float(state.total_flos or 0.0)
        self.interval_time = 0.0

    def on_train_end(self, args, state, control, **kwargs):
        self.summary = self._summary(args, state)
        if self.ctx is not None:
            self.ctx.state["telemetry"] = self.summary
        if state.is_world_process_zero:
            print(self.summary_text(), flush=True)
            if self.plot:
                path = os.path.join(args.output_dir, "lowmem_telemetry.png") if self.plot == "auto" else self.plot
                try:
                    self.write_plot(path)
                    print(f"hf-lowmem telemetry: plot written to {path}", flush=True)
                except Exception as e:  # a plot must never fail a finished run
                    logger.warning("hf-lowmem telemetry: could not write the plot %s: %s", path, e)

    # ---- the summary and the plot ----------------------------------------------------------------------
    def _summary(self, args, state) -> dict:
        flos = float(state.total_flos or 0.0) - self.flos_at_begin
        tokens = flos / (6.0 * self.n_hf) if self.n_hf and flos > 0 else None
        g = self._gpu()
        s: dict[str, Any] = {
            "steps": state.global_step, "train_seconds": round(self.train_time, 3),
            "tokens": int(round(tokens)) if tokens is not None else None,
            "tokens_per_s": round(tokens / self.train_time, 1) if tokens and self.train_time > 0 else None,
            "device": self.device_name, "peak_tflops": self.peak_tflops,
            "gpu_peak_alloc_gib": _sig(g["peak_alloc"] / GiB) if g else None,
            "gpu_peak_reserved_gib": _sig(g["peak_reserved"] / GiB) if g else None,
            "host_peak_rss_gib": _sig(host_peak_rss() / GiB),
        }
        s["mfu"] = self._mfu(s["tokens_per_s"]) if s["tokens_per_s"] and self.peak_tflops else None
        if self.cuda:
            import torch

            s["gpu_total_gib"] = round(torch.cuda.get_device_properties(self.device).total_memory / GiB, 2)
        plan = getattr(self.ctx, "plan", None)
        if plan is not None and plan.chosen is not None:
            e = plan.chosen.estimate
            s["planned"] = {"plugins": plan.chosen.label, "gpu_peak_alloc_gib": round(e.gpu_peak_allocated / GiB, 3),
                            "gpu_total_gib": round(e.gpu_total / GiB, 3), "host_total_gib": round(e.host_total / GiB, 3)}
        return s

    def summary_text(self) -> str:
        s = self.summary or {}
        lines = []
        tput = ""
        if s.get("tokens"):
            tput = f", {s['tokens']:,} tokens: {s['tokens_per_s']:,.0f} tokens/s"
            if s.get("mfu") is not None:
                tput += f", MFU {_percent(s['mfu'])} of {s['peak_tflops']:g} TFLOP/s ({s['device']})"
        lines.append(f"hf-lowmem telemetry: {s.get('steps')} steps in {s.get('train_seconds', 0):.1f} s of training{tput}")
        if s.get("gpu_peak_alloc_gib") is not None:
            lines.append(f"  peak GPU memory: {s['gpu_peak_alloc_gib']:.2f} GiB allocated, {s['gpu_peak_reserved_gib']:.2f} GiB "
                         f"reserved (device has {s.get('gpu_total_gib', 0):.1f} GiB)")
        lines.append(f"  peak host RSS: {s.get('host_peak_rss_gib', 0):.2f} GiB")
        plan = s.get("planned")
        if plan:
            ratio = ""
            if s.get("gpu_peak_alloc_gib") and plan["gpu_peak_alloc_gib"]:
                ratio = f" (measured/predicted {s['gpu_peak_alloc_gib'] / plan['gpu_peak_alloc_gib']:.2f})"
            lines.append(f"  planner ({plan['plugins']}): predicted {plan['gpu_peak_alloc_gib']:.2f} GiB allocated{ratio}, "
                         f"{plan['host_total_gib']:.1f} GiB host")
        return "\n".join(lines)

    def write_plot(self, path: str):
        """Write the PNG of :meth:`figure` to ``path``; returns the figure (its lines hold the data drawn)."""
        fig = self.figure()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        return fig

    def figure(self):
        """Three panels over the optimizer steps: the training loss (and the eval loss, when the run evaluates),
        memory (host RSS; on a GPU allocated, peak allocated and reserved), and throughput (tokens/s, MFU on a
        twin axis). Every y axis is fitted to all of its lines with headroom, so no line runs along an edge."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(9, 9))
        FigureCanvasAgg(fig)
        ax_loss, ax_mem, ax_tput = fig.subplots(3, 1, sharex=True)
        ax_loss.set_title("hf-lowmem telemetry")

        def line(ax, xy, label, **kw):
            if xy:
                xs, ys = zip(*xy)
                ax.plot(xs, ys, label=label, marker=kw.pop("marker", "o" if len(xy) <= 30 else None), **kw)

        line(ax_loss, self.losses, "training loss")
        line(ax_loss, self.eval_losses, "eval loss", linestyle="--", marker="s")
        ax_loss.set_ylabel("loss")
        _fit(ax_loss, from_zero=False)
        if not (self.losses or self.eval_losses):
            ax_loss.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax_loss.transAxes)

        steps = [x["step"] for x in self.samples]
        if self.samples and "alloc" in self.samples[0]:
            line(ax_mem, list(zip(steps, [x["alloc"] / GiB for x in self.samples])), "GPU allocated (step end)")
            line(ax_mem, list(zip(steps, [x["peak_alloc"] / GiB for x in self.samples])), "GPU peak allocated")
            line(ax_mem, list(zip(steps, [x["reserved"] / GiB for x in self.samples])), "GPU reserved", linestyle="--")
        line(ax_mem, list(zip(steps, [x["rss"] / GiB for x in self.samples])), "host RSS")
        ax_mem.set_ylabel("GiB")
        ax_mem.ticklabel_format(axis="y", useOffset=False)
        _fit(ax_mem, from_zero=True)

        pts = [p for p in self.points if PREFIX + "tokens_per_s" in p]
        line(ax_tput, [(p["step"], p[PREFIX + "tokens_per_s"]) for p in pts], "tokens/s")
        ax_tput.set_ylabel("tokens/s")
        _fit(ax_tput, from_zero=True)
        if any(PREFIX + "mfu" in p for p in pts):
            ax_mfu = ax_tput.twinx()
            line(ax_mfu, [(p["step"], 100 * p[PREFIX + "mfu"]) for p in pts if PREFIX + "mfu" in p], "MFU %",
                 color="tab:red", linestyle=":")
            ax_mfu.set_ylabel("MFU %")
            _fit(ax_mfu, from_zero=True)
        ax_tput.set_xlabel("optimizer step")
        for ax in (ax_loss, ax_mem, ax_tput):
            ax.grid(alpha=0.3)
            if ax.get_lines():
                ax.legend(loc="best", fontsize=8)
        return fig


def _fit(ax, from_zero: bool, headroom: float = 0.08) -> None:
    """Set ``ax``'s y range to hold every point of its lines, with ``headroom`` of the span above (and below,
    unless it starts at 0): a flat line sits inside the frame, not on its edge."""
    import math

    ys = [float(y) for ln in ax.get_lines() for y in ln.get_ydata() if math.isfinite(float(y))]
    if not ys:
        return
    lo, hi = (min(0.0, min(ys)) if from_zero else min(ys)), max(ys)
    pad = (hi - lo) * headroom or abs(hi) * headroom or 1.0
    ax.set_ylim(lo if from_zero and lo == 0.0 else lo - pad, hi + pad)


_CLASS: type | None = None


def telemetry_callback_class() -> type:
    global _CLASS
    if _CLASS is None:
        from transformers import TrainerCallback

        _CLASS = type("TelemetryCallback", (TelemetryMixin, TrainerCallback), {"__module__": __name__,
                                                                                "__doc__": TelemetryMixin.__doc__})
    return _CLASS


def __getattr__(name: str):
    if name == "TelemetryCallback":
        return telemetry_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def hf_lowmem_callbacks(ctx):
    if not getattr(ctx.args, "lowmem_telemetry", True):
        return None
    return [telemetry_callback_class()(ctx, plot=getattr(ctx.args, "lowmem_plot", None))]
