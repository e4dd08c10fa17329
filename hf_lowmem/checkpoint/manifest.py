"""Checksums and the manifest of a checkpoint: what it holds, what the run selected, which versions wrote it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hf_lowmem.checkpoint.rng import registered_rngs
from hf_lowmem.errors import CheckpointError

logger = logging.getLogger("hf_lowmem")

MANIFEST_NAME = "hf_lowmem_checkpoint.json"
HASH_ENV = "HF_LOWMEM_CHECKPOINT_HASH"
CHUNK_BYTES = 16 << 20
#: checksum algorithms by preference; the manifest records the one used
HASHES = ("xxh3-128/16MiB", "crc32/16MiB")
FORMAT_VERSION = 1


# ---- checksums -------------------------------------------------------------------------------------------
def hashing_enabled() -> bool:
    return os.environ.get(HASH_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _chunk_checksum(name: str):
    """The per-chunk checksum function of algorithm ``name``, or ``None`` when it cannot run here."""
    if name == "xxh3-128/16MiB":
        try:
            import xxhash
        except ImportError:
            return None
        return xxhash.xxh3_128_digest
    if name == "crc32/16MiB":
        return lambda data: zlib.crc32(data).to_bytes(4, "little")
    return None


def hash_name() -> str:
    """The algorithm this process writes manifests with."""
    return next(n for n in HASHES if _chunk_checksum(n) is not None)


def file_digest(path: str | os.PathLike, *, algorithm: str | None = None, fsync: bool = False,
                threads: int | None = None) -> str:
    """The digest of a file: BLAKE2b-128 of its size and of its 16 MiB chunks' checksums, chunks read and
    checksummed in parallel threads."""
    checksum = _chunk_checksum(algorithm or hash_name())
    if checksum is None:
        raise ValueError(f"checksum algorithm {algorithm!r} is not available here")
    size = os.path.getsize(path)
    n = max(1, -(-size // CHUNK_BYTES))
    fd = os.open(path, os.O_RDONLY)
    try:
        def chunk(i: int) -> bytes:
            return checksum(os.pread(fd, CHUNK_BYTES, i * CHUNK_BYTES))

        workers = min(n, threads or min(8, os.cpu_count() or 1))
        if workers <= 1:
            digests = [chunk(i) for i in range(n)]
        else:
            with ThreadPoolExecutor(workers) as pool:
                digests = list(pool.map(chunk, range(n)))
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    h = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=16)
    for d in digests:
        h.update(d)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
                  and not p.name.endswith(".tmp"))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - not on every platform
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


# ---- what the run selected -------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=repr, sort_keys=True))


def plugin_record(trainer: Any) -> dict[str, Any]:
    """The selected plugins by kind (name, options, distribution and version) and, when no optimizer
    plugin is selected, the Trainer's ``optim``."""
    ctx = trainer.lowmem_ctx
    record: dict[str, Any] = {}
    for kind, names in ctx.selection.by_kind.items():
        entries = []
        for name in names:
            info = ctx.info(name)
            entries.append({"name": name, "options": _jsonable(ctx.selection.options.get(name)),
                            "engine": bool(info.engine), "version": f"{info.distribution} {info.version}".strip()})
        record[kind] = entries
    record["trainer_optim"] = None if ctx.selected("optimizer") else str(getattr(trainer.args.optim, "value", trainer.args.optim))
    return record


def versions() -> dict[str, str]:
    import torch
    import transformers

    from hf_lowmem import __version__

    out = {"hf-lowmem": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import accelerate

        out["accelerate"] = accelerate.__version__
    except Exception:  # pragma: no cover
        pass
    return out


def _fmt(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names) if names else "none"


def selection_difference(saved: dict[str, Any], now: dict[str, Any]) -> tuple[str | None, list[str]]:
    """``(refusal, notes)``: why a checkpoint saved with ``saved`` cannot resume under ``now`` (the
    optimizer, quantization or engine plugin, or the optimizer's / quantization's options differ), and
    differences that do not matter to the saved state (attention, other offload plugins)."""
    for kind in ("optimizer", "quantization"):
        a, b = saved.get(kind) or [], now.get(kind) or []
        an, bn = [e["name"] for e in a], [e["name"] for e in b]
        if an != bn:
            return (f"it was saved with {kind} plugin {_fmt(an)} and this run selects {_fmt(bn)}; set "
                    f"lowmem_{kind}={an[0] if an else None!r} to resume it"), []
        for ea, eb in zip(a, b):
            oa, ob = ea.get("options") or {}, eb.get("options") or {}
            if oa != ob:
                keys = sorted(k for k in set(oa) | set(ob) if oa.get(k) != ob.get(k))
                was = ", ".join(f"{k}={oa.get(k)!r}" for k in keys)
                now_ = ", ".join(f"{k}={ob.get(k)!r}" for k in keys)
                return (f"its {kind} plugin {ea['name']!r} was saved with options {was} and this run has {now_}; "
                        f"pass the saved options in lowmem_options to resume it"), []
    ea = [e["name"] for e in saved.get("offload") or [] if e.get("engine")]
    eb = [e["name"] for e in now.get("offload") or [] if e.get("engine")]
    if ea != eb:
        return (f"it was saved with the training engine {_fmt(ea)} and this run uses {_fmt(eb)}; "
                f"select the same lowmem_offload engine to resume it"), []
    if not (saved.get("optimizer") or now.get("optimizer")) and saved.get("trainer_optim") != now.get("trainer_optim"):
        return (f"it was saved with the Trainer's optim={saved.get('trainer_optim')!r} and this run uses "
                f"optim={now.get('trainer_optim')!r}; pass --optim {saved.get('trainer_optim')} to resume it"), []
    notes = []
    for kind in ("attention", "offload"):
        a = [(e["name"], e.get("options")) for e in saved.get(kind) or []]
        b = [(e["name"], e.get("options")) for e in now.get(kind) or []]
        if a != b:
            notes.append(f"{kind} plugins were {_fmt([n for n, _ in a])} (options {[o for _, o in a]}), "
                         f"now {_fmt([n for n, _ in b])} (options {[o for _, o in b]})")
    return None, notes


# ---- the manifest ----------------------------------------------------------------------------------------
def write_manifest(folder: str | os.PathLike, trainer: Any, *, fsync: bool = True) -> dict[str, Any]:
    """Checksum every file in ``folder`` (fsyncing each) and write the manifest, atomically, last."""
    folder = Path(folder)
    hashing = hashing_enabled()
    algorithm = hash_name() if hashing else None
    t0 = time.perf_counter()
    files: dict[str, dict[str, Any]] = {}
    total = 0
    checked = _engine_checked(folder)
    for p in _files(folder):
        size = p.stat().st_size
        total += size
        rel = p.relative_to(folder).as_posix()
        if rel in checked:  # synced and checksummed by the engine that wrote it: not read again here
            files[rel] = {"size": size, "hash": None, "checked_by": checked[rel]}
            continue
        files[rel] = {"size": size, "hash": file_digest(p, algorithm=algorithm, fsync=fsync) if hashing else None}
        if fsync and not hashing:
            _fsync_file(p)
    seconds = time.perf_counter() - t0
    manifest = {
        "hf_lowmem_checkpoint": FORMAT_VERSION,
        "step": getattr(trainer.state, "global_step", None),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "hash": algorithm,
        "files": files,
        "plugins": plugin_record(trainer),
        "save_only_model": bool(getattr(trainer.args, "save_only_model", False)),
        "world_size": int(getattr(trainer.args, "world_size", 1) or 1),
        "rng": sorted(registered_rngs(trainer.lowmem_ctx)),
        "versions": versions(),
        "hash_seconds": round(seconds, 3),
        "bytes": total,
    }
    tmp = folder / (MANIFEST_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST_NAME)
    logger.info("hf-lowmem: checkpoint manifest of %d files (%.2f GB) in %.2f s", len(files), total / 1e9, seconds)
    return manifest


#: a file an engine may write into a checkpoint: ``{"by": who, "files": [relative paths]}`` whose checksums that
#: engine keeps and checks itself (the stream engine's SSD tier: block files hard-linked from its offload folder)
ENGINE_CHECKED_NAME = "hf_lowmem_engine_checked.json"


def _engine_checked(folder: Path) -> dict[str, str]:
    try:
        data = json.loads((folder / ENGINE_CHECKED_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return {str(rel): str(data.get("by", "the engine")) for rel in data.get("files", [])}


def _fsync_file(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"the manifest {path} cannot be read ({e}); resume from another checkpoint") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"the manifest {path} is not an hf-lowmem checkpoint manifest; resume from another checkpoint")
    return manifest
