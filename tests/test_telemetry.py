"""The telemetry callback: keys in every training log (and in what report_to integrations receive), exact
token counts, MFU arithmetic, training time that leaves evaluation out, the end-of-run summary, the PNG."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import TrainerCallback

from hf_lowmem import LowMemTrainer
from hf_lowmem.errors import MissingExtraError
from tests.tiny import RandomTokens, tiny_model, train_args

KEYS = ("lowmem/host_peak_rss_gib", "lowmem/tokens_per_s")


class Recorder(TrainerCallback):
    """Stands in for a report_to integration: keeps what on_log hands it."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs))


def _run(tmp_path, eval_dataset=None, **kw):
    rec = Recorder()
    base = dict(lowmem_telemetry=True, max_steps=6, logging_steps=2, per_device_train_batch_size=2)
    base.update(kw)
    args = train_args(tmp_path, **base)
    trainer = LowMemTrainer(model=tiny_model(), args=args, train_dataset=RandomTokens(n=64, seq=16), callbacks=[rec],
                            eval_dataset=eval_dataset)
    trainer.train()
    return trainer, rec


def _telemetry(trainer):
    from hf_lowmem_plugins.telemetry import TelemetryMixin

    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, TelemetryMixin))


def test_on_by_default():
    from hf_lowmem import LowMemTrainingArguments

    assert LowMemTrainingArguments(output_dir="x", report_to="none").lowmem_telemetry is True


def test_every_training_log_carries_the_keys_and_integrations_receive_them(tmp_path, capsys):
    trainer, rec = _run(tmp_path, gradient_accumulation_steps=2)
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == 3
    for h in train_logs:
        for k in KEYS:
            assert k in h, (k, h)
        assert h["lowmem/tokens_per_s"] > 0 and h["lowmem/host_peak_rss_gib"] > 0.05
        assert "lowmem/mfu" not in h and "lowmem/gpu_peak_alloc_gib" not in h  # CPU: no GPU, no MFU
    got = [logs for logs in rec.logs if "loss" in logs]
    assert len(got) == 3 and all(all(k in logs for k in KEYS) for logs in got)
    # exact token count: 6 optimizer steps x 2 micro-batches x 2 sequences x 16 tokens
    summary = trainer.lowmem_ctx.state["telemetry"]
    assert summary["tokens"] == 6 * 2 * 2 * 16 and summary["steps"] == 6
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["train_seconds"], rel=0.01)
    out = capsys.readouterr().out
    assert "hf-lowmem telemetry: 6 steps" in out and "peak host RSS" in out
    assert "lowmem/tokens_per_s" in out  # the progress bar / printer shows the keys


def test_off_means_no_keys(tmp_path):
    trainer, rec = _run(tmp_path, lowmem_telemetry=False)
    assert not any(k.startswith("lowmem/") for h in trainer.state.log_history for k in h)
    assert "telemetry" not in trainer.lowmem_ctx.state


def test_mfu_arithmetic_and_peak_table(monkeypatch):
    from hf_lowmem_plugins.telemetry import device_peak_tflops, telemetry_callback_class

    assert device_peak_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert device_peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB", fp32=True) == pytest.approx(19.5)
    assert device_peak_tflops("Some Future GPU") is None
    monkeypatch.setenv("HF_LOWMEM_PEAK_TFLOPS", "100")
    assert device_peak_tflops("Some Future GPU") == 100.0
    monkeypatch.delenv("HF_LOWMEM_PEAK_TFLOPS")

    cb = telemetry_callback_class()()
    cb.n_hf, cb.flops_per_token, cb.peak_tflops, cb.world = 1_000_000, 7_000_000, 100.0, 2
    cb.interval_time, cb.flos_at_log = 2.0, 0.0

    class State:
        total_flos = 6 * 1_000_000 * 50_000  # 50,000 tokens since the last log

    m = cb.metrics(State())
    assert m["lowmem/tokens_per_s"] == pytest.approx(25_000)
    assert m["lowmem/mfu"] == pytest.approx(25_000 * 7_000_000 / (100e12 * 2), rel=1e-3)

    # a tiny model on a big GPU (the test model on an H200: ~1,700 tokens/s x 6 x 22k params / 989 TFLOP/s):
    # 4 significant digits, not 4 decimals, so the MFU is logged and printed non-zero
    cb.flops_per_token, cb.peak_tflops, cb.world, cb.interval_time, cb.flos_at_log = 136_000, 989.4, 1, 2.0, 0.0
    tiny = cb.metrics(State())["lowmem/mfu"]
    assert tiny == pytest.approx(25_000 * 136_000 / 989.4e12, rel=1e-3) and tiny > 0
    cb.summary = {"steps": 4, "train_seconds": 0.1, "tokens": 128, "tokens_per_s": 1672.0, "mfu": 2.3e-7,
                  "peak_tflops": 989.4, "device": "NVIDIA H200", "host_peak_rss_gib": 1.9}
    assert "MFU 2.3e-05% of 989.4 TFLOP/s" in cb.summary_text()


def test_matmul_params_counts_a_tied_head():
    from hf_lowmem_plugins.telemetry import matmul_params

    untied = tiny_model()
    tied = tiny_model(tie_word_embeddings=True)
    n = sum(p.numel() for p in untied.parameters())
    emb = untied.get_input_embeddings().weight.numel()
    assert matmul_params(untied) == n - emb
    assert matmul_params(tied) == sum(p.numel() for p in tied.parameters())  # the head is the embedding


def test_evaluation_and_checkpoint_time_is_not_training_time():
    from hf_lowmem_plugins.telemetry import telemetry_callback_class

    cb = telemetry_callback_class()()
    clock = [100.0]
    cb._now = lambda: clock[0]

    class Args:
        logging_steps, logging_strategy, logging_first_step = 10, "steps", False
        device = "cpu"

    class State:
        global_step, max_steps, total_flos, logging_steps = 1, 100, 0.0, 10
        log_history: list = []
        is_world_process_zero = True

    cb.on_train_begin(Args(), State(), None)
    clock[0] += 1.0
    cb.on_step_end(Args(), State(), None)  # a 1 s step
    clock[0] += 30.0
    cb.on_evaluate(Args(), State(), None)  # 30 s of evaluation
    clock[0] += 5.0
    cb.on_save(Args(), State(), None)  # 5 s of checkpointing
    clock[0] += 2.0
    cb.on_step_end(Args(), State(), None)  # a 2 s step
    assert cb.train_time == pytest.approx(3.0) and cb.interval_time == pytest.approx(3.0)


def test_plot_is_written(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    trainer, _ = _run(tmp_path, lowmem_plot="auto")
    png = tmp_path / "lowmem_telemetry.png"
    assert png.exists() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plot written to" in capsys.readouterr().out


def _lines(ax) -> dict[str, list[tuple[float, float]]]:
    return {ln.get_label(): [(float(x), float(y)) for x, y in ln.get_xydata()] for ln in ax.get_lines()}


def _same(drawn, expected):
    assert [x for x, _ in drawn] == [x for x, _ in expected]
    assert [y for _, y in drawn] == pytest.approx([y for _, y in expected], rel=1e-6)


def test_plot_draws_the_loss_and_nothing_is_clipped(tmp_path):
    """The PNG's lines hold exactly the run's data: the training loss and the eval loss (before: no loss at
    all), host RSS per step, tokens/s per log; every y range holds its lines with headroom (before: the flat
    host-RSS line ran along the top edge of the frame)."""
    pytest.importorskip("matplotlib")
    png = tmp_path / "plot.png"
    trainer, _ = _run(tmp_path, lowmem_plot=str(png), max_steps=8, eval_strategy="steps", eval_steps=4,
                      per_device_eval_batch_size=4, eval_dataset=RandomTokens(n=8, seq=16, seed=1))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tel = _telemetry(trainer)
    fig = tel.write_plot(str(tmp_path / "again.png"))  # what on_train_end rendered
    ax_loss, ax_mem, ax_tput = fig.axes[:3]
    hist = trainer.state.log_history
    loss = _lines(ax_loss)
    _same(loss["training loss"], [(h["step"], h["loss"]) for h in hist if "loss" in h])
    _same(loss["eval loss"], [(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h])
    assert len(loss["training loss"]) == 4 and len(loss["eval loss"]) == 2
    mem = _lines(ax_mem)
    _same(mem["host RSS"], [(x["step"], x["rss"] / 2**30) for x in tel.samples])
    assert [s for s, _ in mem["host RSS"]] == list(range(1, 9))
    tput = _lines(ax_tput)
    logged = [(h["step"], h["lowmem/tokens_per_s"]) for h in hist if "loss" in h]  # not the final summary
    _same(tput["tokens/s"], logged)
    assert len(logged) == 4
    for ax in (ax_loss, ax_mem, ax_tput):
        lo, hi = ax.get_ylim()
        ys = [y for pts in _lines(ax).values() for _, y in pts]
        assert lo <= min(ys) and max(ys) < hi - 0.05 * (hi - lo), (ax.get_ylabel(), lo, hi, max(ys))
        assert ax.get_ylabel() == "loss" or lo == 0.0  # memory and throughput start at 0


def test_plot_without_matplotlib_fails_at_construction(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(MissingExtraError, match=r"hf-lowmem\[plot\]"):
        train_args(tmp_path, lowmem_plot="out.png")


def test_summary_compares_with_the_plan(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("hf_lowmem.planner.arguments.training_device", lambda args: "cuda")  # planned as on a GPU
    trainer, _ = _run(tmp_path, lowmem_gpu_memory="1GiB", lowmem_host_memory="64GiB")
    summary = trainer.lowmem_ctx.state["telemetry"]
    assert summary["planned"]["plugins"] and summary["planned"]["gpu_peak_alloc_gib"] > 0
    assert "planner (" in capsys.readouterr().out


def test_stream_engine_runs_are_measured_too(tmp_path):
    from hf_lowmem.plugins import get_plugin_host

    if "stream" not in get_plugin_host().registry:
        pytest.skip("the stream plugin is not registered")
    trainer, _ = _run(tmp_path, lowmem_offload=["stream"], max_steps=2, logging_steps=1)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all("lowmem/tokens_per_s" in h for h in logs)
    assert trainer.lowmem_ctx.state["telemetry"]["tokens"] == 2 * 2 * 16


@pytest.mark.gpu
def test_gpu_memory_and_mfu_on_cuda(tmp_path):
    rec = Recorder()
    args = train_args(tmp_path, lowmem_telemetry=True, use_cpu=False, bf16=True, max_steps=4, logging_steps=2)
    trainer = LowMemTrainer(model=tiny_model(), args=args, train_dataset=RandomTokens(n=64, seq=16), callbacks=[rec])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for h in logs:
        assert h["lowmem/gpu_peak_alloc_gib"] > 0 and h["lowmem/gpu_peak_reserved_gib"] >= h["lowmem/gpu_peak_alloc_gib"]
    name = torch.cuda.get_device_name()
    from hf_lowmem_plugins.telemetry import device_peak_tflops

    if device_peak_tflops(name):
        assert all(0 < h["lowmem/mfu"] < 1 for h in logs)
