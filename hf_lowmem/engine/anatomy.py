"""The parts of a causal LM the streaming engine schedules: re-exported from :mod:`hf_lowmem.anatomy`, the
one module that knows model anatomy."""

from hf_lowmem.anatomy import Anatomy, Block, find_anatomy  # noqa: F401
