"""Export overwrite safety, a full disk during an export, and temporary folders of killed exports."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys

import pytest

from hf_lowmem.export import ExportError, export_model
from hf_lowmem.signals import OWNER_FILE, owner_record
from tests.faults.conftest import REPO, dead_owner
from tests.faults.tinyrun import build, snapshot
from tests.tiny import tiny_model


def test_exporting_over_a_training_folder_refuses_and_deletes_nothing(trained):
    before = snapshot(trained)
    trainer = build(trained)
    with pytest.raises(ExportError, match=r"the output folder '.*run' holds files that no export wrote \(NOTES.md, "
                                          r"checkpoint-2, checkpoint-4, checkpoint-6\); --overwrite replaces only an "
                                          r"earlier export, so choose another --output \(e.g. '.*run/export'\)"):
        export_model(trainer, trainer.args.output_dir, "hf", overwrite=True)  # before: every checkpoint deleted
    assert snapshot(trained) == before
    # beside the checkpoints it works, and an earlier export is still replaced
    export_model(trainer, trained / "export", "hf")
    export_model(trainer, trained / "export", "torchscript", overwrite=True)
    assert (trained / "export" / "model.pt").is_file() and not (trained / "export" / "model.safetensors").exists()
    assert {k: v for k, v in snapshot(trained).items() if not k.startswith("export/")} == before


def test_a_folder_with_an_extra_file_beside_an_export_is_not_replaced(tmp_path):
    out = tmp_path / "deploy"
    export_model(tiny_model(), out, "hf")
    (out / "README.md").write_text("my model card\n")
    before = snapshot(out)
    with pytest.raises(ExportError, match=r"holds files that no export wrote \(README.md\)"):
        export_model(tiny_model(seed=1), out, "hf", overwrite=True)
    assert snapshot(out) == before


def test_temporary_folders_of_a_killed_export_are_removed_by_the_next_one(tmp_path):
    out = tmp_path / "deploy"
    stale, live = tmp_path / ".deploy.partial-dead0001", tmp_path / ".deploy.partial-live0001"
    for folder, owner in ((stale, dead_owner()), (live, owner_record())):
        folder.mkdir()
        (folder / OWNER_FILE).write_text(json.dumps(owner))
        (folder / "model.pt").write_bytes(b"half")
    export_model(tiny_model(), out, "torchscript")
    assert not stale.exists() and live.exists()  # a live export's folder is not touched
    assert OWNER_FILE not in os.listdir(out)  # the marker is not part of the export


SCRIPT = """
import sys
from tests.tiny import tiny_model
from hf_lowmem.export import ExportError, export_model
try:
    export_model(tiny_model(vocab_size=1000, hidden_size=64), sys.argv[1], "torchscript")
except ExportError as e:
    print("ExportError:", e, file=sys.stderr)
    raise SystemExit(3)
"""


def _limit_file_size():  # in the child: writes past 200 kB fail with EFBIG instead of killing it (SIGXFSZ)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


@pytest.mark.skipif(sys.platform != "linux", reason="tmpfs / RLIMIT_FSIZE")
def test_a_full_disk_during_a_torchscript_export_is_one_line_and_leaves_nothing(tmp_path, small_disk):
    disk = small_disk("300k")
    parent = disk if disk is not None else tmp_path / "limited"
    parent.mkdir(exist_ok=True)
    (parent / "keep.txt").write_text("the user's file\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(parent / "out")], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300, preexec_fn=None if disk is not None else _limit_file_size)
    assert r.returncode == 3, r.stderr[-3000:]  # before: -6 (SIGABRT) with a C++ traceback
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("ExportError:")]
    expect = "is full" if disk is not None else "hit the file-size limit"
    assert len(line) == 1 and f"writing the torchscript export to '{parent / 'out'}' failed: " in line[0] and expect in line[0]
    assert sorted(os.listdir(parent)) == ["keep.txt"]  # no .partial-* folder, no output
    assert (parent / "keep.txt").read_text() == "the user's file\n"
