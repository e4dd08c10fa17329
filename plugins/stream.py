"""The ``stream`` offload plugin: the weight-streaming engine that trains every parameter of a model far
larger than the GPU (see :mod:`hf_lowmem.engine.stream`)."""

from __future__ import annotations

from hf_lowmem import hookimpl
from hf_lowmem.registry import PluginInfo

#: optimizers the engine implements itself (exact fp32 AdamW; 8-bit AdamW through bitsandbytes' kernel)
ENGINE_OPTIMIZERS = ("adamw", "bnb-adamw8bit")


def _check(by_kind):
    opt = (by_kind.get("optimizer") or [None])[0]
    if opt is not None and opt not in ENGINE_OPTIMIZERS:
        return (f"the engine runs the optimizer update itself, one block at a time on the GPU, and supports "
                f"{', '.join(ENGINE_OPTIMIZERS)}; {opt!r} is not one of them")
    if by_kind.get("quantization"):
        return "the engine streams fp32 master weights and casts them on the GPU; quantized weights are not supported"
    return None


@hookimpl
def hf_lowmem_register(register):
    from hf_lowmem.engine.stream_options import StreamOptions

    register(PluginInfo(
        name="stream", kind="offload", engine=True, options=StreamOptions, modes=("single",),
        help="weight-streaming engine: fp32 masters + optimizer states in host RAM, one layer at a time on the "
             "GPU, layer-major accumulation windows (7B in 8 GiB)",
        incompatible={
            "gradient-checkpointing": "redundant: the engine already recomputes every layer in backward",
            "activation-offload": "redundant: the engine already keeps only each layer's inputs, in host memory",
        },
        check_selection=_check,
    ))


@hookimpl
def hf_lowmem_create_engine(ctx, model, trainer):
    if not ctx.is_selected("stream"):
        return None
    from hf_lowmem_plugins.core import trainer_param_groups

    from hf_lowmem.engine.config import EngineSpec
    from hf_lowmem.engine.stream import StreamEngine

    opt = ctx.selected("optimizer")
    spec = EngineSpec.from_training(ctx.args, trainer=trainer, options=ctx.options("stream"), optimizer_name=opt,
                                    optimizer_options=ctx.options(opt) if opt else None,
                                    param_groups=trainer_param_groups(trainer, model))
    return StreamEngine(model, spec)
