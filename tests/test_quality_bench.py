"""bench/quality.py: job order, rank caps, byte-level data, the summary (lossy-at-your-lr flag, best
multiplier) and one end-to-end run of two parallel jobs on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import bench_module

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quality():
    return bench_module("quality")


def test_every_recipe_runs_at_your_lr_before_the_grid(quality):
    jobs = quality.plan_jobs(["finetune", "pretrain"], ["adamw", "apollo"], [1.0, 2.0, 0.5])
    assert len(jobs) == 12
    assert {m for _, _, m in jobs[:4]} == {1.0}
    assert [m for _, _, m in jobs] == [1.0] * 4 + [2.0] * 4 + [0.5] * 4
    # recipes that are not optimizers (stream, int8 weights) run at x1 only
    jobs = quality.plan_jobs(["pretrain"], ["adamw", "stream-8bit"], [1.0, 2.0], x1_only=["stream-8bit"])
    assert jobs == [("pretrain", "adamw", 1.0), ("pretrain", "stream-8bit", 1.0), ("pretrain", "adamw", 2.0)]
    assert quality.grid_applies({"lowmem_optimizer": "apollo", "lowmem_options": {"apollo": {"scale": 1}}})
    assert not quality.grid_applies(quality.PRESETS["stream-8bit"])
    assert not quality.grid_applies({"lowmem_quantization": "int8-weights"})


def test_rank_is_capped_on_small_models_and_user_ranks_are_kept(quality):
    f = {"lowmem_optimizer": "apollo", "lowmem_options": {"apollo": {"scale": 1}}}
    assert quality.rank_cap(f, 128) == {"lowmem_optimizer": "apollo", "lowmem_options": {"apollo": {"scale": 1, "rank": 32}}}
    assert quality.rank_cap(f, 2048) == f  # 256 <= 2048 / 4
    assert quality.rank_cap({"lowmem_optimizer": "apollo-mini"}, 128) == {"lowmem_optimizer": "apollo-mini"}  # rank 1
    assert quality.rank_cap({"lowmem_optimizer": "galore-adamw"}, 200) == {"lowmem_optimizer": "galore-adamw",
                                                                           "lowmem_options": {"galore-adamw": {"rank": 50}}}
    assert quality.rank_cap({"lowmem_optimizer": "apollo"}, 576) == {"lowmem_optimizer": "apollo"}  # SmolLM2: 256 kept
    given = {"lowmem_optimizer": "galore-adamw", "lowmem_options": {"galore-adamw": {"rank": 8}}}
    assert quality.rank_cap(given, 64) == given
    assert quality.rank_cap({"lowmem_optimizer": "bnb-adamw8bit"}, 16) == {"lowmem_optimizer": "bnb-adamw8bit"}


def test_byte_blocks_take_train_from_the_head_and_eval_from_the_tail(quality, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(bytes(range(256)) * 4)
    train, ev = quality.byte_blocks(str(corpus), 512, 256, 64)
    assert train.shape == (8, 64) and ev.shape == (4, 64)
    assert sorted(train.flatten().tolist()) == sorted((list(range(256)) * 2))
    assert ev.flatten().tolist() == list(range(256))
    with pytest.raises(SystemExit, match="bytes"):
        quality.byte_blocks(str(corpus), 1024, 256, 64)


def _row(recipe, mult, loss, status="ok", regime="pretrain"):
    return {"regime": regime, "recipe": recipe, "lr_mult": mult, "eval_loss": loss, "status": status,
            "peak_gpu_gib": None, "overrides": {}}


def test_summary_flags_lossy_at_your_lr_with_the_multiplier_that_fixes_it(quality):
    rows = [_row("adamw", 1, 2.00), _row("adamw", 2, 2.10),
            _row("galore", 1, 2.10), _row("galore", 2, 2.02), _row("galore", 4, 1.95),
            _row("apollo", 1, 2.03), _row("apollo", 2, 2.05),
            _row("lion", 1, 2.08), _row("lion", 0.5, 2.12), _row("mini", 1, 2.10), _row("mini", 2, 2.06),
            {"regime": "pretrain", "recipe": "x8bit", "lr_mult": 1.0, "status": "skipped", "reason": "needs a CUDA GPU"}]
    s = quality.summarize(rows, ["pretrain"], ["adamw", "galore", "apollo", "lion", "mini", "x8bit"])["pretrain"]
    assert s["adamw"]["gap_pct"] == 0 and not s["adamw"]["lossy_at_your_lr"]
    assert s["galore"]["gap_pct"] == pytest.approx(5.0) and s["galore"]["lossy_at_your_lr"]
    assert s["galore"]["best_mult"] == 4 and s["galore"]["best_gap_pct"] == pytest.approx(-2.5)
    assert s["apollo"]["gap_pct"] == pytest.approx(1.5) and not s["apollo"]["lossy_at_your_lr"]
    assert s["x8bit"]["status"] == "needs a CUDA GPU"
    table = quality.markdown({"pretrain": s}, {"pretrain": {"lr": 1e-3, "steps": 300, "seq": 512, "batch": 16}})
    galore_line = next(line for line in table.splitlines() if line.startswith("| galore "))
    assert "+5.00%" in galore_line and "**lossy-at-your-lr, use lr x4**" in galore_line and "none (CPU)" in galore_line
    assert "lossy" not in next(line for line in table.splitlines() if line.startswith("| apollo "))
    assert "| x8bit | | | | | | needs a CUDA GPU |" in table
    # lossy at x1 and no multiplier of the grid within 2%: no multiplier is offered as the fix
    for name, best in (("lion", 1), ("mini", 2)):
        line = next(x for x in table.splitlines() if x.startswith(f"| {name} "))
        assert f"**lossy-at-your-lr, and at every lr run (best x{best})**" in line and "use lr" not in line


def test_end_to_end_two_parallel_jobs_on_the_cpu(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 400)
    out = tmp_path / "q.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), "--smoke", "--regimes", "pretrain",
                        "--recipes", "adamw,apollo-mini,no-such-plugin", "--lr-mults", "1,4", "--jobs", "2",
                        "--corpus", str(corpus), "--out", str(out)], capture_output=True, text=True, env=env,
                       cwd=str(ROOT), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    ok = [x for x in rep["rows"] if x["status"] == "ok"]
    assert sorted((x["recipe"], x["lr_mult"]) for x in ok) == [("adamw", 1.0), ("adamw", 4.0), ("apollo-mini", 1.0),
                                                               ("apollo-mini", 4.0)]
    assert all(x["peak_gpu_gib"] is None and x["eval_loss"] > 0 for x in ok)
    s = rep["summary"]["pretrain"]
    assert "not registered" in s["no-such-plugin"]["status"]
    assert s["apollo-mini"]["mults_run"] == [1.0, 4.0] and "gap_pct" in s["apollo-mini"]
    assert "| apollo-mini |" in r.stdout and rep["config"]["jobs"] == 2


# ---- bench/quality_gpu_tables.py: merging the GPU runs' files, the written tables --------------------------------
def _report(path, rows, defined=None):
    path.write_text(json.dumps({"summary": {"pretrain": {r["recipe"]: {} for r in rows}},
                                "config": {"defined": defined or {}}, "rows": rows}))
    return str(path)


def test_a_later_file_fills_only_what_the_earlier_lack_against_its_own_adamw(tmp_path):
    tables = bench_module("quality_gpu_tables")
    first = _report(tmp_path / "a.json", [_row("adamw", 1, 2.00), _row("opt", 1, 2.10), _row("opt", 2, 2.30),
                                          {**_row("late", 1, None, status="timeout"), "wall_s": 300}])
    second = _report(tmp_path / "b.json", [_row("adamw", 1, 2.20), _row("opt", 1, 9.99), _row("opt", 0.5, 2.29),
                                           _row("late", 1, 2.42), _row("adamw", 0.5, 2.10),
                                           {**_row("opt", 8, None, status="skipped"), "reason": "budget"}])
    s = tables.merged([first, second])
    opt = s["opt"]
    assert opt["rows"][1.0]["eval_loss"] == 2.10 and opt["rows"][1.0]["file"] == first  # the first x1 is kept
    assert opt["rows"][0.5]["gap_pct"] == 4.09 and opt["rows"][0.5]["file"] == second  # against b's AdamW, 2.20
    # x0.5 has a higher loss than x1 (2.29 > 2.10) but the lower gap, each against its own file's AdamW
    assert opt["rows"][2.0]["gap_pct"] == 15.0 and (opt["best_mult"], opt["best_gap_pct"]) == (0.5, 4.09)
    assert opt["mults"] == (0.5, 1.0, 2.0) and opt["skipped"] == {8.0: "budget"}  # a later file's skip is named
    assert s["late"]["gap_pct"] == 10.0 and s["late"]["skipped"] == {}  # the timed-out x1, filled by b
    assert (s["adamw"]["best_mult"], s["adamw"]["best_gap_pct"]) == (0.5, -4.55)  # 2.10 against b's 2.20


def test_the_readme_table_marks_lossy_at_your_lr_and_leaves_out_defined_recipes(tmp_path, monkeypatch):
    from hf_lowmem_plugins.lr_evidence import Run

    tables = bench_module("quality_gpu_tables")
    rows = [_row("adamw", 1, 2.00), _row("adamw", 2, 1.98), _row("good", 1, 2.01), _row("good", 2, 1.99),
            _row("bad", 1, 2.20), _row("bad", 0.5, 2.10), _row("fixed", 1, 2.10), _row("fixed", 4, 2.02),
            _row("int8-weights", 1, 2.00), _row("scaled", 1, 2.50)]
    f = _report(tmp_path / "a.json", rows, defined={"scaled": {"lowmem_optimizer": "good"}})
    monkeypatch.setattr(tables, "RUNS", {"r": Run("tiny pretraining", "a test", (f,), (0.5, 1.0, 2.0, 4.0))})
    text = tables.readme_table({"r": tables.merged([f])})
    lines = {x.split(" | ")[0]: x for x in text.splitlines() if x.startswith("| `")}
    assert list(lines) == ["| `adamw`", "| `int8-weights`", "| `good`", "| `fixed`", "| `bad`"]  # worse gap last
    assert "scaled" not in text  # a --define variant is for quality_gpu.md, not the README
    assert lines["| `adamw`"] == "| `adamw` | reference, 2.0000 | x2: -1.00% |"
    assert lines["| `bad`"] == "| `bad` | **+10.00%** | x0.5: +5.00% |"
    assert lines["| `fixed`"] == "| `fixed` | **+5.00%** | x4: +1.00% |" and "| x1 only |" in lines["| `int8-weights`"]
    assert "in tiny pretraining `fixed`, `bad` (a multiplier of the grid brings `fixed` within 2%)" in text


def test_the_committed_tables_are_what_the_json_files_say():
    """README.md's quality table and bench/results/quality_gpu.md's tables are bench/quality_gpu_tables.py's output
    from the files of lr_evidence.RUNS (python bench/quality_gpu_tables.py --write refreshes them)."""
    tables = bench_module("quality_gpu_tables")
    summaries = {key: tables.merged(list(run.files)) for key, run in tables.RUNS.items()}
    for rel, (begin, end, make) in tables.TARGETS.items():
        assert tables.between((ROOT / rel).read_text(), begin, end) == make(summaries), \
            f"{rel}: stale quality tables: python bench/quality_gpu_tables.py --write"
    assert tables.main(["--check"]) == 0
