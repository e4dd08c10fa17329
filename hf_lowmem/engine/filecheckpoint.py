"""Checkpoints of the SSD tier (:mod:`hf_lowmem.engine.filestore`): the block files themselves.

* :meth:`FileCheckpoints.snapshot` (a checkpoint being written): the pending writes are synced, each block file
  is hard-linked into ``checkpoint-N/offload/`` (an in-kernel copy where the checkpoint is on another file
  system) with ``index.json`` (layout, per-region checksums, generations) and a sidecar that tells the
  checkpoint manifest to record their sizes and leave their checksums to the index. No byte of the state goes
  through this process's memory. From then on the store writes each of those files as a new file renamed over
  the old name (the checkpoint keeps the old contents).
* :meth:`FileCheckpoints.load_checkpoint` (resume): the index is checked against this run's layout and the files'
  sizes; the files are linked back as the live ones; each block's checksums are checked when it is first read.
* ``optimizer.pt`` holds the hyperparameters, step counts, the rounding generator and the digests of the files
  linked beside it (:meth:`optimizer_state`); a resume refuses an ``optimizer.pt`` and an ``offload/`` of
  different saves.
* :func:`save_pretrained_files`: ``save_pretrained`` of a model in the SSD tier (the checkpoint's links above,
  or sharded safetensors read block by block through the window for ``save_model`` and exports).
"""

from __future__ import annotations

import json
import logging
import os
import time

import torch

from hf_lowmem.engine import aio
from hf_lowmem.errors import CheckpointError, PluginError

logger = logging.getLogger("hf_lowmem")

FOLDER = "offload"  # inside a checkpoint
INDEX_NAME = "index.json"
FORMAT = "hf_lowmem.ssd/1"
OPT_FORMAT = "hf_lowmem.stream-ssd/1"
#: the manifest sidecar naming files whose checksums the engine keeps itself (hf_lowmem.checkpoint.manifest)
ENGINE_CHECKED = "hf_lowmem_engine_checked.json"
PARTS = ("master", "states")


class FileCheckpoints:
    """The checkpoint half of :class:`~hf_lowmem.engine.filestore.FileBlockStore` (see the module docstring)."""

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def index(self) -> dict:
        return {"format": FORMAT, **self.formats.stored(),
                "checksum": self.algorithm, "io_align": aio.IO_ALIGN,
                "blocks": [{"file": os.path.basename(self.paths[k]), "bytes": self.block_bytes[k],
                            "generation": self.generation[k], "digests": dict(self.digests[k]),
                            "regions": [r.to_json() for r in self.regions[k]]} for k in range(len(self.layouts))]}

    def snapshot(self, folder: str) -> dict:
        """Make ``folder/offload`` hold the current block files (hard links), with their index; the checkpoint
        manifest takes their sizes and leaves their checksums to the index (``ENGINE_CHECKED``)."""
        t0 = time.perf_counter()
        self.sync()
        dst = os.path.join(folder, FOLDER)
        os.makedirs(dst, exist_ok=True)
        how = {aio.link_or_copy(self.paths[k], os.path.join(dst, os.path.basename(self.paths[k])))
               for k in range(len(self.layouts))}
        idx = self.index()
        _write_json(os.path.join(dst, INDEX_NAME), idx)
        _write_json(os.path.join(folder, ENGINE_CHECKED), {
            "by": "the stream engine's SSD tier: per-block checksums in offload/index.json, checked as blocks are read",
            "files": [f"{FOLDER}/{b['file']}" for b in idx["blocks"]]})
        aio.fsync_dir(dst)
        logger.info("hf-lowmem: SSD tier: %d block files (%.2f GiB) %s into %s in %.2f s", len(self.layouts),
                    self.file_bytes() / 2**30, "linked" if how == {"link"} else "copied in the kernel", dst,
                    time.perf_counter() - t0)
        return idx

    def load_checkpoint(self, folder: str) -> bool:
        """Make the live files the checkpoint's (linked back: the checkpoint's own files are never written) after
        checking its index against this run's layout and its files' sizes; their checksums are checked as each
        block is first read."""
        src = os.path.join(folder, FOLDER)
        fix = "resume with the model, tier and state formats it was saved with, or start a new run"
        if not os.path.isdir(src):
            raise CheckpointError(f"checkpoint {folder!r} has no {FOLDER}/ folder: it was written without offload_dir "
                                  "(master weights and states in host RAM); resume it without offload_dir")
        try:
            with open(os.path.join(src, INDEX_NAME)) as f:
                idx = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{src}/{INDEX_NAME} cannot be read ({e}); resume from an earlier checkpoint") from None
        if idx.get("format") != FORMAT:
            raise CheckpointError(f"{src}/{INDEX_NAME} has format {idx.get('format')!r}, this engine reads {FORMAT!r}; {fix}")
        why = self.formats.mismatch(idx)
        if why:
            raise CheckpointError(f"checkpoint {folder!r}: {why}")
        blocks = idx.get("blocks") or []
        if len(blocks) != len(self.layouts):
            raise CheckpointError(f"checkpoint {folder!r} has {len(blocks)} blocks, this model {len(self.layouts)}; {fix}")
        if aio.chunk_checksum(idx.get("checksum", "")) is None:
            raise CheckpointError(f"checkpoint {folder!r} was checksummed with {idx.get('checksum')!r}, which this "
                                  "machine cannot compute (pip install xxhash)")
        for k, entry in enumerate(blocks):
            mine = [r.to_json() for r in self.regions[k]]
            if entry.get("regions") != mine:
                raise CheckpointError(f"block {k} of checkpoint {folder!r} is laid out as {entry.get('regions')}, this "
                                      f"run as {mine}; {fix}")
            p = os.path.join(src, entry["file"])
            size = os.path.getsize(p) if os.path.isfile(p) else None
            if size is None or size < self.block_bytes[k]:
                raise CheckpointError(f"checkpoint {folder!r} is incomplete: {FOLDER}/{entry['file']} has "
                                      f"{size or 0} bytes, block {k} needs {self.block_bytes[k]}; resume from an "
                                      "earlier checkpoint")
        self.sync()
        self._drop_window()
        self.algorithm = idx["checksum"]
        for k, entry in enumerate(blocks):
            tmp = self.paths[k] + ".ckpt"
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            aio.link_or_copy(os.path.join(src, entry["file"]), tmp)
            os.replace(tmp, self.paths[k])
            old, self._fds[k] = self._fds[k], aio.open_file(self.paths[k], self.direct)
            if old is not None:
                os.close(old)
            self._map_params(k)
            self.digests[k] = dict(entry["digests"])
            self.generation[k] = int(entry["generation"])
            self._verify.update((k, p) for p in PARTS if entry["digests"].get(p))
        self._wfut.clear()
        self._loaded_index = {**idx, "folder": folder}
        logger.info("hf-lowmem: SSD tier resumed from %s (%d block files linked; each block's checksums are checked "
                    "when it is first read)", src, len(blocks))
        return True

    # ---- the optimizer's checkpoint ---------------------------------------------------------------------------------
    def optimizer_state(self, opt) -> dict:
        """``optimizer.pt`` of the SSD tier: hyperparameters, step counts, the rounding generator, and the digests of
        the block files a checkpoint links beside it (the states themselves are in those files)."""
        opt.engine.flush()
        self.sync()
        index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]}
                  for g in opt.param_groups]
        return {"format": OPT_FORMAT, "formats": self.formats.stored(),
                "param_groups": groups, "steps": list(opt.steps), "state": {},
                "generator": opt.generator.get_state() if opt.generator is not None else None,
                "offload": {"digests": [dict(d) for d in self.digests], "generation": list(self.generation)}}

    def load_optimizer_state(self, opt, sd: dict) -> None:
        fix = "resume with the tier and options the checkpoint was written with, or start without resume_from_checkpoint"
        if not isinstance(sd, dict) or sd.get("format") != OPT_FORMAT:
            got = sd.get("format") if isinstance(sd, dict) else type(sd).__name__
            raise PluginError(f"this optimizer state ({got}) was not written by the SSD tier ({OPT_FORMAT}); it keeps "
                              f"its states in optimizer.pt: resume it without offload_dir; {fix}")
        why = self.formats.mismatch(sd.get("formats") or {})
        if why:
            raise PluginError(why)
        if len(sd["steps"]) != len(self.layouts) or len(sd["param_groups"]) != len(opt.param_groups):
            raise PluginError(f"the checkpoint's optimizer state has {len(sd['steps'])} blocks and "
                              f"{len(sd['param_groups'])} groups, this model {len(self.layouts)} and "
                              f"{len(opt.param_groups)}; {fix}")
        if self._loaded_index is None:
            raise CheckpointError("the SSD tier's optimizer state refers to block files a checkpoint keeps in its "
                                  f"{FOLDER}/ folder; resume with trainer.train(resume_from_checkpoint=...) so they are "
                                  "linked in first")
        linked = [b["digests"] for b in self._loaded_index["blocks"]]
        if sd["offload"]["digests"] != linked:
            raise CheckpointError(f"optimizer.pt and {FOLDER}/ of {self._loaded_index['folder']!r} come from different "
                                  "saves (their block digests differ); resume from another checkpoint")
        opt.engine.discard_pending()
        opt.steps[:] = [int(s) for s in sd["steps"]]
        for group, saved in zip(opt.param_groups, sd["param_groups"]):
            for key, v in saved.items():
                if key != "params":
                    group[key] = tuple(v) if key == "betas" else v
        if opt.generator is not None and sd.get("generator") is not None:
            opt.generator.set_state(sd["generator"])


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_pretrained_files(model, save_directory, *, store, flush=None, original=None,
                          state_dict: dict | None = None, is_main_process: bool = True, safe_serialization: bool = True,
                          max_shard_size=None, **kwargs) -> None:
    """``model.save_pretrained`` in the SSD tier. Into a checkpoint being written (a folder inside
    ``.hf_lowmem-staging``): the config and the block files, linked (:meth:`FileBlockStore.snapshot`). Anywhere
    else (``save_model``, an export): sharded safetensors in the save dtype, read block by block through the
    window with direct I/O."""
    import copy
    from pathlib import Path

    from hf_lowmem.checkpoint import STAGING_DIR
    from hf_lowmem.engine.weights_io import (
        SHARD_BYTES,
        _unique,
        write_safetensors_sharded,
    )

    if not is_main_process:
        return
    if flush is not None:
        flush()
    os.makedirs(save_directory, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.dtype = store.save_dtype
    config.save_pretrained(save_directory)
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(model, "can_generate", lambda: False)():
        gen.save_pretrained(save_directory)
    if Path(save_directory).resolve().parent.name == STAGING_DIR:
        store.snapshot(str(save_directory))
        return
    slot_of = {id(s.param): (k, s) for k, lay in enumerate(store.layouts) for s in lay.slots}
    where = {n: slot_of[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if id(p) in slot_of}
    sd = state_dict if state_dict is not None else model.state_dict()
    tensors = dict(_unique(sd))
    dt = store.save_dtype

    def dtype_of(name):
        t = tensors[name]
        return dt if t.is_floating_point() else t.dtype

    order = sorted(tensors, key=lambda n: (where[n][0], where[n][1].offset) if n in where else (-1, 0))
    items = [(n, tuple(tensors[n].shape), dtype_of(n)) for n in order]
    held: list[int | None] = [None]
    master: list[torch.Tensor | None] = [None]

    def get(name):
        if name not in where:
            return tensors[name].to(dtype_of(name))
        k, s = where[name]
        if held[0] != k:
            if held[0] is not None:
                store.release(held[0])
            master[0] = store.acquire(k)[0]
            held[0] = k
        return master[0][s.offset: s.offset + s.numel].view(s.shape).to(dtype_of(name))

    shard = SHARD_BYTES
    if max_shard_size is not None:
        from hf_lowmem.sizes import parse_size

        shard = max_shard_size if isinstance(max_shard_size, int) else parse_size(max_shard_size, "max_shard_size")
    try:
        write_safetensors_sharded(str(save_directory), items, get, shard_bytes=shard)
    finally:
        if held[0] is not None:
            store.release(held[0])
    return
