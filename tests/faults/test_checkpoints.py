"""Corrupted, partial and mismatched checkpoints are refused before training, with one line that names the
difference; generator states plugins register are resumed; a full disk during a save loses nothing."""

from __future__ import annotations

import errno
import json
import logging
import shutil

import pytest

from hf_lowmem import checkpoint
from hf_lowmem.checkpoint import MANIFEST_NAME, STAGING_DIR, selection_difference
from hf_lowmem.errors import CheckpointError
from tests.faults.tinyrun import build, rng_owner, snapshot


def flip_a_bit(out):
    path = out / "checkpoint-6" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the tensor data: the file still parses
    path.write_bytes(bytes(data))


def truncate(out):
    path = out / "checkpoint-6" / "optimizer.pt"
    path.write_bytes(path.read_bytes()[:-100])


def drop_manifests(out):
    for p in out.glob("checkpoint-*/" + MANIFEST_NAME):
        p.unlink()


def legacy_without_optimizer(out):
    drop_manifests(out)
    (out / "checkpoint-6" / "optimizer.pt").unlink()


def spoil_manifest(out):
    (out / "checkpoint-6" / MANIFEST_NAME).write_text("{not json")


def nothing(out):
    return None


CASES = {
    # name: (mutate the run folder, trainer overrides, resume_from_checkpoint, expected message)
    "bit-flip in the weights": (flip_a_bit, {}, True, r"checkpoint '.*checkpoint-6' is damaged: model.safetensors does not "
                                r"match the checksum written with it .*; resume_from_checkpoint='.*checkpoint-4'"),
    "optimizer.pt missing": (lambda o: (o / "checkpoint-6" / "optimizer.pt").unlink(), {}, True,
                             r"checkpoint '.*checkpoint-6' is incomplete: optimizer.pt missing .*silently start from a "
                             r"fresh optimizer. Restore the file\(s\), or resume_from_checkpoint='.*checkpoint-4'"),
    "truncated optimizer.pt": (truncate, {}, True, r"optimizer.pt has \d+ bytes, \d+ were written"),
    "another optimizer plugin": (nothing, {"lowmem_optimizer": "adafactor"}, True,
                                 r"cannot resume from '.*checkpoint-6': it was saved with optimizer plugin 'adamw' and "
                                 r"this run selects 'adafactor'; set lowmem_optimizer='adamw' to resume it"),
    "no optimizer plugin now": (nothing, {"lowmem_optimizer": None}, "checkpoint-4",
                                r"saved with optimizer plugin 'adamw' and this run selects none"),
    "a path that is no checkpoint": (nothing, {}, "checkpoint-9", r"no checkpoint folder at '.*checkpoint-9'"),
    "unreadable manifest": (spoil_manifest, {}, True, r"the manifest .*checkpoint-6/hf_lowmem_checkpoint.json cannot be read"),
    "no manifest and no optimizer.pt": (legacy_without_optimizer, {}, True,
                                        r"checkpoint '.*checkpoint-6' has no optimizer.pt: resuming would silently start "
                                        r"a fresh optimizer"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_checkpoint_is_refused_before_training_and_nothing_changes(trained, case):
    mutate, overrides, resume, message = CASES[case]
    mutate(trained)
    if isinstance(resume, str):
        resume = str(trained / resume)
    before = snapshot(trained)
    trainer = build(trained, **overrides)
    with pytest.raises(CheckpointError, match=message) as info:
        trainer.train(resume_from_checkpoint=resume)
    assert "\n" not in str(info.value)  # one line
    assert trainer.state.global_step == 0  # refused before any step
    assert snapshot(trained) == before


def test_resume_picks_the_newest_complete_checkpoint_and_removes_partial_ones(trained, caplog):
    partial = trained / "checkpoint-8"  # e.g. a plain Trainer killed while saving here
    partial.mkdir()
    shutil.copy(trained / "checkpoint-6" / "model.safetensors", partial)
    (trained / STAGING_DIR / "checkpoint-10").mkdir(parents=True)  # an interrupted hf-lowmem save
    kept = snapshot(trained)
    trainer = build(trained)
    with caplog.at_level(logging.WARNING, logger="hf_lowmem"):
        path = checkpoint.prepare_resume(trainer, True)
    assert path == str(trained / "checkpoint-6")
    assert "skipping checkpoint-8: no manifest, so not known to be complete" in caplog.text
    assert "removed partial checkpoint(s) checkpoint-10" in caplog.text
    assert not (trained / STAGING_DIR).exists() and snapshot(trained) == kept


def test_a_checkpoint_without_manifest_resumes_with_a_warning(trained, caplog):
    drop_manifests(trained)
    trainer = build(trained)
    with caplog.at_level(logging.WARNING, logger="hf_lowmem"):
        assert checkpoint.prepare_resume(trainer, True) == str(trained / "checkpoint-6")
    assert "has no hf_lowmem_checkpoint.json (written by a plain Trainer or an older hf-lowmem)" in caplog.text


def test_resume_true_in_an_empty_folder(tmp_path):
    (tmp_path / "NOTES.md").write_text("x")
    with pytest.raises(CheckpointError, match="resume_from_checkpoint=True found no checkpoint-N folder in"):
        build(tmp_path).train(resume_from_checkpoint=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["NOTES.md"]


def test_other_optimizer_options_are_refused(tmp_path):
    opts = {"adafactor": {"clip_threshold": 1.0}}
    build(tmp_path, max_steps=2, lowmem_optimizer="adafactor", lowmem_options=opts).train()
    before = snapshot(tmp_path)
    trainer = build(tmp_path, max_steps=4, lowmem_optimizer="adafactor", lowmem_options={"adafactor": {"clip_threshold": 2.0}})
    with pytest.raises(CheckpointError, match=r"its optimizer plugin 'adafactor' was saved with options clip_threshold=1.0 "
                                              r"and this run has clip_threshold=2.0"):
        trainer.train(resume_from_checkpoint=True)
    assert snapshot(tmp_path) == before


def test_what_a_resume_may_and_may_not_change():
    def rec(opt=None, offload=(), attention=(), trainer_optim=None):
        return {"optimizer": [{"name": o, "options": None} for o in ([opt] if opt else [])],
                "quantization": [], "attention": [{"name": a, "options": None} for a in attention],
                "offload": [{"name": n, "options": None, "engine": n == "stream"} for n in offload],
                "trainer_optim": trainer_optim}

    assert selection_difference(rec("adamw"), rec("adamw")) == (None, [])
    refusal, _ = selection_difference(rec(trainer_optim="adamw_torch"), rec(trainer_optim="adafactor"))
    assert "saved with the Trainer's optim='adamw_torch' and this run uses optim='adafactor'" in refusal
    refusal, _ = selection_difference(rec("adamw", offload=["stream"]), rec("adamw"))
    assert "saved with the training engine 'stream' and this run uses none" in refusal
    refusal, notes = selection_difference(rec("adamw", offload=["gradient-checkpointing"], attention=["sdpa"]), rec("adamw"))
    assert refusal is None and len(notes) == 2  # recomputation and kernels do not change the saved state


def test_generator_states_registered_by_plugins_are_resumed(trained, reference):
    draws: dict[int, float] = {}
    owner = rng_owner(draws)
    trainer = build(trained, callbacks=[owner])
    owner.trainer = trainer
    trainer.train(resume_from_checkpoint=str(trained / "checkpoint-2"))
    manifest = json.loads((trained / "checkpoint-4" / MANIFEST_NAME).read_text())
    assert manifest["rng"] == ["fake-rounding"] and "hf_lowmem_rng.pt" in manifest["files"]
    assert draws == {s: reference["draws"][s] for s in (3, 4, 5, 6)}  # the stream went on where it stopped
    assert draws[3] != reference["draws"][1]  # not restarted from the seed


def test_register_rng_refuses_what_has_no_state():
    class Ctx:
        state: dict = {}

    with pytest.raises(TypeError, match="needs an object with get_state"):
        checkpoint.register_rng(Ctx(), "x", object())


@pytest.mark.parametrize("disk", ["tmpfs", "injected"])
def test_a_full_disk_during_a_save_loses_nothing(tmp_path, small_disk, disk):
    if disk == "tmpfs":
        out = small_disk("600k")  # room for one checkpoint of the tiny model (~370 kB), not two
        if out is None:
            pytest.skip("this machine does not let the test mount a tmpfs (the injected case covers it)")
    else:
        out = tmp_path / "run"
    trainer = build(out, max_steps=4)
    if disk == "injected":
        inner = trainer._save_optimizer_and_scheduler

        def full(output_dir):
            if trainer.state.global_step == 4:
                raise OSError(errno.ENOSPC, "No space left on device", str(output_dir))
            return inner(output_dir)

        trainer._save_optimizer_and_scheduler = full
    with pytest.raises(CheckpointError, match=r"writing checkpoint-4 into '.*' failed: the disk holding '.*' is full "
                                              r"\(.* MB free\); free some space or write elsewhere. The earlier "
                                              r"checkpoints are untouched"):
        trainer.train()
    assert trainer.state.global_step == 4
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]  # no partial checkpoint-4, no staging folder
    assert checkpoint.verify(out / "checkpoint-2", trainer)["step"] == 2  # every checksum still matches


@pytest.mark.parametrize("algorithm", checkpoint.HASHES)
def test_each_checksum_catches_a_flipped_bit_in_any_chunk(tmp_path, monkeypatch, algorithm):
    import os

    monkeypatch.setattr(checkpoint.manifest, "CHUNK_BYTES", 1 << 16)  # several chunks, hashed by several threads
    path = tmp_path / "weights.bin"
    data = bytearray(os.urandom(5 * (1 << 16) + 123))
    path.write_bytes(bytes(data))
    digest = checkpoint.file_digest(path, algorithm=algorithm, threads=3)
    assert checkpoint.file_digest(path, algorithm=algorithm, threads=1) == digest  # threads do not change it
    data[3 * (1 << 16) + 7] ^= 0x01
    path.write_bytes(bytes(data))
    assert checkpoint.file_digest(path, algorithm=algorithm) != digest


def test_a_manifest_whose_checksum_cannot_be_computed_here_is_checked_by_size(trained, caplog):
    path = trained / "checkpoint-6" / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["hash"] = "sha3-512/1GiB"  # e.g. written where another algorithm was available
    path.write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="hf_lowmem"):
        assert checkpoint.verify(trained / "checkpoint-6", build(trained))["step"] == 6
    assert "which this machine cannot compute (pip install xxhash); checking file sizes only" in caplog.text


def test_stream_with_8bit_adamw_resumes_with_the_losses_of_an_uninterrupted_run(tmp_path):
    from tests.faults.tinyrun import loss_logger, read_losses

    kw = {"lowmem_optimizer": "bnb-adamw8bit", "lowmem_offload": ["stream"], "max_steps": 4, "save_steps": 2}
    build(tmp_path / "run", callbacks=[loss_logger(tmp_path / "full.jsonl")], **kw).train()
    trainer = build(tmp_path / "run", callbacks=[loss_logger(tmp_path / "resumed.jsonl")], **kw)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    full, resumed = read_losses(tmp_path / "full.jsonl"), read_losses(tmp_path / "resumed.jsonl")
    assert [resumed[s] for s in (3, 4)] == pytest.approx([full[s] for s in (3, 4)], abs=1e-4)
