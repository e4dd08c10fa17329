"""bench/stream_bench.py's ``--shape`` (the planner's presets, the one place model shapes live) and
bench/ssd_bench.py's issue-14 sequence (ceiling, RAM tier, SSD tier, 13B through the SSD tier) and its summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import bench_module

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


@pytest.fixture(scope="module")
def bench():
    return bench_module("stream_bench"), bench_module("ssd_bench")


@pytest.mark.parametrize("shape", ["llama2-7b", "llama2-13b"])
def test_shape_is_the_planners_preset_on_the_meta_device(bench, shape):
    import torch
    from transformers import LlamaForCausalLM

    from hf_lowmem.planner import load_model_shape
    from hf_lowmem.planner.shapes import PRESETS

    stream_bench, _ = bench
    preset = PRESETS[shape]
    cfg = stream_bench.llama_config(None, False, shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    assert not any(p.device.type != "meta" for p in model.parameters())  # no weight allocated
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (
        preset["hidden_size"], preset["intermediate_size"], preset["num_hidden_layers"])
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (
        preset["num_attention_heads"], preset["num_key_value_heads"], preset["vocab_size"])
    # the model the bench builds has the planner's parameter count, to the parameter
    assert sum(p.numel() for p in model.parameters()) == load_model_shape(shape).params_total
    # --layers slices the same shape
    sliced = stream_bench.llama_config(3, False, shape)
    assert (sliced.num_hidden_layers, sliced.hidden_size) == (3, preset["hidden_size"])


def test_13b_preset_is_the_issue_shape_and_the_smoke_keeps_its_proportions(bench):
    stream_bench, _ = bench
    big = stream_bench.llama_config(None, False, "llama2-13b")
    assert (big.num_hidden_layers, big.hidden_size, big.intermediate_size, big.num_attention_heads) == (40, 5120, 13824, 40)
    s7, s13 = stream_bench.llama_config(None, True, "llama2-7b"), stream_bench.llama_config(None, True, "llama2-13b")
    assert (s7.num_hidden_layers, s13.num_hidden_layers) == (4, 5)  # 32:40, as the full shapes
    assert s13.hidden_size > s7.hidden_size and s13.intermediate_size > s7.intermediate_size
    assert s7.hidden_size // s7.num_attention_heads == s13.hidden_size // s13.num_attention_heads == 16


def test_unknown_shape_is_one_line_error(bench):
    from hf_lowmem.errors import PluginError

    stream_bench, _ = bench
    with pytest.raises(PluginError, match="unknown model preset 'llama2-15b'; presets: .*llama2-13b"):
        stream_bench.llama_config(None, False, "llama2-15b")


def test_runs_are_checked(bench):
    _, ssd_bench = bench
    with pytest.raises(SystemExit):
        ssd_bench.parse(["--runs", "ceiling,ssd14b", "--offload_dir", "/tmp/x"])
    with pytest.raises(SystemExit):
        ssd_bench.parse(["--runs", "ssd,ssd"])  # twice; and no --offload_dir
    a = ssd_bench.parse(["--runs", "ceiling,ram"])  # no SSD run: no folder needed
    assert a.wanted == ["ceiling", "ram"] and a.ga13 == 7 and a.shape13 == "llama2-13b" and a.steps == 3


def test_summary_of_the_measured_7b_rows(bench):
    """The summary on rows measured on the H200 (2026-11-30): ceiling, RAM tier and SSD tier at 7B, and the SSD
    row once more in the place of a 13B row, to check the ratios and the disk account against hand arithmetic."""
    _, ssd_bench = bench
    ceiling = json.loads((RESULTS / "stream_7b_tiers.json").read_text())["rows"][0]
    ram = json.loads((RESULTS / "ssd_7b_callA.json").read_text())["rows"][0]
    ssd = json.loads((RESULTS / "ssd_7b_ssd.json").read_text())["rows"][0]
    assert (ceiling["name"], ram["name"], ssd["name"]) == ("ceiling", "compact:ram", "compact:ssd")
    rows = [dict(ceiling, run="ceiling"), dict(ram, run="ram"), dict(ssd, run="ssd"), dict(ssd, run="ssd13b"),
            {"run": "skipped", "error": "skipped: 10 s left"}]
    s = ssd_bench.summary(rows)
    assert s["tflops_6N"] == {"ceiling": 451.6, "ram": 271.8, "ssd": 93.2, "ssd13b": 93.2}
    assert s["vs_ceiling"]["ram"] == round(271.8 / 451.6, 3)
    assert s["ssd13b_vs_ceiling"] == round(93.2 / 451.6, 3) and s["target_met"] is False
    assert s["speed_ratio"] == round(2306.1 / 6722.2, 3) and s["host_saved_gib"] == round(29.39 - 20.28, 2)
    assert s["host_within_budget"] == {"ram": True, "ssd": True, "ssd13b": True}
    assert s["missing"] == ["skipped"]
    d = s["disk"]["ssd13b"]
    n = len(ssd["step_times_s"])
    assert d["read_gb"] == round(ssd["io_stats"]["read_bytes"] / n / 1e9, 2)  # 35.65 GB per step, measured
    assert d["predicted_read_gb"] == 33.04 and d["predicted_write_gb"] == 20.64
    assert d["disk_bound"] is True and d["compute_s"] == ssd["breakdown_per_step"]["compute_s"]
    # the disk alone (25.1 s of the 28.4 s step) would allow 93.2 * 28.418 / 25.101 TFLOP/s
    assert d["disk_limited_tflops_6N"] == round(93.2 * 28.418 / 25.101, 1)
    # 50% of the ceiling at this model is a step of 28.418 * 93.2 / 225.8 s; the bytes in that time need this rate
    target_s = 28.418 * 93.2 / (0.5 * 451.6)
    assert d["target_step_s"] == round(target_s, 2)
    assert d["disk_gbps_for_target"] == round((33.04 + 20.64) / target_s, 2)
    assert "target_step_s" not in s["disk"]["ssd"]  # the target is the 13B run's


@pytest.mark.slow  # ~60 s on a 2-core CPU: four processes each import torch and transformers
def test_smoke_runs_the_whole_sequence(tmp_path):
    out = tmp_path / "rows.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "ssd_bench.py"), "--smoke", "--runs",
                           "ceiling,ram,ssd,ssd13b", "--out", str(out)], check=False, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["smoke"] is True and "--runs ceiling,ram,ssd,ssd13b" in data["command"]
    rows = {r.get("run", r["name"]): r for r in data["rows"]}
    assert list(rows) == ["ceiling", "ram", "ssd", "ssd13b", "summary"]
    assert [rows[k]["name"] for k in ("ceiling", "ram", "ssd", "ssd13b")] == [
        "ceiling", "compact:ram", "compact:ssd", "compact:ssd13b"]
    assert all(len(rows[k]["step_times_s"]) == 3 for k in ("ceiling", "ram", "ssd", "ssd13b"))
    # the 13B run took the second shape path, with its own accumulation and the SSD tier's files
    assert rows["ssd13b"]["shape"] == "llama2-13b" and rows["ssd"]["shape"] == "llama2-7b"
    assert (rows["ssd13b"]["layers"], rows["ssd"]["layers"]) == (5, 4)
    assert (rows["ssd13b"]["grad_accum"], rows["ssd"]["grad_accum"]) == (1, 2)
    assert rows["ssd13b"]["hidden"] > rows["ssd"]["hidden"]
    assert rows["ssd13b"]["params"] > rows["ssd"]["params"] == rows["ram"]["params"] == rows["ceiling"]["params"]
    assert rows["ssd13b"]["io_stats"]["write_bytes"] > 0 and "offload_dir" not in rows["ram"]
    s = rows["summary"]
    assert set(s["vs_ceiling"]) == {"ram", "ssd", "ssd13b"} and all(v > 0 for v in s["vs_ceiling"].values())
    assert isinstance(s["target_met"], bool) and set(s["disk"]) == {"ssd", "ssd13b"}
    assert s["disk"]["ssd13b"]["predicted_read_gb"] >= 0 and "missing" not in s
    # the SSD tier is the RAM tier's arithmetic with the state in files
    assert s["train_loss_diff"] <= 1e-4


def test_worker_stops_after_a_timed_step_when_its_time_is_up(tmp_path):
    """``--stop-by`` (set by ssd_bench under its --deadline): a worker whose time is up ends training after the first
    timed step and still prints its row, saying so, instead of being killed with nothing."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(ROOT / "bench" / "stream_bench.py"), "--worker", "ceiling", "--smoke", "--layers", "2",
           "--seq", "16", "--mb", "1", "--ga", "1", "--steps", "5", "--workers", "0", "--out-dir", str(tmp_path),
           "--shape", "llama2-13b", "--stop-by", "1"]  # 1 s after the epoch: already past
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    row = json.loads(lines[-1][7:])
    assert len(row["step_times_s"]) == 2 and row["stopped_early"].startswith("after 2 of 5 steps")
    assert row["shape"] == "llama2-13b" and row["layers"] == 2
