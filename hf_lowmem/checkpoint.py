"""Atomic, verified Trainer checkpoints for ``LowMemTrainer``.

Writing
    A checkpoint is written into ``OUTPUT_DIR/.hf_lowmem-staging/checkpoint-N`` (the Trainer's own
    ``_save_checkpoint`` does the writing, pointed there through ``_get_output_dir``), then a manifest
    (:data:`MANIFEST_NAME`) is added and the folder is renamed to ``OUTPUT_DIR/checkpoint-N`` in one
    ``os.replace``. A run killed during a save (SIGKILL, power loss, a full disk) therefore leaves no
    ``checkpoint-N`` behind, only the staging folder, which the next ``train()`` in that output folder
    removes. The Trainer's checkpoint rotation (``save_total_limit``) runs after the rename.

The manifest
    records every file of the checkpoint with its size and checksum, the selected plugins with their
    options (and the Trainer's ``optim`` when no optimizer plugin is selected), library versions, and
    the random-generator states plugins registered (:func:`register_rng`).

Resuming
    ``resume_from_checkpoint=True`` picks the newest ``checkpoint-N`` that has a manifest (newer folders
    without one are skipped, with a warning); a path is taken as given. Either way the checkpoint is
    verified before training starts: a missing, truncated or altered file, or a different optimizer /
    quantization / engine plugin or optimizer options, is refused with one :class:`CheckpointError` line
    that names the difference and the way out. A checkpoint without a manifest (a plain Trainer's, or an
    older hf-lowmem's) is resumed with a warning, but not without its ``optimizer.pt``.

Checksums
    Each file is read in 16 MiB chunks by parallel threads; each chunk gets a checksum (XXH3-128 when the
    ``xxhash`` package imports, ~11 GB/s per core; else the standard library's CRC32, ~1.5 GB/s per core;
    both release the GIL), and the file's digest is a BLAKE2b of its size and the chunk checksums. The
    manifest names the algorithm; a resume that cannot compute it checks sizes only and says so. On save
    the same pass fsyncs each file. ``HF_LOWMEM_CHECKPOINT_HASH=0`` records and checks sizes only.
    Measured cost: ``notes/faults.md``.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hf_lowmem.errors import CheckpointError
from hf_lowmem.signals import OWNER_FILE, owner_alive, read_owner, write_owner

logger = logging.getLogger("hf_lowmem")

MANIFEST_NAME = "hf_lowmem_checkpoint.json"
STAGING_DIR = ".hf_lowmem-staging"
RNG_NAME = "hf_lowmem_rng.pt"
HASH_ENV = "HF_LOWMEM_CHECKPOINT_HASH"
CHUNK_BYTES = 16 << 20
#: checksum algorithms by preference; the manifest records the one used
HASHES = ("xxh3-128/16MiB", "crc32/16MiB")
FORMAT_VERSION = 1
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_RNG_KEY = "hf_lowmem.checkpoint.rng"
#: what a missing file means for the resumed run
_MISSING_MEANS = {"optimizer.pt": "a fresh optimizer", "scheduler.pt": "a fresh learning-rate schedule",
                  "trainer_state.json": "step 0", "scaler.pt": "a fresh loss scaler"}


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
    for p in _files(folder):
        size = p.stat().st_size
        total += size
        files[p.relative_to(folder).as_posix()] = {
            "size": size, "hash": file_digest(p, algorithm=algorithm, fsync=fsync) if hashing else None}
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


# ---- picking and verifying a checkpoint -----------------------------------------------------------------
def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` folders of ``run_dir``, newest (largest N) first."""
    run_dir = Path(run_dir)
    try:
        found = [(int(m.group(1)), p) for p in run_dir.iterdir()
                 if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    except OSError:
        return []
    return [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]


def find_resumable(run_dir: str | os.PathLike) -> str:
    """The checkpoint ``resume_from_checkpoint=True`` resumes: the newest with a manifest, or, when none has
    one (a plain Trainer's folder), the newest one, with a warning."""
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"resume_from_checkpoint=True found no checkpoint-N folder in {str(run_dir)!r}; "
                              "give the checkpoint's path, or drop resume_from_checkpoint to start a new run")
    complete = [p for p in found if (p / MANIFEST_NAME).is_file()]
    if complete:
        skipped = [p.name for p in found if p not in complete and _step(p) > _step(complete[0])]
        if skipped:
            logger.warning("hf-lowmem: skipping %s: no manifest, so not known to be complete (an interrupted save, "
                           "or written by another trainer); resuming from %s", ", ".join(skipped), complete[0].name)
        return str(complete[0])
    usable = [p for p in found if not (p / "checkpoint-is-incomplete.txt").exists()]
    if not usable:
        raise CheckpointError(f"every checkpoint in {str(run_dir)!r} is marked incomplete; start a new run")
    return str(usable[0])


def _step(path: Path) -> int:
    m = _CHECKPOINT_RE.match(path.name)
    return int(m.group(1)) if m else -1


def _earlier(path: Path) -> str:
    older = [p for p in list_checkpoints(path.parent) if _step(p) < _step(path) and (p / MANIFEST_NAME).is_file()]
    return f"resume_from_checkpoint={str(older[0])!r}" if older else "start a new run"


def verify(path: str | os.PathLike, trainer: Any) -> dict[str, Any] | None:
    """Check a checkpoint before resuming from it; raise :class:`CheckpointError` naming what is wrong.
    Returns its manifest (``None`` for a checkpoint written without one, which gets a warning)."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"no checkpoint folder at {str(path)!r}; pass a checkpoint-N folder, or "
                              "resume_from_checkpoint=True to take the newest complete one in output_dir")
    manifest = read_manifest(folder)
    if manifest is None:
        _verify_legacy(folder, trainer)
        return None
    files = manifest["files"]
    missing = [rel for rel in files if not (folder / rel).is_file()]
    if missing:
        means = next((_MISSING_MEANS[m] for m in missing if m in _MISSING_MEANS), "defaults in place of what is missing")
        raise CheckpointError(f"checkpoint {str(folder)!r} is incomplete: {', '.join(missing[:4])} missing (its "
                              f"manifest lists {'it' if len(missing) == 1 else 'them'}); resuming would silently "
                              f"start from {means}. Restore the file(s), or {_earlier(folder)}")
    algorithm = manifest.get("hash")
    check_hash = hashing_enabled() and algorithm is not None
    if check_hash and _chunk_checksum(algorithm) is None:
        logger.warning("hf-lowmem: %s was checksummed with %s, which this machine cannot compute (pip install "
                       "xxhash); checking file sizes only", folder.name, algorithm)
        check_hash = False
    t0 = time.perf_counter()
    for rel, meta in files.items():
        p = folder / rel
        size = p.stat().st_size
        if size != meta.get("size"):
            raise CheckpointError(f"checkpoint {str(folder)!r} is damaged: {rel} has {size} bytes, {meta.get('size')} "
                                  f"were written; {_earlier(folder)}")
        if check_hash and meta.get("hash") and file_digest(p, algorithm=algorithm) != meta["hash"]:
            raise CheckpointError(f"checkpoint {str(folder)!r} is damaged: {rel} does not match the checksum written "
                                  f"with it (a flipped bit, or the file was changed); {_earlier(folder)}")
    if check_hash:
        logger.info("hf-lowmem: verified %s (%d files) in %.2f s", folder, len(files), time.perf_counter() - t0)
    refusal, notes = selection_difference(manifest.get("plugins") or {}, plugin_record(trainer))
    if refusal:
        raise CheckpointError(f"cannot resume from {str(folder)!r}: {refusal}, or start a new run in another output_dir")
    for note in notes:
        logger.info("hf-lowmem: resuming %s: %s", folder.name, note)
    now = versions()
    changed = {k: (v, now.get(k)) for k, v in (manifest.get("versions") or {}).items() if now.get(k) != v}
    if changed:
        logger.warning("hf-lowmem: resuming %s with other library versions than it was written with: %s", folder.name,
                       ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
    if manifest.get("save_only_model"):
        logger.warning("hf-lowmem: %s holds the weights only (save_only_model=True): optimizer and schedule start "
                       "fresh", folder.name)
    return manifest


def _verify_legacy(folder: Path, trainer: Any) -> None:
    names = {p.name for p in folder.iterdir()}
    if "checkpoint-is-incomplete.txt" in names:
        raise CheckpointError(f"checkpoint {str(folder)!r} is marked incomplete (checkpoint-is-incomplete.txt); "
                              f"{_earlier(folder)}")
    engine_states = any(n.startswith(("global_step", "optimizer_", "pytorch_model_fsdp")) for n in names)
    if "trainer_state.json" in names and "optimizer.pt" not in names and not engine_states:
        raise CheckpointError(f"checkpoint {str(folder)!r} has no optimizer.pt: resuming would silently start a fresh "
                              "optimizer. Restore the file, or start a new run from its weights "
                              f"(AutoModelForCausalLM.from_pretrained({str(folder)!r}))")
    logger.warning("hf-lowmem: %s has no %s (written by a plain Trainer or an older hf-lowmem): its files and plugins "
                   "are not verified", folder, MANIFEST_NAME)


# ---- writing a checkpoint atomically -------------------------------------------------------------------
def _barrier(trainer: Any) -> None:
    if int(getattr(trainer.args, "world_size", 1) or 1) > 1:
        trainer.accelerator.wait_for_everyone()


def clean_staging(run_dir: str | os.PathLike) -> list[str]:
    """Remove the partial checkpoints an interrupted run left in ``run_dir`` (unless a live process of this
    host owns them). Returns the removed names."""
    root = Path(run_dir) / STAGING_DIR
    if not root.is_dir():
        return []
    owner = read_owner(root)
    if owner_alive(owner) and owner.get("pid") != os.getpid():
        logger.warning("hf-lowmem: %s belongs to process %s, which still runs: another run writes checkpoints into "
                       "this output_dir", root, owner.get("pid"))
        return []
    names = sorted(p.name for p in root.iterdir() if p.name != OWNER_FILE)
    shutil.rmtree(root, ignore_errors=True)
    if names:
        logger.warning("hf-lowmem: removed partial checkpoint(s) %s that an interrupted save left in %s",
                       ", ".join(names), run_dir)
    return names


def describe_write_error(exc: BaseException, folder: str | os.PathLike) -> str:
    """One line for an error raised while writing into ``folder``: a full disk or a file-size limit is
    named as such, with the free space."""
    chain, e = [], exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    codes = {getattr(x, "errno", None) for x in chain}
    text = " ".join(f"{type(x).__name__}: {x}" for x in chain)
    free = _free_bytes(folder)
    if codes & {errno.ENOSPC, errno.EDQUOT} or "No space left" in text or "os error 28" in text or \
            "quota" in text.lower() or (free is not None and free < (16 << 20)):
        return f"the disk holding {str(folder)!r} is full ({_mb(free)} free); free some space or write elsewhere"
    if errno.EFBIG in codes or "File too large" in text:
        return f"a file in {str(folder)!r} hit the file-size limit (EFBIG: `ulimit -f`, or the file system's)"
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:300]


def _free_bytes(folder: str | os.PathLike) -> int | None:
    p = Path(folder)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _mb(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 1e6:.1f} MB"


def save_atomically(trainer: Any, model: Any, trial: Any, save) -> str:
    """Run the Trainer's ``save(model, trial)`` into the staging folder, add the manifest, rename the
    folder into place and rotate old checkpoints. Returns the final path."""
    from transformers.trainer_utils import rotate_checkpoints

    args = trainer.args
    run_dir = Path(trainer._get_output_dir(trial))
    name = f"checkpoint-{trainer.state.global_step}"
    root, final = run_dir / STAGING_DIR, run_dir / name
    staged = root / name
    main = bool(args.should_save)
    if main:
        root.mkdir(parents=True, exist_ok=True)
        owner = read_owner(root)
        if not owner or owner.get("pid") != os.getpid():
            write_owner(root, "hf-lowmem checkpoints being written")
        if staged.exists():
            shutil.rmtree(staged)
    _barrier(trainer)
    try:
        trainer._lowmem_staging = str(root)
        try:
            save(model, trial)
        finally:
            trainer._lowmem_staging = None
        _barrier(trainer)
        _fix_best_checkpoint(trainer, root, run_dir)
        if main:
            if trainer.state.best_model_checkpoint and (staged / "trainer_state.json").is_file():
                trainer.state.save_to_json(str(staged / "trainer_state.json"))
            write_manifest(staged, trainer)
            _publish(staged, final)
            _drop_if_empty(root)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=args.save_total_limit,
                               best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=False)
    except BaseException as e:
        reason = describe_write_error(e, run_dir) if isinstance(e, Exception) else None
        if main:
            shutil.rmtree(staged, ignore_errors=True)
            _drop_if_empty(root)
        if reason is None or isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"writing {name} into {str(run_dir)!r} failed: {reason}. The earlier checkpoints are "
                              "untouched") from e
    _barrier(trainer)
    trainer._lowmem_last_checkpoint = str(final)
    return str(final)


def _drop_if_empty(root: Path) -> None:
    """Remove the staging folder once it holds nothing but its owner marker."""
    try:
        if not any(p.name != OWNER_FILE for p in root.iterdir()):
            shutil.rmtree(root, ignore_errors=True)
    except OSError:
        pass


def _fix_best_checkpoint(trainer: Any, root: Path, run_dir: Path) -> None:
    """The Trainer looked for the best checkpoint in the staging folder: point it at the real one."""
    best = trainer.state.best_model_checkpoint
    if best and Path(best).parent == root:
        trainer.state.best_model_checkpoint = str(run_dir / Path(best).name)


def _publish(staged: Path, final: Path) -> None:
    trash = None
    if final.exists():  # a checkpoint of the same step (a re-run in this folder): replaced only now
        trash = final.parent / f"{STAGING_DIR}-old-{final.name}-{os.getpid()}"
        os.replace(final, trash)
    os.replace(staged, final)
    _fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


# ---- random generators plugins own (stochastic rounding) -------------------------------------------------
def register_rng(ctx: Any, name: str, generator: Any) -> None:
    """Save ``generator`` (a ``torch.Generator``, CPU or CUDA, or anything with ``get_state() -> Tensor``
    and ``set_state(Tensor)``) in every checkpoint, and restore it on resume. Register it after seeding
    it: a state read from the checkpoint being resumed is applied at once (or when it is registered, if
    that is later than the start of ``train()``)."""
    if not (callable(getattr(generator, "get_state", None)) and callable(getattr(generator, "set_state", None))):
        raise TypeError(f"register_rng({name!r}) needs an object with get_state()/set_state(), got {type(generator).__name__}")
    slot = ctx.state.setdefault(_RNG_KEY, {"rng": {}, "pending": {}})
    slot["rng"][name] = generator
    pending = slot["pending"].pop(name, None)
    if pending is not None:
        generator.set_state(pending)


def registered_rngs(ctx: Any) -> dict[str, Any]:
    return dict((ctx.state.get(_RNG_KEY) or {}).get("rng") or {})


def rng_file(process_index: int = 0, world_size: int = 1) -> str:
    return RNG_NAME if world_size <= 1 else RNG_NAME.replace(".pt", f"_{process_index}.pt")


def save_rng(ctx: Any, folder: str | os.PathLike, process_index: int = 0, world_size: int = 1) -> None:
    gens = registered_rngs(ctx)
    if not gens:
        return
    import torch

    states = {name: g.get_state() for name, g in gens.items()}
    torch.save(states, os.path.join(folder, rng_file(process_index, world_size)))


def load_rng(ctx: Any, folder: str | os.PathLike, process_index: int = 0, world_size: int = 1,
             expected: list[str] | None = None) -> list[str]:
    """Restore registered generators from a checkpoint (later registrations get theirs on registration)."""
    path = Path(folder) / rng_file(process_index, world_size)
    if not path.is_file():
        if expected:
            logger.warning("hf-lowmem: %s has no %s for %s; their random streams restart", folder, path.name, expected)
        return []
    import torch

    states = torch.load(path, map_location="cpu", weights_only=True)
    slot = ctx.state.setdefault(_RNG_KEY, {"rng": {}, "pending": {}})
    for name, state in states.items():
        if name in slot["rng"]:
            slot["rng"][name].set_state(state)
        else:
            slot["pending"][name] = state
    return sorted(states)


def prepare_resume(trainer: Any, resume: Any, trial: Any = None) -> str | None:
    """Before ``train()``: remove partial checkpoints of an interrupted run, resolve ``True`` to the newest
    complete checkpoint, verify it, and read the registered generators' states. Returns the path."""
    run_dir = trainer._get_output_dir(trial)
    if trainer.args.should_save:
        clean_staging(run_dir)
    if resume is None or resume is False:
        return None
    path = find_resumable(run_dir) if resume is True else os.fspath(resume)
    manifest = verify(path, trainer)
    load_rng(trainer.lowmem_ctx, path, trainer.args.process_index, trainer.args.world_size,
             expected=(manifest or {}).get("rng"))
    return path
