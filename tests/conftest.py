"""Shared test setup: GPU tests are skipped where there is no CUDA GPU; tiny models are built from
configs (there is no model hub)."""

from __future__ import annotations

import os
import re

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: no spinning on a shared CPU (notes/first-hour.md)


def _pin_one_gpu() -> None:
    """Tests that train inside the pytest process see one GPU: with several, the Trainer would run
    ``torch.nn.DataParallel`` over them, which most plugins refuse (as a user's ``python script.py`` would be
    told). GPUs are counted from ``/dev/nvidiaN`` before CUDA starts; the count stays in ``HF_LOWMEM_TEST_GPUS``
    for the tests that launch several processes themselves (``tests.tiny.machine_gpus``). A ``CUDA_VISIBLE_DEVICES``
    the caller set is left alone."""
    if "CUDA_VISIBLE_DEVICES" in os.environ or not os.path.isdir("/dev"):
        return
    n = sum(1 for d in os.listdir("/dev") if re.fullmatch(r"nvidia\d+", d))
    if n > 1:
        os.environ["HF_LOWMEM_TEST_GPUS"] = str(n)
        os.environ["CUDA_VISIBLE_DEVICES"] = "0"


_pin_one_gpu()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_llama_config():
    from tests.tiny import tiny_config

    return tiny_config("llama")
