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

from hf_lowmem.checkpoint.atomic import STAGING_DIR, clean_staging, describe_write_error, save_atomically
from hf_lowmem.checkpoint.manifest import (
    CHUNK_BYTES,
    HASH_ENV,
    HASHES,
    MANIFEST_NAME,
    file_digest,
    hash_name,
    plugin_record,
    read_manifest,
    selection_difference,
    write_manifest,
)
from hf_lowmem.checkpoint.resume import find_resumable, list_checkpoints, prepare_resume, verify
from hf_lowmem.checkpoint.rng import RNG_NAME, load_rng, register_rng, registered_rngs, save_rng

__all__ = ["CHUNK_BYTES", "HASHES", "HASH_ENV", "MANIFEST_NAME", "RNG_NAME", "STAGING_DIR", "clean_staging",
           "describe_write_error", "file_digest", "find_resumable", "hash_name", "list_checkpoints", "load_rng",
           "plugin_record", "prepare_resume", "read_manifest", "register_rng", "registered_rngs", "save_atomically",
           "save_rng", "selection_difference", "verify", "write_manifest"]
