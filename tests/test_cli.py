"""The package imports cheaply, and the ``hf-lowmem`` command works: ``--help``, ``plugins`` (with a
broken third-party plugin present), ``train`` and ``demo``. Everything runs in subprocesses, as a user
would run it."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_plugins import BROKEN_AT_IMPORT, first_party_entry_points, make_dist

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent / "hf-lowmem"
VERSION = importlib.metadata.version("hf-lowmem")


def sh(args, env=None, timeout=120, cwd=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_LOWMEM_")}
    full_env.update(env or {})
    return subprocess.run(args, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd or ROOT)


def python(code, **kw):
    return sh([sys.executable, "-c", code], **kw)


# ---- import is cheap ------------------------------------------------------------------------------------
def test_import_loads_no_plugin_no_torch_no_transformers():
    r = python(
        "import sys, hf_lowmem\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'accelerate', "
        "'hf_lowmem_plugins', 'bitsandbytes', 'galore_torch', 'deepspeed', 'onnx', 'trl'))\n"
        "print(heavy, hf_lowmem.__version__, 'hf_lowmem.plugins' in sys.modules)"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[]", VERSION, "False"]


def test_importing_the_trainer_initialises_no_cuda_and_loads_no_plugin():
    r = python(
        "import sys, torch\n"
        "from hf_lowmem import LowMemTrainer, LowMemTrainingArguments, lowmem_trainer_class, hookimpl\n"
        "import hf_lowmem.plugins as p\n"
        "print(torch.cuda.is_initialized(), p._default_host is None,"
        " any(m.startswith('hf_lowmem_plugins') for m in sys.modules))"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True", "False"]


def test_loading_plugins_initialises_no_cuda_and_imports_no_optional_package():
    r = python(
        "import sys, torch\n"
        "from hf_lowmem.plugins import load_plugins\n"
        "host = load_plugins()\n"
        "opt = sorted({m.split('.')[0] for m in sys.modules} & {'bitsandbytes', 'galore_torch', 'deepspeed', "
        "'flash_attn', 'onnx', 'onnxruntime', 'onnxscript', 'trl'})\n"
        "print(torch.cuda.is_initialized(), opt, len(host.registry) > 0)"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "[]", "True"]


# ---- hf-lowmem --------------------------------------------------------------------------------------------
def test_help_is_fast_and_imports_nothing_heavy():
    r = sh([str(BIN), "--help"])
    assert r.returncode == 0, r.stderr
    for cmd in ("demo", "train", "plugins"):
        assert cmd in r.stdout
    r = python("import sys\nfrom hf_lowmem.cli import main\n"
               "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
               "print('torch' in sys.modules, 'transformers' in sys.modules)")
    assert r.stdout.split()[-2:] == ["False", "False"], r.stdout


def test_version_and_unknown_command():
    r = sh([str(BIN), "--version"])
    assert r.returncode == 0 and r.stdout.strip() == f"hf-lowmem {VERSION}"
    r = sh([str(BIN), "bogus"])
    assert r.returncode == 2 and "invalid choice: 'bogus'" in r.stderr


def test_plugins_lists_every_first_party_plugin():
    from hf_lowmem.plugins import load_plugins

    host = load_plugins()
    r = sh([str(BIN), "plugins"])
    assert r.returncode == 0, r.stderr
    header, *lines = r.stdout.splitlines()
    assert header.split()[:5] == ["KIND", "NAME", "DISTRIBUTION", "VERSION", "DEPENDENCIES"]
    rows = {line.split()[1]: line.split() for line in lines if line and not line.startswith(("FAILED", "blocked", " "))}
    assert set(host.registry.names()) <= set(rows)
    for info in host.registry:
        kind, name, dist, version, deps = rows[info.name][:5]
        assert (kind, dist, version) == (info.kind, "hf-lowmem", VERSION)
        assert deps in ("ok", "missing"), rows[info.name]
    assert "adamw" in rows and "FAILED TO LOAD" not in r.stdout


def test_plugins_json():
    r = sh([str(BIN), "plugins", "--json"])
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["failed"] == [] and data["blocked"] == []
    by_name = {p["name"]: p for p in data["plugins"]}
    assert by_name["adamw"]["entry_point"] == "core" and by_name["adamw"]["dependencies"] == "ok"
    assert set(by_name["adamw"]) >= {"kind", "name", "distribution", "version", "dependencies", "modes", "lossless", "help"}


def test_plugins_survives_a_broken_third_party_plugin(tmp_path):
    site = make_dist(tmp_path / "site", "broken-dist", {"broken_mod": BROKEN_AT_IMPORT}, {"broken": "broken_mod"},
                     version="6.6.6")
    env = {"PYTHONPATH": str(site)}
    r = sh([str(BIN), "plugins", "--verbose"], env=env)
    assert r.returncode == 0, r.stderr
    assert "adamw" in r.stdout
    assert "FAILED TO LOAD: plugin 'broken' from distribution 'broken-dist' failed to load: RuntimeError: boom" in r.stdout
    assert "Traceback" in r.stdout and "broken_mod.py" in r.stdout
    r = sh([str(BIN), "plugins", "--json"], env=env)
    assert json.loads(r.stdout)["failed"][0]["distribution"] == "broken-dist"
    r = sh([str(BIN), "plugins"], env={**env, "HF_LOWMEM_DISABLE_PLUGINS": "broken-dist"})
    assert "FAILED" not in r.stdout and "blocked by HF_LOWMEM_PLUGINS / HF_LOWMEM_DISABLE_PLUGINS: broken" in r.stdout


def test_plugins_with_an_allow_list_shows_what_is_blocked():
    r = sh([str(BIN), "plugins"], env={"HF_LOWMEM_PLUGINS": "core"})
    assert r.returncode == 0
    blocked = r.stdout.split("blocked by HF_LOWMEM_PLUGINS / HF_LOWMEM_DISABLE_PLUGINS: ")[1].strip().split(", ")
    assert set(blocked) == set(first_party_entry_points()) - {"core"}


def test_train_help_lists_model_data_and_lowmem_flags():
    r = sh([str(BIN), "train", "--help"])
    assert r.returncode == 0, r.stderr
    for flag in ("--model", "--data", "--block_size", "--lowmem_optimizer", "--lowmem_offload", "--lowmem_options",
                 "--learning_rate", "--output_dir"):
        assert flag in r.stdout, flag


def test_train_from_a_config_and_a_text_folder(tmp_path):
    from tests.tiny import tiny_config

    tiny_config(vocab_size=256).save_pretrained(tmp_path / "cfg")
    (tmp_path / "text").mkdir()
    for i in range(3):
        (tmp_path / "text" / f"{i}.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    r = sh([str(BIN), "train", "--model", str(tmp_path / "cfg" / "config.json"), "--data", str(tmp_path / "text"),
            "--output_dir", str(tmp_path / "out"), "--max_steps", "3", "--block_size", "32",
            "--per_device_train_batch_size", "2", "--use_cpu", "--report_to", "none", "--eval_fraction", "0.2",
            "--lowmem_optimizer", "adamw", "--logging_steps", "1", "--disable_tqdm", "true"], timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "config.json").exists()
    assert "eval_loss" in r.stdout


def test_train_rejects_an_unknown_plugin_before_loading_the_model(tmp_path):
    r = sh([str(BIN), "train", "--model", str(tmp_path / "does-not-exist.json"), "--data", str(tmp_path),
            "--output_dir", str(tmp_path / "o"), "--use_cpu", "--lowmem_optimizer", "adamv"])
    assert r.returncode != 0
    assert "unknown optimizer plugin 'adamv'. Available: " in r.stderr and "adamw" in r.stderr


def test_demo_short_run(tmp_path):
    r = sh([str(BIN), "demo", "--steps", "6", "--cpu", "--json", "--output-dir", str(tmp_path)], timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["device"] == "cpu" and summary["steps"] == 6 and summary["params_m"] > 0.5
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["peak_host_rss_gib"] > 0


@pytest.mark.slow
def test_demo_default_run_shows_the_loss_falling(tmp_path):
    """The README's main command, as stated (300 steps), within the issue's budget of 3 minutes on a
    2-core CPU. Wall time depends on what else the machine runs: the CPU time is in the message."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = sh([str(BIN), "demo", "--json", "--cpu", "--output-dir", str(tmp_path)], timeout=900)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["last_logged_loss"] < 0.7 * s["first_logged_loss"]
    assert s["eval_loss_after"] < s["eval_loss_before"]
    assert s["seconds"] < 180, f"demo training took {s['seconds']} s of wall time ({cpu:.0f} s of CPU time)"


# ---- README and CI agree ----------------------------------------------------------------------------------------
def readme_commands() -> list[str]:
    import re

    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start")[1].split("\n## ")[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", quick, re.S)]


def test_readme_quick_start_is_what_ci_runs():
    install, demo, tests = readme_commands()
    assert demo == "hf-lowmem demo"
    ci = (ROOT / ".ci" / "run").read_text()
    ci_lines = [ln.strip() for ln in ci.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert tests in ci_lines, f"README test command {tests!r} is not what .ci/run calls"
    # the same install: torch pinned first, then the package with the extras the tests need
    torch_pin, package = [c.strip() for c in install.split("&&")]
    assert ci_lines.index(torch_pin) + 1 == ci_lines.index(package)
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def test_readme_plugin_table_lists_every_first_party_plugin():
    from hf_lowmem.plugins import load_plugins

    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- plugin-table:begin -->")[1].split("<!-- plugin-table:end -->")[0]
    listed = {line.split("|")[2].strip().strip("`") for line in table.strip().splitlines()[2:]}
    first_party = {i.name for i in load_plugins().registry if i.distribution == "hf-lowmem"}
    assert listed == first_party, "README plugin table is stale: python examples/plugin_table.py --write"
