"""bench/ssd_planner_check.py (docs/ssd-tier.md's planner figures): its rows agree with the engine's own SSD-tier
arithmetic (hf_lowmem.engine.estimate), and docs/streaming.md links the SSD tier's page. CPU, no weights."""

import json
import os

import pytest

from tests.tiny import bench_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    return bench_module("ssd_planner_check")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = tmp_path_factory.mktemp("spc") / "rows.json"
    rows = _script().main(["--only", "7b-measured,13b-2.1GBps,70b-gen4x2", "--no_hide_search", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
    return {r["name"]: r for r in rows}


def test_rows_match_the_engine_estimate(rows):
    from hf_lowmem.engine.estimate import disk_seconds, ssd_traffic
    from hf_lowmem.planner import load_model_shape

    for name, model, fmt_grads in (("7b-measured", "llama2-7b", None), ("70b-gen4x2", "llama2-70b", "8bit")):
        r = rows[name]
        t = ssd_traffic(load_model_shape(model).block_params(), master_format="bf16", state_format="4bit", window=4,
                        stash_every=1, grad_format=fmt_grads)
        assert (r["read_bytes"], r["write_bytes"], r["file_bytes"]) == (t["read_bytes"], t["write_bytes"], t["file_bytes"])
        assert r["tb_written_per_1000_steps"] == round(1000 * t["write_bytes"] / 1e12, 2)
        assert r["disk_s_rw"] == round(disk_seconds(t, r["read_gbps"], r["write_gbps"], r["disks"]), 2)
        assert r["planner_disk_s"] == round(disk_seconds(t, r["read_gbps"], r["read_gbps"], r["disks"]), 2)
        assert r["step_s_rw"] >= r["disk_s_rw"] > r["compute_s"] and r["disk_bound"]
        assert r["ga_to_hide_disk"] * r["compute_s"] / r["grad_accum"] >= r["disk_s_rw"]
    # two disks halve the disk time of the same traffic; writes slower than reads add to it
    assert rows["70b-gen4x2"]["disk_s_rw"] > rows["70b-gen4x2"]["planner_disk_s"]


@pytest.mark.parametrize("name", ["7b-measured", "13b-2.1GBps"])
def test_planner_rows_match_the_measured_runs(rows, name):
    r = rows[name]
    m = r["measured"]
    # the planner's SSD traffic is byte for byte what the engine logged in the measured run (its disk_note)
    assert r["bytes_vs_engine"] == [0, 0]
    assert m["engine_read_bytes"] == r["read_bytes"]
    with open(os.path.join(ROOT, m["file"])) as f:
        run = json.load(f)["rows"][m["row"]]
    assert run.get("shape", "llama2-7b") == r["model"] and run["grad_accum"] == r["grad_accum"]  # older rows: 7B only
    assert run["disk_note"]["read_bytes"] == r["read_bytes"] and run["disk_note"]["write_bytes"] == r["write_bytes"]
    assert run["step_times_s"] == m["step_times_s"]
    assert abs(r["planner_step_vs_measured_mean"]) < 0.2  # the step time, at the disk rate the row assumes
    assert r["fits"]


def test_streaming_doc_links_ssd_tier():
    with open(os.path.join(ROOT, "docs", "streaming.md")) as f:
        assert "ssd-tier.md" in f.read()
    assert os.path.isfile(os.path.join(ROOT, "docs", "ssd-tier.md"))
