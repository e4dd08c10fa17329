"""``accelerate launch`` of examples/train_tiny.py with the shipped configs, on the CPU (gloo).

DDP on 2 processes with micro-batch b must give the losses of one process with micro-batch 2b: the
2 ranks see the two halves of the same batch and their gradients are averaged. Checked with the
Trainer's own optimizer and with optimizer plugins that declare DDP (galore layer-wise: test_ddp.py).
The FSDP2 config is launched too; on the CPU accelerate runs it as multi-CPU DDP (FSDP needs GPUs).

Note on the launcher: in accelerate 1.x, ``accelerate launch --cpu --num_processes 2`` starts ONE process
(the simple launcher; multi-CPU needs mpirun). The configs in examples/accelerate/ (MULTI_GPU, FSDP) start
N processes through torchrun; on a machine without GPUs those use gloo on the CPU. The tests assert the
world size, so a launch that silently ran one process would fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CONFIGS = EXAMPLES / "accelerate"
ACCELERATE = Path(sys.executable).parent / "accelerate"
STEPS = 4


def launch(config: str, script_args: list[str], tmp_path: Path, nproc: int = 2, env: dict | None = None,
           timeout: int = 150) -> tuple[subprocess.CompletedProcess, float]:
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_LOWMEM_", "ACCELERATE_", "WORLD_SIZE", "RANK"))}
    run_env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    run_env.update(env or {})
    cmd = [str(ACCELERATE), "launch", "--config_file", str(CONFIGS / config), "--num_processes", str(nproc),
           "--mixed_precision", "no", "--main_process_port", "0", str(EXAMPLES / "train_tiny.py"),
           "--output-dir", str(tmp_path / "out"), *script_args]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=run_env, timeout=timeout, cwd=tmp_path)
    return r, time.perf_counter() - t0


def train_tiny_in_process(argv: list[str]) -> dict:
    """The single-process reference, run in this process (saves an interpreter start)."""
    spec = importlib.util.spec_from_file_location("train_tiny_example", EXAMPLES / "train_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from hf_lowmem.plugins import reset_plugin_host

    reset_plugin_host()
    return mod.main(argv)


def single_via_launch(tmp_path, extra: list[str]) -> dict:
    """The single-process reference through ``accelerate launch --config_file single_gpu.yaml``."""
    out = tmp_path / "single.json"
    r, _ = launch("single_gpu.yaml", ["--losses-out", str(out), *extra], tmp_path, nproc=1)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(out.read_text())


def ddp_matches_single(tmp_path, config: str, extra: list[str], tol: float = 1e-5, launch_single: bool = False) -> dict:
    out = tmp_path / "losses.json"
    r, seconds = launch(config, ["--steps", str(STEPS), "--batch-size", "2", "--losses-out", str(out), *extra], tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    dist = json.loads(out.read_text())
    single_args = ["--steps", str(STEPS), "--batch-size", "4", "--output-dir", str(tmp_path / "s"), *extra]
    single = single_via_launch(tmp_path, single_args) if launch_single else train_tiny_in_process(single_args)
    assert dist["world_size"] == 2 and single["world_size"] == 1 and single["mode"] == "single"
    assert dist["optimizer"] == single["optimizer"]
    assert len(dist["losses"]) == len(single["losses"]) == STEPS
    assert dist["losses"] == pytest.approx(single["losses"], abs=tol, rel=0)
    assert dist["grad_norms"] == pytest.approx(single["grad_norms"], abs=tol, rel=0)
    assert single["losses"][-1] < single["losses"][0]  # it trained
    dist["seconds"] = seconds
    return dist


@pytest.mark.parametrize("optimizer,extra", [
    (None, []),
    ("adamw", ["--grad-accum", "2"]),
    ("bnb-adamw8bit", []),
])
def test_ddp_two_processes_equal_one_process_with_twice_the_micro_batch(tmp_path, optimizer, extra):
    args = [*extra] + (["--optimizer", optimizer] if optimizer else [])
    # the first case also runs the reference through single_gpu.yaml, so that config is launched for real
    dist = ddp_matches_single(tmp_path, "ddp.yaml", args, launch_single=optimizer is None)
    assert dist["mode"] == "ddp"
    assert dist["plugins"] == ([optimizer] if optimizer else [])


def test_fsdp2_config_launches_two_processes_in_fsdp_mode(tmp_path):
    """accelerate runs FSDP on GPUs only: on the CPU it turns an FSDP config into multi-CPU DDP. What this
    checks here is the launch itself and that every rank sees mode "fsdp" (so plugins that do not declare
    FSDP are refused, see test_ddp.py) and trains with a plugin that declares it. Real FSDP2 sharding is
    measured on GPUs by bench/multigpu.py."""
    dist = ddp_matches_single(tmp_path, "fsdp2.yaml", ["--optimizer", "adamw"])
    assert dist["mode"] == "fsdp" and dist["plugins"] == ["adamw"]


# ---- the configs themselves ----------------------------------------------------------------------------------
EXPECTED = {
    "single_gpu.yaml": ("NO", {}),
    "ddp.yaml": ("MULTI_GPU", {}),
    "fsdp2.yaml": ("FSDP", {"fsdp_version": 2}),
    "deepspeed_zero2.yaml": ("DEEPSPEED", {"zero_stage": 2, "offload_param_device": "none"}),
    "deepspeed_zero3.yaml": ("DEEPSPEED", {"zero_stage": 3, "offload_param_device": "none"}),
    "deepspeed_zero3_offload.yaml": ("DEEPSPEED", {"zero_stage": 3, "offload_param_device": "cpu",
                                                   "offload_optimizer_device": "cpu"}),
}


def test_every_config_is_shipped_and_parsed_by_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
    for name, (dtype, keys) in EXPECTED.items():
        cfg = load_config_from_file(str(CONFIGS / name))
        assert cfg.distributed_type.value == dtype, name
        section = cfg.fsdp_config if dtype == "FSDP" else cfg.deepspeed_config
        for k, v in keys.items():
            assert section[k] == v, (name, k)
        if dtype == "DEEPSPEED":
            # left to the TrainingArguments, so the two can never disagree
            assert "gradient_accumulation_steps" not in section and "gradient_clipping" not in section
        assert (CONFIGS / name).read_text().startswith("#"), f"{name} has no usage comment"
