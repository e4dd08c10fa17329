"""Signals during a step and during a save, SIGKILL during a save, and the temporary-file API: subprocess
runs of a tiny training script, signalled when its marker file appears."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hf_lowmem import signals
from hf_lowmem.checkpoint import MANIFEST_NAME, STAGING_DIR
from tests.faults.conftest import dead_owner, finish, wait_for
from tests.faults.tinyrun import build, loss_logger, read_losses, snapshot

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))


def resume_and_compare(out: Path, reference, log: Path, first_resumed_step: int) -> None:
    """Resume with resume_from_checkpoint=True; the losses after resume equal the uninterrupted run's."""
    trainer = build(out, callbacks=[loss_logger(log)])
    trainer.train(resume_from_checkpoint=True)
    losses = read_losses(log)
    assert trainer.state.global_step == 6
    for step in range(first_resumed_step, 7):
        assert losses[step] == pytest.approx(reference["losses"][step], abs=1e-5), step


def test_sigterm_during_a_step_stops_at_its_end_with_a_checkpoint_and_resume_continues_exactly(tmp_path, spawn, reference):
    out, temp_parent = tmp_path / "run", tmp_path / "activations"
    proc = spawn(out, "--hold", "step:3", "--wait", "signal", "--temp-parent", str(temp_parent))
    wait_for(lambda: Path(str(out) + ".hold").exists(), proc, what="step 3 to begin")
    before = snapshot(out / "checkpoint-2")
    assert len(list(temp_parent.iterdir())) == 1  # the fake owner's temporary folder exists
    proc.send_signal(signal.SIGTERM)
    rc, err = finish(proc)
    assert rc == 128 + signal.SIGTERM, err
    assert "SIGTERM received: stopping at the end of this step, writing a checkpoint" in err
    assert f"stopped by SIGTERM at step 3; checkpoint: {out / 'checkpoint-3'}" in err
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-3"]
    assert (out / "checkpoint-3" / MANIFEST_NAME).is_file() and not (out / STAGING_DIR).exists()
    assert snapshot(out / "checkpoint-2") == before  # the earlier checkpoint is untouched
    assert list(temp_parent.iterdir()) == []  # the registered temporary folder was removed
    resume_and_compare(out, reference, Path(str(out) + ".jsonl"), 4)


def test_sigint_without_checkpoint_when_turned_off(tmp_path, spawn):
    out = tmp_path / "run"
    proc = spawn(out, "--hold", "step:3", "--wait", "signal", env={signals.CHECKPOINT_ENV: "0"})
    wait_for(lambda: Path(str(out) + ".hold").exists(), proc, what="step 3 to begin")
    proc.send_signal(signal.SIGINT)
    rc, err = finish(proc)
    assert rc in (-signal.SIGINT, 128 + signal.SIGINT), err  # KeyboardInterrupt, as Python ends on one
    assert f"stopped by SIGINT at step 3; no checkpoint written ({signals.CHECKPOINT_ENV}=0)" in err
    assert checkpoints(out) == ["checkpoint-2"]
    assert read_losses(Path(str(out) + ".jsonl"))[3]  # step 3 did finish


def test_a_second_signal_during_the_save_stops_at_once_and_leaves_no_partial_checkpoint(tmp_path, spawn, reference):
    out = tmp_path / "run"
    proc = spawn(out, "--hold", "save:4", "--wait", "forever")
    wait_for(lambda: Path(str(out) + ".hold").exists(), proc, what="the save of step 4")
    assert (out / STAGING_DIR / "checkpoint-4" / "model.safetensors").is_file()  # really half-way
    before = snapshot(out / "checkpoint-2")
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: Path(str(out) + ".got").exists(), proc, what="the first SIGTERM to arrive")
    proc.send_signal(signal.SIGTERM)
    rc, err = finish(proc)
    assert rc == 128 + signal.SIGTERM, err
    assert "second SIGTERM: stopping now" in err
    assert checkpoints(out) == ["checkpoint-2"] and not (out / STAGING_DIR).exists()
    assert snapshot(out / "checkpoint-2") == before
    resume_and_compare(out, reference, Path(str(out) + ".jsonl"), 3)


def test_sigkill_during_a_save_leaves_no_checkpoint_that_resume_would_pick(tmp_path, spawn, reference):
    out, temp_parent = tmp_path / "run", tmp_path / "activations"
    proc = spawn(out, "--hold", "save:4", "--wait", "forever", "--temp-parent", str(temp_parent))
    wait_for(lambda: Path(str(out) + ".hold").exists(), proc, what="the save of step 4")
    proc.kill()
    proc.wait(60)
    # upstream would leave a checkpoint-4 without optimizer.pt here, and resume would pick it
    assert checkpoints(out) == ["checkpoint-2"]
    assert (out / STAGING_DIR / "checkpoint-4").is_dir()
    stale = list(temp_parent.iterdir())
    assert len(stale) == 1  # SIGKILL runs no cleanup ...
    assert signals.make_temp_dir(temp_parent, prefix="fake-owner-").parent == temp_parent
    assert not stale[0].exists()  # ... the next owner of that folder removes it
    before = snapshot(out / "checkpoint-2")
    resume_and_compare(out, reference, Path(str(out) + ".jsonl"), 3)
    assert not (out / STAGING_DIR).exists()  # the partial checkpoint was removed by the next run
    assert snapshot(out / "checkpoint-2") == before


# ---- the temporary-file API, with a fake owner -----------------------------------------------------------------
def test_stale_temp_folders_of_dead_owners_are_removed_and_live_or_foreign_ones_kept(tmp_path):
    parent = tmp_path / "scratch"
    parent.mkdir()
    owners = {"dead": dead_owner(),
              "alive": signals.owner_record(),
              "other-host": dict(dead_owner(), host="elsewhere.example")}
    for name, owner in owners.items():
        (parent / f"x-{name}").mkdir()
        (parent / f"x-{name}" / signals.OWNER_FILE).write_text(json.dumps(owner))
    (parent / "x-unmarked").mkdir()  # not made through the API: never touched
    (parent / "user.txt").write_text("keep")
    removed = signals.remove_stale(parent, "x-")
    assert [p.name for p in removed] == ["x-dead"]
    assert sorted(p.name for p in parent.iterdir()) == ["user.txt", "x-alive", "x-other-host", "x-unmarked"]


def test_register_cleanup_paths_and_callables(tmp_path):
    calls = []
    f, d = tmp_path / "a.bin", tmp_path / "dir"
    f.write_bytes(b"1")
    d.mkdir()
    (d / "b").write_bytes(b"2")
    signals.register_cleanup(f)
    signals.register_cleanup(d)
    h = signals.register_cleanup(lambda: calls.append("called"))
    signals.register_cleanup(lambda: 1 / 0)  # a failing owner does not stop the others
    keep = tmp_path / "keep"
    keep.write_bytes(b"3")
    signals.register_cleanup(keep)
    signals.unregister_cleanup(keep)
    assert h in range(1, 10**9)
    errors = signals.run_cleanups()
    assert len(errors) == 1 and "ZeroDivisionError" in errors[0]
    assert not f.exists() and not d.exists() and calls == ["called"] and keep.exists()
    assert signals.run_cleanups() == []  # run once
    with pytest.raises(TypeError, match="path or a callable"):
        signals.register_cleanup(42)


def test_make_temp_dir_is_private_and_marked(tmp_path):
    path = signals.make_temp_dir(tmp_path / "p", prefix="own-")
    try:
        assert path.name.startswith("own-") and oct(path.stat().st_mode & 0o777) == "0o700"
        assert signals.owner_alive(signals.read_owner(path)) is True
        assert str(path) in map(str, signals.registered_cleanups())
    finally:
        signals.run_cleanups()
    assert not path.exists()


def test_handlers_are_restored_after_training(tmp_path):
    before = {s: signal.getsignal(s) for s in signals.SIGNALS}
    trainer = build(tmp_path / "run", max_steps=1, save_strategy="no")
    trainer.train()
    assert {s: signal.getsignal(s) for s in signals.SIGNALS} == before
    assert not trainer._lowmem_stopper.installed and not os.listdir(tmp_path / "run")


def test_sigterm_to_one_ddp_rank_stops_every_rank_at_the_same_step_with_one_checkpoint(tmp_path):
    """The request is shared at the step boundary: without it the other rank would train on and hang."""
    from tests.faults.conftest import REPO

    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_LOWMEM_", "ACCELERATE_", "WORLD_SIZE", "RANK"))}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    err = tmp_path / "stderr.txt"
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           str(REPO / "examples" / "accelerate" / "ddp.yaml"), "--num_processes", "2", "--mixed_precision", "no",
           "--main_process_port", "0", "-m", "tests.faults.tinyrun", "--out", str(out), "--log", str(out) + ".jsonl",
           "--hold", "step:3", "--wait", "signal"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(err, "w"))
    proc.stderr_path = err
    try:
        markers = [Path(str(out) + ".hold"), Path(str(out) + ".hold.1")]
        wait_for(lambda: all(m.exists() and m.read_text().strip() for m in markers), proc, what="both ranks in step 3")
        os.kill(int(markers[1].read_text()), signal.SIGTERM)  # only rank 1 is told
        Path(str(out) + ".release").write_text("")  # rank 0 goes on, unaware
        rc, text = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(60)
    assert rc != 0 and text.count("stopped by SIGTERM at step 3; checkpoint:") == 1, text[-3000:]
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-3"] and not (out / STAGING_DIR).exists()
    manifest = json.loads((out / "checkpoint-3" / MANIFEST_NAME).read_text())
    assert manifest["world_size"] == 2 and manifest["step"] == 3
