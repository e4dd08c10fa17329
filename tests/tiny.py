"""Tiny models and data for CPU tests: :mod:`hf_lowmem.testing`, which plugin authors use too."""

from hf_lowmem.testing import RandomTokens, logged_losses, tiny_config, tiny_model, train_args  # noqa: F401
