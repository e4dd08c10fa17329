"""Stopping a run cleanly on SIGTERM / SIGINT, and temporary files that nothing leaves behind.

Signals
    While :meth:`LowMemTrainer.train` runs, the first SIGTERM (what schedulers send on preemption) or
    SIGINT (Ctrl-C) asks the run to stop at the next optimizer-step boundary. The run then writes a
    checkpoint (on by default; ``HF_LOWMEM_SIGNAL_CHECKPOINT=0`` turns it off), runs the registered
    cleanups, prints one line saying where the checkpoint is, and ends ``train()`` with
    ``SystemExit(128 + signum)`` for SIGTERM (exit status 143, what a shell reports for a process that
    SIGTERM stopped) or ``KeyboardInterrupt`` for SIGINT. A second signal stops at once: cleanups run,
    a checkpoint being written is removed (the complete ones stay), and the same exception is raised
    from wherever the run was. The handlers that were there before are restored when ``train()`` ends.
    Under several processes the request is shared at each step boundary (one tiny all-reduce), so every
    rank stops at the same step.

Temporary files
    :func:`register_cleanup` takes a path (file or folder) or a callable; registered entries run when a
    signal stops the run, when ``train()`` raises, and at interpreter exit, whichever comes first. Owners
    that remove their files themselves call :func:`unregister_cleanup`.

    :func:`make_temp_dir` makes a private folder (mode 0700, unpredictable name) under a parent folder,
    writes an owner marker (:data:`OWNER_FILE`: host, pid and the process's start time) into it and
    registers it for cleanup. A run killed with SIGKILL runs no cleanup; the next one that makes a temp
    folder under the same parent (or calls :func:`remove_stale`) finds folders whose marker names a
    process of this host that no longer runs, and removes them. Folders of other hosts are left alone.

Exit
    After a ``train()`` that returned normally under several processes, :func:`destroy_process_group_at_exit`
    destroys the default process group at interpreter exit (unless the script did so itself). Without it,
    Gloo's worker threads can still hold work objects when the interpreter finalizes and the process
    aborts (SIGABRT, "terminate called without an active exception"; pytorch/pytorch#179291), so a run
    that trained fine exits with status -6. After an exception it is left alone: ranks that are still in
    a collective would make a destroy hang.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger("hf_lowmem")

#: the owner marker inside a temporary folder made by :func:`make_temp_dir`
OWNER_FILE = ".hf_lowmem_owner.json"
#: environment variable: ``0`` stops a signalled run without writing a checkpoint
CHECKPOINT_ENV = "HF_LOWMEM_SIGNAL_CHECKPOINT"
SIGNALS = (signal.SIGTERM, signal.SIGINT)

_lock = threading.RLock()
_cleanups: dict[int, tuple[str, Any]] = {}
_next_handle = 0
_atexit_installed = False


# ---- cleanup registry ----------------------------------------------------------------------------------
def register_cleanup(target: str | os.PathLike | Callable[[], Any]) -> int:
    """Remove ``target`` (a file or folder path) or call it (a callable) when the run stops on a signal,
    when ``train()`` raises, or at interpreter exit. Returns a handle for :func:`unregister_cleanup`."""
    global _next_handle, _atexit_installed
    if not (callable(target) or isinstance(target, (str, os.PathLike))):
        raise TypeError(f"register_cleanup takes a path or a callable, got {type(target).__name__}")
    with _lock:
        _next_handle += 1
        _cleanups[_next_handle] = (str(target) if not callable(target) else "", target)
        if not _atexit_installed:
            atexit.register(run_cleanups)
            _atexit_installed = True
        return _next_handle


def unregister_cleanup(handle_or_path: int | str | os.PathLike) -> None:
    """Forget a registered cleanup, by the handle :func:`register_cleanup` returned or by its path."""
    with _lock:
        if isinstance(handle_or_path, int):
            _cleanups.pop(handle_or_path, None)
            return
        key = str(handle_or_path)
        for h in [h for h, (p, _) in _cleanups.items() if p and p == key]:
            del _cleanups[h]


def registered_cleanups() -> list[Any]:
    """The registered targets (paths and callables), oldest first."""
    with _lock:
        return [t for _, (_, t) in sorted(_cleanups.items())]


def run_cleanups() -> list[str]:
    """Run every registered cleanup (newest first) and forget them; returns the failures, one line each.
    A failing cleanup does not stop the others."""
    with _lock:
        items = sorted(_cleanups.items(), reverse=True)
        _cleanups.clear()
    errors = []
    for _, (_, target) in items:
        try:
            if callable(target):
                target()
            else:
                _remove(Path(target))
        except Exception as e:  # noqa: BLE001 - one failing owner must not keep the others' files
            errors.append(f"{target}: {type(e).__name__}: {e}")
    for e in errors:
        logger.warning("hf-lowmem: a cleanup failed: %s", e)
    return errors


_destroy_installed = False


def destroy_process_group_at_exit() -> None:
    """Destroy the default process group at interpreter exit if it is still there (see *Exit* above)."""
    global _destroy_installed
    with _lock:
        if _destroy_installed:
            return
        _destroy_installed = True
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


# ---- owner markers and stale folders ------------------------------------------------------------------
def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_record(purpose: str = "") -> dict[str, Any]:
    """What an owner marker records about this process."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _proc_start(os.getpid()),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "purpose": purpose}


def write_owner(folder: str | os.PathLike, purpose: str = "") -> Path:
    """Write the owner marker of this process into ``folder``."""
    path = Path(folder) / OWNER_FILE
    path.write_text(json.dumps(owner_record(purpose)) + "\n")
    return path


def read_owner(folder: str | os.PathLike) -> dict[str, Any] | None:
    try:
        return json.loads((Path(folder) / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None


def owner_alive(owner: dict[str, Any] | None) -> bool | None:
    """Whether the process a marker names still runs: ``True``/``False`` on this host, ``None`` when the
    marker is unreadable or names another host (which this process cannot check)."""
    if not owner or owner.get("host") != socket.gethostname():
        return None
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    if pid == os.getpid() and owner.get("start") == _proc_start(pid):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    start = _proc_start(pid)
    return not (start is not None and owner.get("start") is not None and start != owner["start"])


def remove_stale(parent: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Remove the folders under ``parent`` whose name starts with ``prefix`` and whose owner marker names a
    process of this host that no longer runs. Returns what it removed (logged once)."""
    parent = Path(parent)
    removed: list[Path] = []
    try:
        children = list(parent.iterdir())
    except OSError:
        return removed
    for child in children:
        if not child.name.startswith(prefix) or child.is_symlink() or not child.is_dir():
            continue
        owner = read_owner(child)
        if owner is not None and owner_alive(owner) is False:
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    if removed:
        logger.warning("hf-lowmem: removed %d temporary folder(s) that an interrupted run left in %s: %s",
                       len(removed), parent, ", ".join(p.name for p in removed))
    return removed


def make_temp_dir(parent: str | os.PathLike, prefix: str = "hf_lowmem-", purpose: str = "") -> Path:
    """A fresh private folder under ``parent`` (created if needed), marked with this process as owner and
    registered for cleanup. Stale folders with the same ``prefix`` that killed runs left there are
    removed first."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale(parent, prefix)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))  # mode 0700, unpredictable name
    write_owner(path, purpose)
    register_cleanup(path)
    return path


# ---- signals --------------------------------------------------------------------------------------------
def checkpoint_on_signal_default() -> bool:
    return (os.environ.get(CHECKPOINT_ENV, "1").strip().lower() not in ("0", "false", "no", "off"))


class StopOnSignal:
    """The SIGTERM/SIGINT handler of one trainer, and the callback that turns a request into a stop at the
    next step boundary. :meth:`install` and :meth:`restore` bracket ``train()``.

    Built lazily as a ``TrainerCallback`` subclass by :func:`stop_on_signal_callback`, so that importing
    this module does not import transformers."""

    def __init__(self, checkpoint: bool | None = None):
        self.checkpoint = checkpoint_on_signal_default() if checkpoint is None else bool(checkpoint)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self.installed = False

    # -- handler ---------------------------------------------------------------------------------------
    def install(self) -> None:
        """Install the handlers (main thread only; elsewhere Python cannot, and signals keep their default)."""
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            logger.info("hf-lowmem: train() runs outside the main thread; SIGTERM/SIGINT keep their own handlers")
            return
        for s in SIGNALS:
            self._previous[s] = signal.getsignal(s)
            signal.signal(s, self._handle)
        self.installed = True

    def restore(self) -> None:
        if not self.installed:
            return
        for s, prev in self._previous.items():
            try:
                signal.signal(s, prev if prev is not None else signal.SIG_DFL)
            except (ValueError, TypeError):  # pragma: no cover - not the main thread any more
                pass
        self._previous.clear()
        self.installed = False

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            then = "writing a checkpoint" if self.checkpoint else f"without a checkpoint ({CHECKPOINT_ENV}=0)"
            _say(f"hf-lowmem: {name} received: stopping at the end of this step, {then}; "
                 f"send it again to stop at once")
            return
        self.restore()
        run_cleanups()
        _say(f"hf-lowmem: second {name}: stopping now")
        raise self.exception(signum)

    @staticmethod
    def exception(signum: int) -> BaseException:
        if signum == signal.SIGINT:
            return KeyboardInterrupt()
        return SystemExit(128 + int(signum))

    # -- step boundary ----------------------------------------------------------------------------------
    def requested(self, args: Any = None) -> bool:
        """Whether a stop was asked, agreed across processes when several run (a MAX all-reduce)."""
        flag = self.received or 0
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                import torch

                device = getattr(args, "device", None) if dist.get_backend() == "nccl" else torch.device("cpu")
                t = torch.tensor([flag], dtype=torch.int64, device=device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                flag = int(t.item())
        except Exception as e:  # noqa: BLE001 - a failing collective must not hide the local request
            logger.debug("hf-lowmem: could not share the stop request: %s", e)
        if flag and not self.received:
            self.received = flag
        return bool(flag)

    def finish(self, trainer: Any) -> None:
        """After ``train()`` returned on a request: clean up, say where the checkpoint is, raise."""
        signum = int(self.received or signal.SIGTERM)
        run_cleanups()
        name = signal.Signals(signum).name
        step = getattr(getattr(trainer, "state", None), "global_step", "?")
        saved = getattr(trainer, "_lowmem_last_checkpoint", None)
        if saved and self.checkpoint:
            where = f"checkpoint: {saved}; resume with resume_from_checkpoint=True (--resume_from_checkpoint {saved})"
        elif self.checkpoint:
            where = "no checkpoint was written"
        else:
            where = f"no checkpoint written ({CHECKPOINT_ENV}=0)"
        if getattr(getattr(trainer, "args", None), "should_log", True):
            _say(f"hf-lowmem: stopped by {name} at step {step}; {where}")
        raise self.exception(signum)


def _say(line: str) -> None:
    """One line on stderr, whatever logging is configured to (a stop must be seen)."""
    logger.debug(line)
    try:
        print(line, file=sys.stderr, flush=True)
    except Exception:  # pragma: no cover - a closed stderr
        pass


def stop_on_signal_callback(checkpoint: bool | None = None):
    """A ``TrainerCallback`` that is also a :class:`StopOnSignal`: at each step end (and after each save)
    it turns a received signal into ``should_training_stop`` (+ ``should_save`` when checkpointing)."""
    from transformers import TrainerCallback

    class StopOnSignalCallback(StopOnSignal, TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if self.requested(args):
                control.should_training_stop = True
                if self.checkpoint:
                    control.should_save = True
            return control

        def on_save(self, args, state, control, **kwargs):
            if self.requested(args):  # a signal that came while this checkpoint was written
                control.should_training_stop = True
            return control

    return StopOnSignalCallback(checkpoint)
