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
    r = sh([str(BIN), "demo", "--steps", "6", "--cpu", "--json", "--output_dir", str(tmp_path)], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)  # with --json, stdout is the JSON alone
    assert summary["device"] == "cpu" and summary["steps"] == 6 and summary["params_m"] > 0.5
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["peak_host_rss_gib"] > 0 and summary["tokens_per_s"] > 0
    # --output_dir given: the trained model is saved there, ready for `hf-lowmem export`
    assert summary["saved_to"] == str(tmp_path) and (tmp_path / "model.safetensors").is_file()


def test_demo_prints_one_summary_and_leaves_no_folder_behind(tmp_path):
    r = sh([str(BIN), "demo", "--max-steps", "3", "--use_cpu"], timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []  # no empty out/demo
    out = r.stdout
    assert out.count("peak host RSS") == 1 and out.count("tokens/s") == 1, out
    assert out.count("hf-lowmem demo: loss ") == 1 and "eval loss" in out
    assert "K params" in out  # a count, not "0.79M" or "0.00B"


# ---- one flag style, one-line errors ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    from tests.tiny import tiny_config

    d = tmp_path_factory.mktemp("cfg")
    tiny_config(vocab_size=256).save_pretrained(d)
    (d / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 60)
    return d


@pytest.mark.parametrize("spelling", ["underscore", "dash"])
def test_plan_takes_the_trainers_flag_style_and_the_dashed_one(tiny_cfg, spelling):
    flags = ["--gpu_memory", "8GiB", "--host_memory", "16GiB", "--seq_len", "64", "--batch_size", "2", "--json"]
    if spelling == "dash":
        flags = [f.replace("_", "-") if f.startswith("--") else f for f in flags]
    r = sh([str(BIN), "plan", "--model", str(tiny_cfg / "config.json"), *flags])
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["gpu_budget_gib"] == 8.0 and plan["host_budget_gib"] == 16.0
    assert plan["setup"]["seq_len"] == 64 and plan["setup"]["micro_batch"] == 2


def test_every_subcommand_help_writes_flags_with_underscores():
    import re

    for cmd in ("demo", "plan", "export", "plugins", "train"):
        r = sh([str(BIN), cmd, "--help"])
        assert r.returncode == 0, (cmd, r.stderr)
        dashed = {f for f in re.findall(r"--[a-z0-9]+(?:[-_][a-z0-9]+)+", r.stdout) if "-" in f[2:]}
        assert not dashed - {"--help-all"}, (cmd, dashed)


def test_train_help_is_short_and_help_all_lists_every_flag():
    r = sh([str(BIN), "train", "--help"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) < 100, len(lines)
    for flag in ("--model", "--data", "--block_size", "--lowmem_optimizer", "--lowmem_offload", "--lowmem_options",
                 "--learning_rate", "--output_dir", "--config", "--help_all"):
        assert flag in r.stdout, flag
    assert "--adam_beta1" not in r.stdout
    r = sh([str(BIN), "train", "--help_all"])
    assert r.returncode == 0 and "--adam_beta1" in r.stdout and "--lowmem_plot" in r.stdout


def one_line_error(r, *fragments):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    for f in fragments:
        assert f in err[0], err[0]
    return err[0]


def test_train_errors_are_one_line(tmp_path, tiny_cfg):
    base = [str(BIN), "train", "--output_dir", str(tmp_path / "o"), "--use_cpu"]
    model, data = ["--model", str(tiny_cfg / "config.json")], ["--data", str(tiny_cfg / "text.txt")]
    one_line_error(sh(base + model + data + ["--lowmem_optimizer", "adamv"]), "unknown optimizer plugin 'adamv'", "adamw")
    one_line_error(sh(base + model), "the following arguments are required: --data", "hf-lowmem train --help")
    one_line_error(sh(base + model + data + ["--lowmem_optimiser", "adamw"]), "unknown flag --lowmem_optimiser",
                   "did you mean --lowmem_optimizer")
    one_line_error(sh(base + model + data + ["--lowmem_gpu_memory", "8"]), "'8GiB'")
    # local-looking paths that do not exist are refused at once, not looked up on the Hub
    hub = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    one_line_error(sh(base + model + ["--data", "nosuch.txt"], env=hub), "--data nosuch.txt: no such file or folder")
    one_line_error(sh(base + ["--model", "./nosuch"] + data, env=hub), "--model ./nosuch: no such file or folder")


def test_debug_shows_the_traceback(tmp_path, tiny_cfg):
    args = ["train", "--model", str(tiny_cfg / "config.json"), "--data", str(tiny_cfg / "text.txt"),
            "--output_dir", str(tmp_path), "--use_cpu", "--lowmem_optimizer", "adamv"]
    for r in (sh([str(BIN), "--debug", *args]), sh([str(BIN), *args], env={"HF_LOWMEM_DEBUG": "1"})):
        assert r.returncode != 0 and "Traceback" in r.stderr and "PluginError" in r.stderr


def test_plan_with_a_preset_typo_answers_without_asking_the_hub():
    # were the Hub asked, the answer would be a connection error (the endpoint refuses), not the suggestion
    r = sh([str(BIN), "plan", "--model", "llama-7b", "--gpu_memory", "8GiB"],
           env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})
    one_line_error(r, "--model llama-7b", "did you mean", "llama2-7b")


def test_train_reads_a_config_file_and_flags_override_it(tmp_path, tiny_cfg):
    import torch

    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model_name_or_path: {tiny_cfg / 'config.json'}\n"  # TRL's key for --model
        f"data: {tiny_cfg / 'text.txt'}\n"
        f"output_dir: {tmp_path / 'out'}\n"
        "max_steps: 2\nblock_size: 32\nper_device_train_batch_size: 2\nuse_cpu: true\nreport_to: none\n"
        "disable_tqdm: true\nlowmem_optimizer: adamw\nlowmem_offload: [gradient-checkpointing]\n"
        'lowmem_options: {"gradient-checkpointing": {"every_n": 2}}\n'
    )
    r = sh([str(BIN), "train", "--config", str(cfg), "--max_steps", "3", "--learning-rate", "0.01"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    args = torch.load(tmp_path / "out" / "training_args.bin", weights_only=False)
    assert args.max_steps == 3 and args.learning_rate == 0.01  # the command line wins
    assert args.per_device_train_batch_size == 2 and args.lowmem_offload == ["gradient-checkpointing"]
    assert args.lowmem_options == {"gradient-checkpointing": {"every_n": 2}}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"learning_rat": 0.1}))
    one_line_error(sh([str(BIN), "train", "--config", str(bad)]), "unknown key 'learning_rat'",
                   "did you mean learning_rate")


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


# ---- counts, times and sizes read right at every scale -----------------------------------------------------------
def test_plan_of_a_tiny_model_prints_counts_and_times_at_their_scale(tiny_cfg):
    r = sh([str(BIN), "plan", "--model", str(tiny_cfg / "config.json"), "--gpu_memory", "8GiB", "--host_memory", "16GiB"])
    assert r.returncode == 0, r.stderr
    model_line = next(ln for ln in r.stdout.splitlines() if ln.startswith("model:"))
    assert "K params" in model_line and "0.00B" not in model_line, model_line
    speed = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith("speed "))
    assert "0.00 s" not in speed and "M tokens/s" in speed and "µs per optimizer step" in speed, speed


def test_fmt_helpers():
    from hf_lowmem.sizes import fmt_count, fmt_seconds

    assert [fmt_count(n) for n in (812, 48_300, 791_808, 135e6, 6.74e9)] == ["812", "48.3K", "792K", "135M", "6.74B"]
    assert [fmt_seconds(s) for s in (4.83e-6, 0.0417, 3.214, 750, 8640)] == ["4.83 µs", "41.7 ms", "3.21 s",
                                                                              "12.5 min", "2.4 h"]


def test_the_trainer_says_which_plugins_are_active_and_what_they_replaced(tmp_path, capsys):
    from hf_lowmem import LowMemTrainer
    from tests.tiny import RandomTokens, tiny_model, train_args

    LowMemTrainer(model=tiny_model(), args=train_args(tmp_path, lowmem_optimizer="adamw", optim="adafactor",
                                                      lowmem_offload=["gradient-checkpointing"]),
                  train_dataset=RandomTokens(n=4))
    LowMemTrainer(model=tiny_model(), args=train_args(tmp_path), train_dataset=RandomTokens(n=4))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("hf-lowmem: ")]
    assert lines == ["hf-lowmem: optimizer adamw (instead of optim=adafactor), offload gradient-checkpointing",
                     "hf-lowmem: no plugin selected: the plain Trainer (`hf-lowmem plugins` lists them)"]
