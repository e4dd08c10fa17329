"""The stream engine's SSD tier (issue 14) on tiny models: master weights and optimizer states in block files,
read ahead and written behind through a small window of host buffers. Its losses and weights equal the RAM
tier's (fp32: exactly), across save and resume and across a save killed halfway; host memory is the window;
direct I/O leaves no page cache; damaged or mismatched state is refused in one line."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from hf_lowmem import LowMemTrainer
from hf_lowmem.engine import aio
from hf_lowmem.errors import CheckpointError, MemoryBudgetError, PluginError
from tests.tiny import RandomTokens, logged_losses, tiny_model, train_args

TOL = 1e-5
REPO = Path(__file__).resolve().parents[1]
KW = {"max_steps": 4, "gradient_accumulation_steps": 2, "learning_rate": 1e-2, "max_grad_norm": 1.0, "weight_decay": 0.1,
          "lowmem_offload": ["stream"]}


def _ssd(tmp_path, **opts):
    return {"stream": {"offload_dir": str(tmp_path / "offload"), "disk_gbps": 2.0, **opts}}


def _run(out, options=None, model_kw=None, resume=None, **kw):
    args = train_args(out, **{**KW, "lowmem_options": options or {}, **kw})
    t = LowMemTrainer(model=tiny_model(**(model_kw or {})), args=args, train_dataset=RandomTokens())
    t.train(resume_from_checkpoint=resume)
    return t


def _weights(t) -> list[torch.Tensor]:
    t.lowmem_engine.flush()
    return [p.detach().clone() for p in t.model.parameters()]


def _max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("window,stash,tied", [(2, 1, False), (3, 2, True), (2, 3, False)],
                         ids=["window2", "window3-stash2-tied", "window2-stash3"])
def test_ssd_tier_equals_the_ram_tier(tmp_path, window, stash, tied):
    mk = {"num_hidden_layers": 6, "tie_word_embeddings": tied}
    ram = _run(tmp_path / "ram", {"stream": {"stash_every": stash}}, mk)
    ssd = _run(tmp_path / "ssd", _ssd(tmp_path, offload_window=window, stash_every=stash), mk)
    store = ssd.lowmem_engine.store
    assert store.file_backed and len(store.paths) == 8
    assert max(abs(a - b) for a, b in zip(logged_losses(ram), logged_losses(ssd))) < TOL
    ev = RandomTokens(n=4, seed=3)
    assert abs(ram.evaluate(ev)["eval_loss"] - ssd.evaluate(ev)["eval_loss"]) < TOL
    assert _max_diff(_weights(ram), _weights(ssd)) < TOL  # the parameters are views of the block files
    # the blocks really went through the disk: more reads than blocks, every block written once per step
    assert store.stats["reads"] > 2 * len(store.paths) and store.stats["writes"] >= 4 * len(store.paths)
    assert all(os.path.getsize(p) == n for p, n in zip(store.paths, store.block_bytes))


def test_compact_tier_through_the_ssd_equals_the_compact_tier_in_ram(tmp_path):
    pytest.importorskip("bitsandbytes")
    mk = {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128}
    ram = _run(tmp_path / "ram", {"stream": {"tier": "compact"}}, mk)
    ssd = _run(tmp_path / "ssd", {"stream": {**_ssd(tmp_path)["stream"], "tier": "compact"}}, mk)
    assert logged_losses(ram) == logged_losses(ssd)  # same stochastic rounding draws, same 4-bit states
    assert _max_diff(_weights(ram), _weights(ssd)) == 0
    assert ssd.lowmem_engine.store.master_dtype == torch.bfloat16


def test_host_memory_is_the_window_of_blocks(tmp_path):
    """Every host buffer the engine allocated (the arena's mappings): the window and the stash pool, nothing
    the size of the model's masters or states."""
    mk = {"num_hidden_layers": 12, "hidden_size": 64, "intermediate_size": 128}
    t = _run(tmp_path / "ssd", _ssd(tmp_path, offload_window=3), mk, max_steps=2)
    eng = t.lowmem_engine
    store = eng.store
    pool = sum(s.numel() for s in eng.pool.slots)
    window = len(store._bufs) * aio.round_up(store.buf_bytes, mmap.PAGESIZE)
    assert len(store._bufs) == 3
    assert eng.arena.nbytes == window + sum(aio.round_up(s.numel(), mmap.PAGESIZE) for s in eng.pool.slots)
    assert store.file_bytes() > 3 * window  # the model's state is several windows large: the bound means something
    ram = _run(tmp_path / "ram", {}, mk, max_steps=2)
    assert ram.lowmem_engine.arena.nbytes - pool > 3 * window  # the RAM tier holds it all
    est = eng.estimate(16 * 2, 2)
    assert est["host"]["master_weights"] == est["host"]["optimizer_states"] == 0
    assert est["host"]["ssd_window"] >= window * 0.9


# ---- direct I/O and the page cache -------------------------------------------------------------------------------
def _cached_pages(path: str) -> int:
    """Pages of ``path`` in the page cache (``mincore`` over a mapping that touches nothing)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    os.close(fd)
    vec = ctypes.create_string_buffer(-(-size // mmap.PAGESIZE))
    assert libc.mincore(addr, size, vec) == 0
    libc.munmap(addr, size)
    return sum(b & 1 for b in vec.raw)


def _fs_type(path: Path) -> str:
    best, fs = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        _dev, mnt, typ = line.split()[:3]
        if str(path.resolve()).startswith(mnt) and len(mnt) > len(best):
            best, fs = mnt, typ
    return fs


def _direct_folder(tmp_path: Path) -> Path | None:
    for cand in (tmp_path, REPO / ".pytest-ssd"):
        cand.mkdir(exist_ok=True)
        if aio.direct_io_supported(str(cand)) and _fs_type(cand) not in ("tmpfs", "ramfs", ""):
            return cand
    return None


@pytest.mark.parametrize("direct_io", ["auto", "off"], ids=["o_direct", "buffered-fadvise"])
def test_no_page_cache_is_left_behind(tmp_path, caplog, direct_io):
    root = _direct_folder(tmp_path)
    if root is None:
        pytest.skip(f"neither {tmp_path} nor the worktree is on a disk file system that supports O_DIRECT "
                    "(tmpfs keeps every file in memory)")
    caplog.set_level("INFO", logger="hf_lowmem")
    opts = {"stream": {"offload_dir": str(root / f"off-{direct_io}"), "disk_gbps": 2.0, "direct_io": direct_io,
                       "offload_window": 2}}
    t = _run(tmp_path / "out", opts, {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128})
    store = t.lowmem_engine.store
    store.sync()
    assert store.direct == (direct_io == "auto")
    said = "direct I/O (O_DIRECT" if direct_io == "auto" else "buffered I/O, each transfer's pages dropped"
    assert any(said in r.getMessage() for r in caplog.records)
    assert store.stats["read_bytes"] > 0 and store.stats["write_bytes"] > store.file_bytes()
    cached = sum(_cached_pages(p) for p in store.paths)
    assert cached <= len(store.paths)  # (a page per file at most: the last one the buffered path flushed)


def test_without_direct_io_support_on_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(aio, "direct_io_supported", lambda folder: False)
    with pytest.raises(PluginError, match="does not support O_DIRECT"):
        _run(tmp_path / "out", _ssd(tmp_path, direct_io="on"))


# ---- checkpoints --------------------------------------------------------------------------------------------------
def test_resume_continues_with_the_losses_of_an_uninterrupted_run(tmp_path):
    mk = {"num_hidden_layers": 4}
    kw = {"max_steps": 6, "save_strategy": "steps", "save_steps": 3}
    ram = _run(tmp_path / "ram", {}, mk, **kw)
    full = _run(tmp_path / "full", _ssd(tmp_path / "a"), mk, **kw)
    ck = tmp_path / "full" / "checkpoint-3"
    manifest = json.loads((ck / "hf_lowmem_checkpoint.json").read_text())
    blocks = sorted(p.name for p in (ck / "offload").glob("block-*.bin"))
    assert len(blocks) == 6 and not list(ck.glob("*.safetensors"))  # the state files are the checkpoint
    assert all(manifest["files"][f"offload/{b}"]["checked_by"] for b in blocks)
    # steps 4-6 wrote new files: the checkpoint's own files still match the checksums written with them
    index = json.loads((ck / "offload" / "index.json").read_text())
    store = full.lowmem_engine.store
    for k, entry in enumerate(index["blocks"]):
        path = ck / "offload" / entry["file"]
        assert os.stat(path).st_ino != os.stat(store.paths[k]).st_ino
        t = torch.from_file(str(path), size=entry["bytes"], dtype=torch.uint8)
        split = store.split[k]
        with ThreadPoolExecutor(2) as pool:
            assert aio.digest_of(pool, t[:split].clone(), index["checksum"]) == entry["digests"]["master"]
    again = _run(tmp_path / "full", _ssd(tmp_path / "b"), mk, resume=str(ck), **kw)
    assert logged_losses(again)[-3:] == logged_losses(full)[3:]
    assert max(abs(a - b) for a, b in zip(logged_losses(full), logged_losses(ram))) < TOL
    assert _max_diff(_weights(again), _weights(full)) == 0
    assert _max_diff(_weights(full), _weights(ram)) < TOL


def test_a_damaged_block_file_is_refused_when_read(tmp_path):
    kw = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    _run(tmp_path / "out", _ssd(tmp_path), **kw)
    bad = tmp_path / "out" / "checkpoint-2" / "offload" / "block-00001.bin"
    with open(bad, "r+b") as f:  # same size, one bit flipped in the master weights
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(CheckpointError, match=r"block 1's master weights .* do not match the checksum"):
        _run(tmp_path / "out", _ssd(tmp_path), resume=str(tmp_path / "out" / "checkpoint-2"), **kw)


def test_a_truncated_block_file_is_refused_before_training(tmp_path):
    kw = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    _run(tmp_path / "out", _ssd(tmp_path), **kw)
    ck = tmp_path / "out" / "checkpoint-2"
    os.truncate(ck / "offload" / "block-00002.bin", 4096)
    with pytest.raises(CheckpointError, match="block-00002.bin has 4096 bytes"):
        _run(tmp_path / "out", _ssd(tmp_path), resume=str(ck), **kw)


def test_tiers_do_not_resume_each_others_checkpoints(tmp_path):
    kw = {"max_steps": 2, "save_strategy": "steps", "save_steps": 2}
    _run(tmp_path / "ram", {}, **kw)
    _run(tmp_path / "ssd", _ssd(tmp_path), **kw)
    with pytest.raises(CheckpointError, match="written without offload_dir"):
        _run(tmp_path / "x", _ssd(tmp_path / "x"), resume=str(tmp_path / "ram" / "checkpoint-2"), **kw)
    with pytest.raises(CheckpointError, match="written by the SSD tier"):
        _run(tmp_path / "y", {}, resume=str(tmp_path / "ssd" / "checkpoint-2"), **kw)


CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from hf_lowmem import LowMemTrainer
    from hf_lowmem.engine import aio
    from tests.tiny import RandomTokens, tiny_model, train_args
    calls = [0]
    link = aio.link_or_copy
    def dying_link(src, dst):
        if "checkpoint-4" in dst:
            calls[0] += 1
            if calls[0] == 3:  # halfway through linking the step-4 checkpoint's block files
                os.kill(os.getpid(), signal.SIGKILL)
        return link(src, dst)
    aio.link_or_copy = dying_link
    args = train_args({out!r}, **{kw!r}, lowmem_options={opts!r})
    LowMemTrainer(model=tiny_model(num_hidden_layers=4), args=args, train_dataset=RandomTokens()).train()
""")


def test_a_save_killed_halfway_resumes_from_the_last_complete_checkpoint(tmp_path):
    kw = {"max_steps": 6, "save_strategy": "steps", "save_steps": 2}
    opts = _ssd(tmp_path)
    ref = _run(tmp_path / "ref", _ssd(tmp_path / "r"), {"num_hidden_layers": 4}, **kw)
    out = tmp_path / "out"
    code = CHILD.format(repo=str(REPO), out=str(out), kw={**KW, **kw}, opts=opts)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"), check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    assert list((out / ".hf_lowmem-staging").iterdir())  # the partial save the kill left behind
    again = _run(out, opts, {"num_hidden_layers": 4}, resume=True, **kw)
    assert logged_losses(again)[-4:] == logged_losses(ref)[2:]
    assert not (out / ".hf_lowmem-staging").exists()


# ---- options, preflight, export ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts,match", [
    ({"direct_io": "maybe"}, "direct_io must be one of"),
    ({"offload_window": 1}, "offload_window must be an integer >= 2"),
    ({"disk_gbps": 0}, "disk_gbps must be a positive number"),
    ({"offload_dir": ["/a", "/a"]}, "lists a folder twice"),
    ({"offload_dir": 3}, "offload_dir must be a folder"),
])
def test_bad_options_get_one_line(tmp_path, opts, match):
    with pytest.raises(PluginError, match=match):
        train_args(tmp_path, lowmem_offload=["stream"], lowmem_options={"stream": {"offload_dir": "/x", **opts}})


def test_a_disk_without_room_is_refused_with_both_numbers(tmp_path, monkeypatch):
    import shutil

    from hf_lowmem.engine import preflight

    real = shutil.disk_usage
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: real(p)._replace(free=8192))
    with pytest.raises(MemoryBudgetError, match=r"the SSD tier needs .* GiB in .* but its disk has 0.0 GiB free"):
        _run(tmp_path / "out", _ssd(tmp_path))


def test_one_offload_dir_per_run(tmp_path):
    """Another process's run is refused; an older engine of this process hands the folder over."""
    first = _run(tmp_path / "a", _ssd(tmp_path), max_steps=1)
    second = _run(tmp_path / "b", _ssd(tmp_path), max_steps=1)
    assert first.lowmem_engine.store._locks == [] and len(second.lowmem_engine.store._locks) == 1
    second.lowmem_engine.store.close()
    holder = subprocess.Popen([sys.executable, "-c", ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); "
                               "time.sleep(120)"), str(tmp_path / "offload" / ".hf_lowmem.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PluginError, match="in use by another training process"):
            _run(tmp_path / "c", _ssd(tmp_path), max_steps=1)
    finally:
        holder.kill()
        holder.wait()


def test_bandwidth_probe_is_measured_once_per_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = aio.measure_bandwidth(str(tmp_path), nbytes=32 << 20, threads=2)
    again = aio.measure_bandwidth(str(tmp_path), nbytes=32 << 20, threads=2)
    assert first["read_gbps"] > 0 and first["write_gbps"] > 0 and not first["cached"]
    assert again["cached"] and again["read_gbps"] == first["read_gbps"]


def test_save_model_writes_safetensors_that_load_with_the_trained_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    t = _run(tmp_path / "out", _ssd(tmp_path, offload_window=2), {"num_hidden_layers": 4}, max_steps=2)
    t.save_model(str(tmp_path / "final"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    assert _max_diff(_weights(t), [p.detach() for p in loaded.parameters()]) == 0
    assert not (tmp_path / "final" / "offload").exists()


@pytest.mark.parametrize("compact", [False, True], ids=["exact", "compact"])
def test_gradients_on_the_disk_change_nothing(tmp_path, compact):
    """offload_grads: the stored gradients go to their own files between backward and the update; the stash pool
    keeps only the activation stash; the losses are those of the RAM tier."""
    if compact:
        pytest.importorskip("bitsandbytes")
    tier = {"tier": "compact"} if compact else {}
    mk = {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128, "tie_word_embeddings": True}
    ram = _run(tmp_path / "ram", {"stream": dict(tier)}, mk, max_steps=3, save_strategy="steps", save_steps=2)
    ssd = _run(tmp_path / "ssd", _ssd(tmp_path, offload_grads=True, offload_window=2, **tier), mk, max_steps=3,
               save_strategy="steps", save_steps=2)
    eng = ssd.lowmem_engine
    assert eng.pool.grad_at == {} and all(os.path.getsize(p) > 0 for p in eng.store.grad_paths)
    assert sum(s.numel() for s in eng.pool.slots) < sum(s.numel() for s in ram.lowmem_engine.pool.slots)
    assert max(abs(a - b) for a, b in zip(logged_losses(ram), logged_losses(ssd))) < TOL
    assert _max_diff(_weights(ram), _weights(ssd)) < (TOL if not compact else 1e-9)
    assert not list((tmp_path / "ssd" / "checkpoint-2" / "offload").glob("grad-*"))  # not part of a checkpoint
