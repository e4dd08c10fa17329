"""``activation-offload``: keep the activations saved for backward in host memory (or on disk).

While the decoder runs forward in training, ``torch.autograd.graph.saved_tensors_hooks`` hand every
tensor autograd saves (above ``min_bytes``, and not a parameter) to an offloader:

* ``target="cpu"`` (default): the tensor is copied into pinned host memory on a side CUDA stream, so the
  copy overlaps the next kernels; the GPU copy is released as soon as its copy has finished. At most
  ``max_pending_bytes`` (1 GiB) of GPU tensors wait for their copies: beyond that the forward waits for
  the oldest, since a forward that produces activations faster than PCIe drains them would otherwise
  hold them all on the GPU until the end of forward (on an H200, offloading every saved tensor of 8
  Llama-2-7B layers without checkpointing lowered the peak by only 4% before this cap; the cap itself is
  not measured on a GPU yet). In backward,
  unpacking a tensor starts the host-to-device copies of the tensors backward will need next (up to
  ``prefetch_bytes`` ahead, again on the side stream), so they arrive while the current layer computes.
* ``target="disk"``: the same, then a writer thread stores the bytes in a file under ``dir`` (default: the
  system's temporary directory); backward reads them back ahead of need on a reader thread. For sequences
  whose activations do not fit in host RAM. Files are deleted when autograd frees the saved tensor. They
  live in a private folder that :func:`hf_lowmem.signals.make_temp_dir` makes under ``dir`` (mode 0700, an
  unpredictable name, an owner marker), are created ``O_EXCL | O_NOFOLLOW`` with mode 0600, and the folder
  is removed when training ends, when a signal stops the run, at exit, or, after a SIGKILL, by the next run
  that offloads to the same ``dir``. A full disk is one :class:`~hf_lowmem.errors.PluginError` line naming
  the folder.

The newest saved tensors of each forward (``keep_bytes``, default ``prefetch_bytes``) are not offloaded:
backward needs them first, right after the loss, so their round trip could not be hidden behind compute
(it would stall the first layers of backward) and the prefetch would bring them straight back anyway. A
tensor is therefore copied out only once newer ones worth ``keep_bytes`` have been saved after it. A tensor
that several autograd nodes saved (the same storage, e.g. a norm's input) is copied once and, in backward,
brought back once: its GPU copy serves every node that unpacks it.

On a CPU-only run the same code path runs with plain copies (no streams), so tests can check that
training is unchanged. Offloading is lossless: values are copied bit for bit.

With ``gradient-checkpointing`` selected too, checkpointed layers save only their input (the
checkpointing plugin then uses the reentrant form, whose input goes through ``save_for_backward``), so
exactly one hidden state per checkpointed layer is offloaded and prefetched one layer ahead: the
activation memory left on the GPU is about one layer's recompute, independent of depth.

(Over 400 lines: the offloader is one state machine, pack in forward, offload behind a window, prefetch and
unpack in backward, for two targets; its pieces share its bookkeeping and would not read apart.)
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import secrets
import tempfile
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from hf_lowmem import Plugin, hookimpl
from hf_lowmem.anatomy import decoder, unwrap
from hf_lowmem.errors import PluginError
from hf_lowmem_plugins.activation_files import (disk_hint, make_private_dir, read_file, remove_private_dir,
                                                schedule_remove, write_file)

logger = logging.getLogger("hf_lowmem")

NAME = "activation-offload"
TARGETS = ("cpu", "disk")


@dataclass
class ActivationOffloadOptions:
    #: "cpu" (pinned host memory) or "disk" (files under `dir`)
    target: str = "cpu"
    #: directory for target="disk" (default: the system's temporary directory); the files go into a private
    #: folder made there for the run and removed after it
    dir: str | None = None
    #: saved tensors smaller than this stay where they are
    min_bytes: int = 1 << 20
    #: how many bytes of saved tensors backward fetches ahead of need (enough to hide the copy latency;
    #: a larger window brings activations back to the GPU earlier and gives back the memory saved)
    prefetch_bytes: int = 128 << 20
    #: the newest saved tensors of each forward, at least this many bytes, stay where they are (backward
    #: needs them first, so their round trip could not be hidden); default: prefetch_bytes. 0 offloads all
    keep_bytes: int | None = None
    #: GPU tensors whose device-to-host copy has not finished yet, at most this many bytes: beyond it the
    #: forward waits (on the host) for the oldest copy. Without a cap, a forward that produces activations
    #: faster than PCIe drains them keeps them all on the GPU until their copies end, and saves nothing at
    #: the peak. 0: no cap
    max_pending_bytes: int = 1 << 30

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.dir is not None and self.target != "disk":
            raise ValueError('dir is only used with target="disk"')
        if min(int(self.min_bytes), int(self.prefetch_bytes), int(self.kept_bytes()), int(self.max_pending_bytes)) < 0:
            raise ValueError("min_bytes, prefetch_bytes, keep_bytes and max_pending_bytes must be >= 0")

    def kept_bytes(self) -> int:
        return int(self.prefetch_bytes if self.keep_bytes is None else self.keep_bytes)


# ---- the offloader ---------------------------------------------------------------------------------------
class _Handle:
    """What autograd stores in place of an offloaded tensor."""

    __slots__ = ("idx", "device", "dtype", "shape", "stride", "nbytes", "host", "d2h", "gpu", "h2d",
                 "path", "written", "read", "prefetched", "resident", "version", "uses", "unpacks", "cached",
                 "modified", "__weakref__")

    def __init__(self, t):
        self.device, self.dtype, self.shape, self.stride = t.device, t.dtype, t.shape, t.stride()
        self.nbytes = t.numel() * t.element_size()
        self.idx = -1
        self.host = self.d2h = self.gpu = self.h2d = self.path = self.written = self.read = None
        self.prefetched = False
        # the tensor itself, detached (no reference cycle through its grad_fn), until it is offloaded; the
        # newest tensors of a forward keep it for good
        self.resident = t.detach()
        self.version = t._version
        self.uses, self.unpacks, self.cached = 1, 0, None  # autograd nodes that saved it; a copy they share
        self.modified = None  # (saved version, later version) if it was changed in place before it was copied


def _dense(t) -> bool:
    """Whether ``t`` covers its memory exactly once (a permutation of a contiguous layout), so that
    ``empty_strided`` with its strides can hold a copy."""
    if t.is_contiguous():
        return True
    expected = 1
    for d in sorted(range(t.dim()), key=t.stride):
        if t.size(d) == 1:
            continue
        if t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def _empty_like_layout(t_or_h, device=None, pin=False):
    import torch

    shape, stride, dtype = t_or_h.shape, t_or_h.stride() if callable(getattr(t_or_h, "stride")) else t_or_h.stride, t_or_h.dtype
    try:
        return torch.empty_strided(shape, stride, dtype=dtype, device=device, pin_memory=pin)
    except RuntimeError:
        return torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)


class ActivationOffloader:
    """Pack/unpack hooks that move saved tensors to pinned host memory or files, with prefetch.

    ``keep_bytes`` (default ``prefetch_bytes``): the newest saved tensors of a forward, at least this many
    bytes, are never copied out (a tensor is offloaded once that much has been saved after it)."""

    def __init__(self, target="cpu", dir=None, min_bytes=1 << 20, prefetch_bytes=128 << 20, keep_bytes=None,
                 max_pending_bytes=1 << 30):
        self.target, self.min_bytes, self.prefetch_bytes = target, int(min_bytes), int(prefetch_bytes)
        self.keep_bytes = self.prefetch_bytes if keep_bytes is None else int(keep_bytes)
        self.max_pending_bytes = int(max_pending_bytes)
        self._parent = dir
        self._dir = None  # the private folder under _parent, made on first use
        self._dir_finalizer = None
        self._token = secrets.token_hex(4)
        self._stream = None
        self._pending = collections.deque()  # (event, gpu tensor) kept alive until their device-to-host copy is done
        self._pending_bytes = 0
        self._order = []            # weakrefs to this forward's handles, in pack order
        self._recent = collections.deque()  # (weakref, nbytes) of handles packed but not offloaded yet
        self._recent_bytes = 0
        self._dedup = {}
        self._param_storages = set()
        self._cursor = None         # next index backward may prefetch from (downwards)
        self._inflight = 0          # bytes prefetched and not consumed yet
        self._counter = itertools.count()
        self._writer = self._reader = None
        self._last_write = None  # the newest write's future: a failed one stops the forward that follows
        self._lock = threading.Lock()
        self.stats = {"packed": 0, "packed_bytes": 0, "kept": 0, "offloaded": 0, "offloaded_bytes": 0,
                      "resident": 0, "prefetched": 0, "sync_fetches": 0, "shared_unpacks": 0, "throttled": 0}

    # -- lifecycle --
    def begin_forward(self, module=None):
        import torch

        self._order, self._dedup, self._cursor, self._inflight = [], {}, None, 0
        self._recent.clear()
        self._recent_bytes = 0
        if module is not None:
            self._param_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
            self._param_storages |= {b.untyped_storage().data_ptr() for b in module.buffers()}
        self._reap(block=False)
        self._torch = torch

    def end_forward(self):
        # what is still waiting is the forward's newest keep_bytes: it stays where it is for backward
        self.stats["resident"] += sum(1 for ref, _ in self._recent if ref() is not None)
        self._recent.clear()
        self._recent_bytes = 0
        self._reap(block=False)

    def hooks(self):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    @property
    def directory(self):
        """The private folder the files go to (made under ``dir`` on first use, again if it was removed)."""
        if self._dir is None or not os.path.isdir(self._dir):
            self._dir = make_private_dir(self._parent or tempfile.gettempdir())
            self._dir_finalizer = weakref.finalize(self, remove_private_dir, self._dir)
        return self._dir

    def close(self):
        """Wait for the writer, then remove the private folder (files still in it belong to no live tensor
        once training has ended). Offloading again makes a new folder."""
        if self._writer is not None:
            try:
                self._writer.submit(lambda: None).result()  # one worker: every earlier write and removal is done
            except RuntimeError:  # already shut down
                pass
        if self._dir_finalizer is not None:
            self._dir_finalizer()  # removes the folder and forgets its cleanup
        self._dir = self._dir_finalizer = None

    # -- helpers --
    def _side_stream(self, device):
        import torch

        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def _reap(self, block: bool, down_to: int | None = None):
        """Release the GPU tensors whose copies have finished; ``block``: wait for all of them; ``down_to``:
        wait for the oldest ones until at most that many bytes are still pending."""
        while self._pending:
            ev, t = self._pending[0]
            if block or (down_to is not None and self._pending_bytes > down_to):
                ev.synchronize()
            elif not ev.query():
                break
            self._pending.popleft()
            self._pending_bytes -= t.numel() * t.element_size()

    def _keep(self, t) -> bool:
        import torch

        if t.device.type not in ("cuda", "cpu") or t.is_sparse or t.layout != torch.strided:
            return True
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or isinstance(t, torch.nn.Parameter):
            return True
        if t.numel() * t.element_size() < self.min_bytes or t.numel() == 0:
            return True
        return t.untyped_storage().data_ptr() in self._param_storages

    @staticmethod
    def _check_version(h):
        """Raise, as autograd itself would, for a saved tensor changed in place before backward used it."""
        if h.resident is not None and h.resident._version != h.version:
            h.modified = (h.version, h.resident._version)
        if h.modified is not None:
            raise RuntimeError(
                "activation-offload: one of the tensors saved for backward was modified by an in-place operation "
                f"(shape {tuple(h.shape)}, {h.dtype}; version {h.modified[0]} when saved, {h.modified[1]} later). "
                "Make that operation out-of-place.")

    # -- pack: forward --
    def pack(self, t):
        import torch

        with torch.no_grad():
            return self._pack(t)

    def _pack(self, t):
        if self._keep(t):
            self.stats["kept"] += 1
            return t
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version)
        hit = self._dedup.get(key)
        if hit is not None and hit[0]() is t and hit[1]() is not None:
            h = hit[1]()
            h.uses += 1
            return h
        h = _Handle(t)
        h.idx = len(self._order)
        self._order.append(weakref.ref(h))
        self._dedup[key] = (weakref.ref(t), weakref.ref(h))
        self.stats["packed"] += 1
        self.stats["packed_bytes"] += h.nbytes
        # offload the oldest waiting tensors once newer ones worth keep_bytes follow them
        self._recent.append((weakref.ref(h), h.nbytes))
        self._recent_bytes += h.nbytes
        while self._recent and self._recent_bytes - self._recent[0][1] >= self.keep_bytes:
            ref, n = self._recent.popleft()
            self._recent_bytes -= n
            old = ref()
            if old is not None and old.resident is not None:
                self._offload(old)
        self._reap(block=False)
        return h

    def _offload(self, h):
        """Copy ``h``'s tensor to host memory (and, for target disk, on to a file); release it on its device."""
        import torch

        t = h.resident
        if t._version != h.version:  # changed in place since it was saved: its saved value is gone (raised at unpack)
            h.modified, h.resident = (h.version, t._version), None
            return
        if t.is_cuda:
            stream = self._side_stream(t.device)
            current = torch.cuda.current_stream(t.device)
            host = _empty_like_layout(t, pin=True) if _dense(t) else torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                host.copy_(t, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(stream)
            h.d2h = ev
            self._pending.append((ev, t))
            self._pending_bytes += h.nbytes
            if self.max_pending_bytes and self._pending_bytes > self.max_pending_bytes:
                self.stats["throttled"] += 1
                self._reap(block=False, down_to=self.max_pending_bytes)
        else:
            host = _empty_like_layout(t) if _dense(t) else torch.empty(t.shape, dtype=t.dtype)
            host.copy_(t)
        if self.target == "disk":
            last = self._last_write
            if last is not None and last.done() and last.exception() is not None:  # a full disk: stop in forward
                raise self._disk_error(last.exception(), self._dir)
            h.path = os.path.join(self.directory, f"{self._token}-{next(self._counter)}.bin")
            h.written = self._last_write = self._writer_pool().submit(self._write, h.d2h, host, h.path)
            weakref.finalize(h, schedule_remove, self._writer_pool(), h.written, h.path)
        else:
            h.host = host
        h.resident = None
        self.stats["offloaded"] += 1
        self.stats["offloaded_bytes"] += h.nbytes

    @staticmethod
    def _write(event, host, path):
        if event is not None:
            event.synchronize()
        write_file(path, host.contiguous().reshape(-1).view(__import__("torch").uint8))

    def _writer_pool(self):
        with self._lock:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="hf-lowmem-act-write")
            return self._writer

    def _reader_pool(self):
        with self._lock:
            if self._reader is None:
                self._reader = ThreadPoolExecutor(2, thread_name_prefix="hf-lowmem-act-read")
            return self._reader

    # -- unpack: backward --
    def _host_of(self, h):
        """The host copy (a tensor with the original shape/layout or a flat uint8 buffer for disk)."""
        if self.target != "disk":
            return h.host
        if h.read is None:
            h.read = self._reader_pool().submit(self._read, h)
        return h.read.result()

    def _read(self, h):
        try:
            h.written.result()
            return read_file(h.path, h.nbytes, pin=h.device.type == "cuda")
        except OSError as e:  # most often a full disk, which the writer met in forward
            raise self._disk_error(e, os.path.dirname(h.path)) from None

    @staticmethod
    def _disk_error(exc, folder) -> PluginError:
        from hf_lowmem.checkpoint import describe_write_error

        return PluginError(f"activation-offload: saved activations could not be written to or read back from "
                           f"{folder!r}: {describe_write_error(exc, folder)}; {disk_hint()}")

    def _materialize(self, h, host, out):
        if self.target == "disk":
            host = host.view(h.dtype).view(h.shape) if len(h.shape) else host.view(h.dtype).reshape(())
        out.copy_(host, non_blocking=out.is_cuda)
        return out

    def _fetch_async(self, h):
        """Start the host-to-device copy of ``h`` on the side stream (CUDA, target cpu)."""
        import torch

        stream = self._side_stream(h.device)
        current = torch.cuda.current_stream(h.device)
        out = _empty_like_layout(h, device=h.device)  # allocated on the compute stream: the side stream waits for it
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            if h.d2h is not None:
                stream.wait_event(h.d2h)
            self._materialize(h, h.host, out)
            ev = torch.cuda.Event()
            ev.record(stream)
        h.gpu, h.h2d = out, ev

    def _prefetch_before(self, idx):
        j = idx - 1 if self._cursor is None else min(self._cursor, idx - 1)
        while j >= 0 and self._inflight < self.prefetch_bytes:
            h = self._order[j]()
            if h is not None and not h.prefetched and h.resident is None and h.cached is None:
                if self.target == "disk":
                    h.read = self._reader_pool().submit(self._read, h)
                elif h.device.type == "cuda":
                    self._fetch_async(h)
                else:
                    j -= 1
                    continue  # host to host: nothing to fetch ahead
                h.prefetched = True
                self._inflight += h.nbytes
                self.stats["prefetched"] += 1
            j -= 1
        self._cursor = j

    def unpack(self, h):
        import torch

        if not isinstance(h, _Handle):
            return h
        with torch.no_grad():
            return self._unpack(h)

    def _unpack(self, h):
        h.unpacks += 1
        last = h.unpacks >= h.uses  # the last node that saved it (per backward: a retained graph comes round again)
        if last:
            h.unpacks = 0
        self._check_version(h)
        if h.resident is not None:  # never offloaded (the forward's newest tensors)
            out = h.resident
        elif h.cached is not None:  # another node that saved the same tensor already brought it back
            out = h.cached
            self.stats["shared_unpacks"] += 1
        else:
            out = self._bring_back(h)
        h.cached = None if last else out
        if 0 <= h.idx < len(self._order) and self._order[h.idx]() is h:
            self._prefetch_before(h.idx)
        return out

    def _bring_back(self, h):
        import torch

        if h.prefetched:
            h.prefetched = False
            self._inflight = max(0, self._inflight - h.nbytes)
        if h.device.type == "cuda":
            current = torch.cuda.current_stream(h.device)
            if h.gpu is not None:
                current.wait_event(h.h2d)
                out, h.gpu, h.h2d = h.gpu, None, None
            else:
                if h.read is None:
                    self.stats["sync_fetches"] += 1
                if h.d2h is not None:
                    current.wait_event(h.d2h)
                out = self._materialize(h, self._host_of(h), _empty_like_layout(h, device=h.device))
            self._reap(block=False)
        else:
            out = self._materialize(h, self._host_of(h), _empty_like_layout(h))
        h.read = None  # disk: a second unpack (retain_graph) reads the file again
        return out


# ---- installation ------------------------------------------------------------------------------------------
def install(model, offloader: ActivationOffloader, module=None):
    """Run ``module``'s (default: the decoder's) training forward under the offloader's saved-tensor hooks.
    Returns the hook handles (call ``.remove()`` on them to undo)."""
    import torch

    module = module if module is not None else (decoder(model) or unwrap(model))

    def pre(mod, args, kwargs):
        if mod.training and torch.is_grad_enabled() and "_hf_lowmem_offload_cm" not in mod.__dict__:
            offloader.begin_forward(model)
            cm = offloader.hooks()
            cm.__enter__()
            mod._hf_lowmem_offload_cm = cm
        return None

    def post(mod, args, kwargs, output):
        cm = mod.__dict__.pop("_hf_lowmem_offload_cm", None)
        if cm is not None:
            cm.__exit__(None, None, None)
            offloader.end_forward()
        return None

    return [module.register_forward_pre_hook(pre, with_kwargs=True),
            module.register_forward_hook(post, with_kwargs=True, always_call=True)]


class ActivationOffload(Plugin):
    name, kind, options, lossless = NAME, "offload", ActivationOffloadOptions, True
    # not "dp": DataParallel runs each replica's forward in its own thread, outside the hooks' thread
    modes = ("single", "ddp", "fsdp", "deepspeed")
    incompatible = {"stream": "the weight-streaming engine schedules activations itself"}
    provides = ("saved-tensor-hooks",)  # checkpointing then saves its layer inputs where these hooks see them
    help = "saved activations to pinned CPU memory (side-stream copies, prefetched for backward) or to disk"

    def validate(self, ctx):
        opts = ctx.options(NAME)
        if opts.target == "disk":
            d = opts.dir or tempfile.gettempdir()
            fix = ('set lowmem_options={"activation-offload": {"target": "disk", "dir": "/a/writable/path"}}')
            try:
                os.makedirs(d, exist_ok=True)
            except OSError as e:  # a file in the way, no permission, a read-only file system, ...
                raise PluginError(f"activation-offload: cannot create the directory {d!r} ({e.strerror or e}); "
                                  f"{fix}") from None
            if not os.access(d, os.W_OK | os.X_OK):
                raise PluginError(f"activation-offload: directory {d!r} is not writable; {fix}")
        from hf_lowmem_plugins.checkpointing import NAME as CKPT, args_class_name, trainer_checkpointing

        on, from_default, flag = trainer_checkpointing(ctx.args)
        if on and not ctx.is_selected(CKPT):  # with the plugin selected, it takes over (or refuses) itself
            why = f" ({args_class_name(ctx.args)}'s default)" if from_default else ""
            logger.warning("activation-offload with %s=True%s: the Trainer's checkpointing keeps checkpoint inputs on "
                           "the GPU. Add gradient-checkpointing to lowmem_offload instead so that they are offloaded.",
                           flag, why)

    def prepare_model(self, ctx, model):
        opts = ctx.options(NAME)
        off = ActivationOffloader(opts.target, opts.dir, opts.min_bytes, opts.prefetch_bytes, opts.kept_bytes(),
                                  opts.max_pending_bytes)
        handles = install(model, off)
        ctx.state[NAME] = {"offloader": off, "hooks": handles}
        logger.info("activation-offload: saved activations of the decoder go to %s", opts.target)
        return None

    def callbacks(self, ctx):
        if ctx.options(NAME).target != "disk":
            return []
        from transformers import TrainerCallback

        class CloseFolder(TrainerCallback):  # its files are gone once training ends: remove their folder
            def on_train_end(self, args, state, control, **kwargs):
                off = ctx.state.get(NAME, {}).get("offloader")
                if off is not None:
                    off.close()

        return [CloseFolder()]

    def memory_model(self, plan, st):
        opts = self.options_for(plan)
        prefetch = float(opts.prefetch_bytes)
        st.offload_acts = True
        # on the GPU at a time: the layer being computed plus what backward prefetches, plus the forward's newest
        # tensors, which are never offloaded (keep_bytes, default prefetch_bytes: 128 + 128 MiB by default)
        st.offload_window = prefetch + float(opts.kept_bytes())
        # a forward can produce activations faster than PCIe copies them out: they wait on the GPU, up to the cap
        st.offload_pending = float(opts.max_pending_bytes) or float("inf")
        stored = sum(c if r else a for a, c, r in zip(st.acts, st.ckpt, st.recompute))
        if opts.target == "cpu":
            st.host["activations offloaded (pinned)"] = stored
        else:
            st.host["activation staging (pinned; the rest on disk)"] = min(stored, 2 * prefetch + 2 * max(st.acts or [0]))
            st.notes.append("activation-offload to disk: host RAM holds only staging buffers")
        st.d2h_bytes += stored * plan.setup.grad_accum
        st.h2d_bytes += stored * plan.setup.grad_accum


@hookimpl
def hf_lowmem_register(register):
    register(ActivationOffload())
