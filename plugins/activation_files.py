"""The files of ``activation-offload`` with ``target="disk"`` (:mod:`hf_lowmem_plugins.activation_offload`):
a private folder per run, made by :func:`hf_lowmem.signals.make_temp_dir` (mode 0700, an unpredictable
name, an owner marker, registered for cleanup, so that a signal or the next run after a SIGKILL removes
it), and files created with ``O_EXCL | O_NOFOLLOW`` and mode 0600: another user can neither read them nor
plant a file or a symlink where one will be written."""

from __future__ import annotations

import os
import shutil

from hf_lowmem.errors import PluginError

PREFIX = "hf_lowmem-activations-"  # the private folders' name prefix (remove_stale finds killed runs' ones by it)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def write_file(path, host_u8):
    # a new file only (O_EXCL: never an existing one, nor through a symlink), readable by this user alone
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_BINARY", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(host_u8.numpy()))
    except BaseException:
        try:
            os.remove(path)  # a partial file is of no use to anyone
        except OSError:
            pass
        raise


def read_file(path, nbytes, pin):
    import torch

    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    with os.fdopen(os.open(path, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_BINARY", 0)), "rb") as f:
        n = f.readinto(memoryview(buf.numpy()))
    if n != nbytes:
        raise RuntimeError(f"activation-offload: {path} holds {n} bytes, expected {nbytes}")
    return buf


def disk_hint() -> str:
    return ('to write elsewhere: lowmem_options={"activation-offload": {"target": "disk", "dir": "/a/larger/disk"}}, '
            'or keep activations in host memory with target "cpu"')


def make_private_dir(parent: str) -> str:
    from hf_lowmem.signals import make_temp_dir

    try:
        return str(make_temp_dir(parent, prefix=PREFIX, purpose="activation-offload"))
    except OSError as e:
        raise PluginError(f"activation-offload: cannot make its folder under {parent!r} ({e.strerror or e}); "
                          f'choose a writable folder with lowmem_options={{"activation-offload": {{"target": "disk", '
                          f'"dir": "/a/writable/path"}}}}') from None


def remove_private_dir(path: str) -> None:
    from hf_lowmem.signals import unregister_cleanup

    shutil.rmtree(path, ignore_errors=True)
    unregister_cleanup(path)


def schedule_remove(pool, written, path):
    try:
        pool.submit(remove_after, written, path)
    except RuntimeError:  # the pool is shut down (interpreter exit): remove now
        remove_after(written, path)


def remove_after(written, path):
    try:
        if written is not None:
            written.result()
    except Exception:  # noqa: BLE001 - a failed write leaves nothing to remove or an unreadable file
        pass
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
