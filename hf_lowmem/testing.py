"""Helpers for testing hf-lowmem plugins on the CPU, in seconds: tiny models built from real configs,
random-token data, training arguments for a short deterministic run, a host and a context with your plugin
registered (installed or not), and the checks a plugin's tests make (same losses as a plain run, the
optimizer's state bytes)::

    from hf_lowmem.testing import assert_same_losses, host_with, tiny_model, train

    def test_my_plugin_trains_like_plain_sgd(tmp_path):
        mine = train(tmp_path / "mine", host=host_with(MySGD()), lowmem_optimizer="my-sgd")
        model = tiny_model()
        plain = train(tmp_path / "plain", model=model, optimizers=(torch.optim.SGD(model.parameters(), lr=1e-3), None))
        assert_same_losses(mine, plain)

Nothing here needs a GPU, the network or a model download. Importing this module imports torch.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Sequence

import torch

#: the tiny configuration's defaults (a 2-layer model with grouped-query attention)
TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


def tiny_config(model_type: str = "llama", **overrides: Any):
    """A real config of ``model_type`` (llama, mistral, qwen2, ...) small enough for CPU tests."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**TINY, **overrides})


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides: Any):
    """A tiny causal LM in fp32 with eager attention, its weights drawn with ``seed`` (same seed, same model)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **overrides)
    cfg._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


class RandomTokens(torch.utils.data.Dataset):
    """Deterministic random token blocks with labels: example ``i`` is the same in every run."""

    def __init__(self, n: int = 64, seq: int = 16, vocab: int = 128, seed: int = 0):
        self.n, self.seq, self.vocab, self.seed = n, seq, vocab, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 100003 + i)
        ids = torch.randint(0, self.vocab, (self.seq,), generator=g)
        return {"input_ids": ids, "labels": ids.clone()}


#: what :func:`train_args` sets: 4 steps of 2 sequences on the CPU, logged every step, nothing saved
SHORT_RUN = dict(max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, save_strategy="no",
                 report_to="none", use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
                 lowmem_telemetry=False)


def train_args(output_dir: Any, **overrides: Any):
    """``LowMemTrainingArguments`` for a short deterministic CPU run (:data:`SHORT_RUN`, then ``overrides``)."""
    from hf_lowmem.args import LowMemTrainingArguments

    return LowMemTrainingArguments(output_dir=str(output_dir), **{**SHORT_RUN, **overrides})


def logged_losses(trainer) -> list[float]:
    """The training losses a trainer logged, in order."""
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def host_with(*plugins: Any, entry_points: bool = True):
    """A fresh :class:`~hf_lowmem.plugins.PluginHost` with the installed plugins and ``plugins``
    (:class:`~hf_lowmem.spec.Plugin` objects) registered after them: test a plugin before it is installed. A
    plugin whose class is installed already under that name is not registered twice."""
    from hf_lowmem.plugins import load_plugins

    host = load_plugins(entry_points=entry_points)
    register = host.registry.register_from("testing", "hf_lowmem.testing", "")
    for plugin in plugins:
        have = host.registry[plugin.name] if plugin.name in host.registry else None
        same = have is not None and (type(have).__module__, type(have).__qualname__) == (
            type(plugin).__module__, type(plugin).__qualname__)
        if not same:
            register(plugin)
            host.loaded["testing"] = "hf_lowmem.testing"
    return host


@contextlib.contextmanager
def use_host(host: Any):
    """Make ``host`` the process-wide plugin host while the block runs (training arguments validate their plugin
    names against it), then restore the previous one."""
    from hf_lowmem import plugins as plugins_mod

    saved, plugins_mod._default_host = plugins_mod._default_host, host
    try:
        yield host
    finally:
        plugins_mod._default_host = saved


def make_context(host: Any = None, **args: Any):
    """A :class:`~hf_lowmem.context.LowMemContext` for calling a plugin's methods directly: :func:`train_args` in a
    temporary folder (``args`` override them, e.g. ``lowmem_optimizer=...``), resolved against ``host`` (default:
    the installed plugins)."""
    import tempfile

    from hf_lowmem.context import LowMemContext, distributed_mode
    from hf_lowmem.plugins import get_plugin_host

    host = host if host is not None else get_plugin_host()
    with use_host(host):
        targs = train_args(tempfile.mkdtemp(prefix="hf-lowmem-test-"), **args)
    return LowMemContext(args=targs, host=host, selection=targs.lowmem_selection(host), mode=distributed_mode(targs))


def train(output_dir: Any, model: Any = None, dataset: Any = None, host: Any = None, optimizers: Sequence = (None, None),
          **args: Any):
    """Train ``model`` (default: :func:`tiny_model`) on ``dataset`` (default: :class:`RandomTokens`) with
    ``LowMemTrainer`` and :func:`train_args` (``args`` override them, e.g. ``lowmem_optimizer=...``), with the
    plugins of ``host`` (default: the installed ones); return the trainer. ``optimizers`` as for the Trainer
    (e.g. a plain run with your own optimizer)."""
    from hf_lowmem.plugins import get_plugin_host
    from hf_lowmem.trainer import LowMemTrainer

    with use_host(host if host is not None else get_plugin_host()) as h:
        trainer = LowMemTrainer(model=model if model is not None else tiny_model(), args=train_args(output_dir, **args),
                                train_dataset=dataset if dataset is not None else RandomTokens(), plugin_host=h,
                                optimizers=tuple(optimizers))
        trainer.train()
    return trainer


def assert_same_losses(a: Any, b: Any, rel: float = 1e-5) -> None:
    """Two runs logged the same losses (trainers or loss lists), within ``rel``: what a lossless plugin promises
    (fp32 tiny models: 1e-5)."""
    la = logged_losses(a) if hasattr(a, "state") else list(a)
    lb = logged_losses(b) if hasattr(b, "state") else list(b)
    assert la and len(la) == len(lb), f"different numbers of logged losses: {len(la)} and {len(lb)}"
    worst = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(la, lb))
    assert worst <= rel, f"losses differ by up to {worst:.3g} (relative; allowed {rel:g}):\n{la}\n{lb}"


def state_bytes(optimizer: Any) -> int:
    """Bytes of the optimizer's state tensors, each storage counted once: what a memory model predicts as
    ``optimizer states``."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    seen: set = set()
    total = 0
    for state in opt.state.values():
        for t in _tensors(state.values()):
            storage = t.untyped_storage()
            if t.dim() > 0 and storage._cdata not in seen:
                seen.add(storage._cdata)
                total += storage.nbytes()
    return total


def _tensors(values: Iterable[Any]):
    return (v for v in values if torch.is_tensor(v))
