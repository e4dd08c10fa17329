"""Tiny models and data for CPU tests: :mod:`hf_lowmem.testing`, which plugin authors use too."""

import importlib
import sys
from pathlib import Path

from hf_lowmem.testing import RandomTokens, logged_losses, tiny_config, tiny_model, train_args  # noqa: F401

BENCH = Path(__file__).resolve().parent.parent / "bench"


def bench_module(name: str):
    """Import ``bench/<name>.py`` (a script, not a package: ``bench/`` is on ``sys.path`` while it loads, since
    the scripts import each other by name)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def word_tokenizer(vocab_size: int = 128):
    """A word-level tokenizer over ``t0`` .. ``t{vocab_size-1}`` (pad/unk ``t0``, eos ``t1``): what TRL's trainers need
    as ``processing_class`` in CPU tests, without a Hub download."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                   pad_token="t0", eos_token="t1", unk_token="t0")


def machine_gpus() -> tuple[int, dict[str, str]]:
    """The GPUs of this machine for tests that launch their own processes, and the environment that shows them
    all (tests/conftest.py pins the pytest process to one GPU where there are several)."""
    import os

    n = os.environ.get("HF_LOWMEM_TEST_GPUS")
    if n:
        return int(n), {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(int(n)))}
    import torch

    return (torch.cuda.device_count() if torch.cuda.is_available() else 0), {}
