"""Writing model weights without a second copy of the model in memory.

``save_pretrained`` of transformers casts nothing and, with its default shard size (50 GB), puts a 7B model in
one file, which the Trainer's resume then loads whole (13.5 GB at once). The stream engine replaces the model
instance's ``save_pretrained`` with :func:`save_pretrained_streaming`: safetensors shards of at most
:data:`SHARD_BYTES` with the standard index, each tensor converted to the save dtype one at a time and written
straight from host memory. The folder is what ``from_pretrained`` reads; resuming loads it shard by shard.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterable

import torch

SHARD_BYTES = 2 * 10**9
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
              torch.int32: "I32", torch.uint8: "U8", torch.int8: "I8", torch.bool: "BOOL", torch.float64: "F64"}


def _nbytes(shape, dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def write_safetensors_sharded(folder: str, items: list[tuple[str, tuple, torch.dtype]],
                              get: Callable[[str], torch.Tensor], *, shard_bytes: int = SHARD_BYTES,
                              metadata: dict | None = None) -> list[str]:
    """Write tensors ``items`` (name, shape, dtype) into ``folder`` as ``model.safetensors`` or
    ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``. ``get(name)`` produces each tensor
    (on the CPU, with that shape and dtype) when its turn comes, so at most one tensor exists at a time beyond
    what the caller holds. Returns the files written."""
    shards: list[list[tuple[str, tuple, torch.dtype]]] = [[]]
    size = 0
    for it in items:
        nb = _nbytes(it[1], it[2])
        if shards[-1] and size + nb > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += nb
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        header, off = {}, 0
        for name, shape, dtype in shard:
            nb = _nbytes(shape, dtype)
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": [int(d) for d in shape], "data_offsets": [off, off + nb]}
            off += nb
            weight_map[name] = fname
        total += off
        header["__metadata__"] = {"format": "pt", **(metadata or {})}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(folder, fname), "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name, shape, dtype in shard:
                t = get(name).detach().to("cpu").contiguous()
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{name}: produced {t.dtype} {tuple(t.shape)}, declared {dtype} {tuple(shape)}")
                if t.numel():
                    f.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
                del t
    if n > 1:
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def _unique(state_dict: dict[str, torch.Tensor]) -> Iterable[tuple[str, torch.Tensor]]:
    """Drop tied duplicates (the same memory under a second name, e.g. ``lm_head.weight``), as transformers does."""
    seen: set[tuple[int, tuple, torch.dtype]] = set()
    for name, t in state_dict.items():
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        yield name, t


def save_pretrained_streaming(model, save_directory, *, save_dtype: torch.dtype | None, original: Callable | None = None,
                              state_dict: dict | None = None, is_main_process: bool = True,
                              safe_serialization: bool = True, max_shard_size=None, **kwargs) -> None:
    """``model.save_pretrained`` for a model whose weights live in the stream engine's host buffers: config,
    generation config and sharded safetensors, floating-point tensors written in ``save_dtype``."""
    if not safe_serialization and original is not None:  # a pickle checkpoint was asked for: the stock path
        return original(save_directory, state_dict=state_dict, is_main_process=is_main_process,
                        safe_serialization=False, max_shard_size=max_shard_size or "50GB", **kwargs)
    if not is_main_process:
        return None
    os.makedirs(save_directory, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    tensors = dict(_unique(sd))

    def dtype_of(t: torch.Tensor) -> torch.dtype:
        return save_dtype if (save_dtype is not None and t.is_floating_point()) else t.dtype

    items = [(name, tuple(t.shape), dtype_of(t)) for name, t in tensors.items()]
    shard = SHARD_BYTES
    if max_shard_size is not None:
        from hf_lowmem.sizes import parse_size

        shard = max_shard_size if isinstance(max_shard_size, int) else parse_size(max_shard_size, "max_shard_size")
    write_safetensors_sharded(save_directory, items, lambda name: tensors[name].to(dtype_of(tensors[name])),
                              shard_bytes=shard)
    config = copy.deepcopy(model.config)
    if save_dtype is not None:
        config.dtype = save_dtype
    config.save_pretrained(save_directory)
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(model, "can_generate", lambda: False)():
        gen.save_pretrained(save_directory)
    return None
