"""Every fenced code block of the README runs, on the CPU, as written.

Each block is found by its first line and run in a fresh process: bash blocks with ``bash -c``, Python
blocks with ``python -c``. Where a block needs something the README leaves to the reader (a ``model``, a
dataset) a *prelude* defines it from tests/tiny.py; where a block states a GPU setting, the substitution
is named here (``SUBSTITUTIONS``), applied only on a machine without CUDA, and checked to apply. The install
and test commands are what .ci/run runs (tests/test_cli.py checks they agree). A new block with no test
here fails ``test_every_readme_block_has_a_test``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.tiny import machine_gpus

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def readme_blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block, in order."""
    text = (ROOT / "README.md").read_text()
    return [(lang, body) for lang, body in re.findall(r"^```(\w+)\n(.*?)^```", text, re.DOTALL | re.MULTILINE)]


def block(first_line: str) -> str:
    found = [body for _, body in readme_blocks() if body.splitlines()[0].strip() == first_line]
    assert len(found) == 1, f"README block starting {first_line!r}: found {len(found)}"
    return found[0]


#: the first line of each block -> the test that runs it
TESTED = {
    "pip install torch==2.13.0 && pip install -e '.[test,onnx]'": "tests/test_cli.py::test_readme_quick_start_is_what_ci_runs (.ci/run runs it)",
    "hf-lowmem demo": "test_main_job",
    "python -m pytest -q": "tests/test_cli.py::test_readme_quick_start_is_what_ci_runs (.ci/run runs it)",
    "from hf_lowmem import LowMemTrainer as Trainer, LowMemTrainingArguments as TrainingArguments  # 1": "test_two_line_switch",
    "from trl import SFTConfig, SFTTrainer": "test_trl",
    "hf-lowmem train --config examples/train.yaml --max_steps 20": "test_train_with_a_config",
    "accelerate launch --config_file examples/accelerate/ddp.yaml --num_processes 4 examples/train_tiny.py --optimizer bnb-adamw8bit": "test_accelerate_launch",
    "accelerate launch --config_file examples/accelerate/ddp.yaml --num_processes 2 examples/train_tiny.py --offload stream": "test_accelerate_launch_stream",
    'args = LowMemTrainingArguments(output_dir="out", bf16=True, per_device_train_batch_size=4,': "test_seven_b_arguments",
    "hf-lowmem plan --model llama2-7b --gpu_memory 8GiB --host_memory 64GiB --seq_len 2048 --batch_size 4 --grad_accum 8": "test_plan",
    "hf-lowmem demo --max_steps 60 --output_dir out/demo": "test_demo_export_generate",
    "import onnxruntime as ort": "test_demo_export_generate",
    "[project.entry-points.hf_lowmem]": "test_writing_a_plugin",
    "# my_package/plugin.py": "test_writing_a_plugin",
    "# tests/test_my_sgd.py": "tests/test_plugins.py::test_the_readme_walks_through_a_plugin_with_a_memory_model_and_its_test",
}

#: (README text, what runs on a machine without CUDA): GPU settings made runnable on the CPU
SUBSTITUTIONS = {
    "bf16": ("bf16=True,", "bf16=True, use_cpu=True,"),  # the Trainer refuses bf16 without a GPU unless use_cpu
    "trl_cpu": ('(output_dir="out", lowmem_optimizer', '(output_dir="out", use_cpu=True, lowmem_optimizer'),  # SFTConfig: bf16
    "ddp_cpu": ("--num_processes 4", "--num_processes 2 --mixed_precision no --main_process_port 0"),  # < 4 GPUs: CPU
    "ddp2_cpu": ("--num_processes 2", "--num_processes 2 --mixed_precision no --main_process_port 0"),  # < 2 GPUs: CPU
}

GPUS, ALL_GPUS = machine_gpus()  # all of the machine's GPUs, and the environment that shows them to a launch
CUDA = GPUS > 0


def substitute(text: str, *names: str, apply: bool | None = None) -> str:
    """The named substitutions, applied where there is no GPU (or where ``apply`` says)."""
    for name in names:
        old, new = SUBSTITUTIONS[name]
        assert old in text, f"substitution {name!r} no longer applies: {old!r} is not in the README block"
        if (not CUDA) if apply is None else apply:
            text = text.replace(old, new)
    return text


def env(**extra: str) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("HF_LOWMEM_")}
    e.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT),
              "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}, **extra)
    return e


def run_bash(text: str, cwd: Path, timeout: int = 1800, **extra_env: str) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", text], check=False, capture_output=True, text=True, cwd=cwd,
                       env=env(**extra_env), timeout=timeout)
    assert r.returncode == 0, f"{text}\n--- stderr:\n{r.stderr[-4000:]}"
    return r


def run_python(code: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=cwd, env=env(), timeout=timeout)
    assert r.returncode == 0, f"{code}\n--- stderr:\n{r.stderr[-4000:]}"
    return r


def result_line(r: subprocess.CompletedProcess) -> dict:
    """The JSON a check printed last, prefixed ``RESULT``."""
    return json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])


# ---- the inventory -------------------------------------------------------------------------------------------
def test_every_readme_block_has_a_test():
    firsts = [body.splitlines()[0].strip() for _, body in readme_blocks()]
    assert sorted(firsts) == sorted(TESTED), "a README block without a test here (or a test without its block)"
    assert {lang for lang, _ in readme_blocks()} <= {"bash", "python", "toml"}


def test_install_and_test_commands_are_what_ci_runs():
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert block("python -m pytest -q").strip() in ci
    for part in block("pip install torch==2.13.0 && pip install -e '.[test,onnx]'").strip().split(" && "):
        assert part in ci


# ---- the blocks ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_main_job(tmp_path):
    """`hf-lowmem demo` as written: 300 steps, the loss falls. Its time is in notes/first-hour.md, not asserted."""
    r = run_bash(block("hf-lowmem demo"), tmp_path, timeout=3600)
    m = re.search(r"hf-lowmem demo: loss ([\d.]+) -> ([\d.]+) .*eval loss ([\d.]+) -> ([\d.]+)", r.stdout)
    assert m, r.stdout[-2000:]
    first, last, eval_before, eval_after = map(float, m.groups())
    assert last < 0.7 * first and eval_after < eval_before
    assert list(tmp_path.iterdir()) == []  # leaves nothing behind


TINY = """
from tests.tiny import RandomTokens, tiny_model
model, train_dataset = tiny_model(), RandomTokens(n=8, seq=16)
"""


def test_two_line_switch(tmp_path):
    code = TINY + substitute(block(
        "from hf_lowmem import LowMemTrainer as Trainer, LowMemTrainingArguments as TrainingArguments  # 1"), "bf16")
    code += textwrap.dedent("""
        import json
        print("RESULT", json.dumps({"steps": trainer.state.global_step, "optimizer": type(trainer.optimizer.optimizer).__name__,
                                    "plugins": trainer.lowmem_ctx.selection.names()}))
    """)
    res = result_line(run_python(code, tmp_path))
    assert res["steps"] == 6 and res["optimizer"] == "AdamW8bit"
    assert set(res["plugins"]) == {"bnb-adamw8bit", "gradient-checkpointing"}


def test_trl(tmp_path):
    pytest.importorskip("trl")
    prelude = TINY + textwrap.dedent("""
        import datasets
        from tests.test_trainer import tiny_tokenizer
        ds = datasets.Dataset.from_list([{"input_ids": train_dataset[i]["input_ids"].tolist()} for i in range(8)])
        tok = tiny_tokenizer()
    """)
    code = prelude + substitute(block("from trl import SFTConfig, SFTTrainer"), "trl_cpu") + textwrap.dedent("""
        import json
        print("RESULT", json.dumps({"steps": trainer.state.global_step, "cls": type(trainer).__name__,
                                    "optimizer": type(trainer.optimizer.optimizer).__name__}))
    """)
    res = result_line(run_python(code, tmp_path))
    assert res["steps"] > 0 and res["optimizer"] == "AdamW8bit" and "SFTTrainer" in res["cls"]


def test_train_with_a_config(tmp_path):
    """Run from the repository root (the config's paths are relative to it); the one addition: an
    --output_dir in tmp_path, so that the test writes nothing into the checkout."""
    text = block("hf-lowmem train --config examples/train.yaml --max_steps 20").strip()
    r = run_bash(f"{text} --output_dir {tmp_path / 'out'}", ROOT)
    losses = [float(x) for x in re.findall(r"'loss': '([\d.]+)'", r.stdout)]
    assert len(losses) == 2 and losses[-1] < losses[0], r.stdout[-2000:]  # logging_steps 10 of 20 steps
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.slow
def test_accelerate_launch(tmp_path):
    """As written on 4+ GPUs; elsewhere on 2 CPU processes (with fewer than 4 GPUs, the GPUs are hidden)."""
    on_cpu = GPUS < 4
    text = substitute(block("accelerate launch --config_file examples/accelerate/ddp.yaml --num_processes 4 "
                            "examples/train_tiny.py --optimizer bnb-adamw8bit"), "ddp_cpu", apply=on_cpu)
    text = text.replace("examples/", f"{ROOT}/examples/")  # run from tmp_path: the example writes out/ there
    run_bash(f"{text.strip()} --losses-out {tmp_path / 'losses.json'}", tmp_path,
             **({"CUDA_VISIBLE_DEVICES": ""} if on_cpu else ALL_GPUS))
    res = json.loads((tmp_path / "losses.json").read_text())
    assert res["world_size"] == (2 if on_cpu else 4) and res["mode"] == "ddp" and res["plugins"] == ["bnb-adamw8bit"]
    assert res["losses"][-1] < res["losses"][0]


def test_accelerate_launch_stream(tmp_path):
    """The stream engine under accelerate launch: as written on 2+ GPUs; elsewhere on 2 CPU processes (gloo)."""
    on_cpu = GPUS < 2
    text = substitute(block("accelerate launch --config_file examples/accelerate/ddp.yaml --num_processes 2 "
                            "examples/train_tiny.py --offload stream"), "ddp2_cpu", apply=on_cpu)
    text = text.replace("examples/", f"{ROOT}/examples/")
    run_bash(f"{text.strip()} --losses-out {tmp_path / 'losses.json'}", tmp_path,
             **({"CUDA_VISIBLE_DEVICES": ""} if on_cpu else ALL_GPUS))
    res = json.loads((tmp_path / "losses.json").read_text())
    assert res["world_size"] == 2 and res["plugins"] == ["stream"] and res["optimizer"] == "StreamAdamW"
    assert res["losses"][-1] < res["losses"][0]


def test_seven_b_arguments(tmp_path):
    code = "from hf_lowmem import LowMemTrainingArguments\n" + substitute(
        block('args = LowMemTrainingArguments(output_dir="out", bf16=True, per_device_train_batch_size=4,'), "bf16")
    code += ('\nfrom hf_lowmem.engine.stream_options import StreamOptions\n'
             'opts = StreamOptions(**args.lowmem_options["stream"])\n'
             'print("RESULT", __import__("json").dumps({"offload": args.lowmem_offload, "tier": opts.tier, '
             '"workers": args.dataloader_num_workers}))\n')
    res = result_line(run_python(code, tmp_path))
    assert res == {"offload": ["stream"], "tier": "compact", "workers": 2}


def test_plan(tmp_path):
    r = run_bash(block("hf-lowmem plan --model llama2-7b --gpu_memory 8GiB --host_memory 64GiB --seq_len 2048 "
                       "--batch_size 4 --grad_accum 8"), tmp_path)
    assert "PLAN: stream(tier=compact) + adamw" in r.stdout and "6.74B params" in r.stdout


@pytest.mark.slow
def test_demo_export_generate(tmp_path):
    pytest.importorskip("onnxruntime")
    r = run_bash(block("hf-lowmem demo --max_steps 60 --output_dir out/demo"), tmp_path)
    assert "KV cache" in r.stdout and "equals PyTorch's" in r.stdout, r.stdout[-2000:]
    assert (tmp_path / "out" / "demo-onnx" / "model.onnx").is_file()
    r = run_python(block("import onnxruntime as ort"), tmp_path)
    assert len(r.stdout.rstrip("\n")) >= 10  # 20 generated bytes, decoded


def test_writing_a_plugin(tmp_path):
    """The README's pyproject entry point and module, laid out as pip installs a distribution, then
    selected by name in a short run."""
    toml = block("[project.entry-points.hf_lowmem]")
    try:
        import tomllib

        entry_points = tomllib.loads(toml)["project"]["entry-points"]["hf_lowmem"]
    except ImportError:  # Python 3.10
        entry_points = dict(re.findall(r'^(\w+)\s*=\s*"([^"]+)"', toml, re.MULTILINE))
    module = block("# my_package/plugin.py")
    site = tmp_path / "site"
    (site / "my_package").mkdir(parents=True)
    (site / "my_package" / "__init__.py").write_text("")
    (site / "my_package" / "plugin.py").write_text(module)
    info = site / "my_package-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-package\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[hf_lowmem]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    code = f"import sys; sys.path.insert(0, {str(site)!r})\n" + TINY + textwrap.dedent("""
        import json
        from hf_lowmem import LowMemTrainer, LowMemTrainingArguments
        args = LowMemTrainingArguments(output_dir="out", max_steps=2, per_device_train_batch_size=4, use_cpu=True,
                                       report_to="none", lowmem_optimizer="my-sgd")
        trainer = LowMemTrainer(model=model, args=args, train_dataset=train_dataset)
        trainer.train()
        opt = trainer.optimizer.optimizer
        print("RESULT", json.dumps({"cls": type(opt).__name__, "momentum": opt.param_groups[0]["momentum"],
                                    "steps": trainer.state.global_step}))
    """)
    res = result_line(run_python(code, tmp_path))
    assert res == {"cls": "SGD", "momentum": 0.9, "steps": 2}
