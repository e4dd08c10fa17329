"""Where the stream engine keeps a model in host memory: one flat buffer per block and kind.

Each block (the embedding, each decoder layer, the final norm + LM head) stores its master weights as ONE flat
buffer; the model's parameters are views into it (``p.data``), so ``state_dict``, ``save_pretrained`` and a
plain forward on the CPU see the masters directly. Its optimizer states are flat buffers laid out the same
way. Every parameter starts at a multiple of :data:`ALIGN` elements, so quantization blocks (256 values for
8-bit, 128 for 4-bit) never straddle two parameters, a block moves to the GPU in one copy per buffer, a
rank's shard of a block is a contiguous slice, and a block is one region of a file.

:class:`BlockStore` holds masters and states behind ``acquire(k)`` / ``release(k)``: RAM-backed here (both
are no-ops). The SSD tier (:class:`~hf_lowmem.engine.filestore.FileBlockStore`, chosen by :func:`create_store`
when ``offload_dir`` is set) or a rank-sharded store implements the same four methods (``acquire``,
``release``, ``master``, ``states``) without touching the schedule, plus how the model is saved
(``bind_save``) and how a checkpoint's weights come back (``load_checkpoint``).

:class:`StashPool` holds what lives only for one window: the activation stash and the stored gradients, in
shared slots (see its docstring).
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_lowmem.engine.anatomy import Block
from hf_lowmem.engine.hostmem import HostArena
from hf_lowmem.engine.lowbit import BLOCK_4BIT, BLOCK_8BIT
from hf_lowmem.engine.stream_options import Formats

ALIGN = 256  # elements
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass
class Slot:
    """One parameter inside its block's flat buffers."""

    name: str  # local name in the block
    param: nn.Parameter
    offset: int  # element offset in the master (and quantized-state) buffers, a multiple of ALIGN
    group: int  # index of its optimizer param group
    quantized: bool  # its optimizer states are quantized (else fp32, at ``soff`` in the fp32 state buffers)
    soff: int = 0

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    @property
    def padded(self) -> int:
        return round_up(self.numel, ALIGN)


@dataclass
class BlockLayout:
    slots: list[Slot]
    numel: int  # padded length of the flat buffers
    fp32_numel: int  # length of the fp32 state buffers (parameters whose states are not quantized)
    #: local name -> (owner block, owner's Slot) for a parameter this block uses but an earlier block owns (tied)
    shared: dict[str, tuple[int, Slot]] = field(default_factory=dict)

    def __post_init__(self):
        self.by_name = {s.name: s for s in self.slots}


def state_shapes(layout: BlockLayout, states: str) -> dict[str, tuple[int, torch.dtype]]:
    """Name -> (elements, dtype) of a block's optimizer-state buffers in format ``states``."""
    n, small = layout.numel, layout.fp32_numel
    out: dict[str, tuple[int, torch.dtype]] = {}
    if states == "8bit":
        out = {"state1": (n, torch.uint8), "state2": (n, torch.uint8),
               "absmax1": (n // BLOCK_8BIT, torch.float32), "absmax2": (n // BLOCK_8BIT, torch.float32)}
    elif states == "4bit":
        out = {"m": (n // 2, torch.uint8), "v": (n // 2, torch.uint8),
               "m_scale": (n // BLOCK_4BIT, torch.float32), "v_scale": (n // BLOCK_4BIT, torch.float32)}
    if small:
        out.update({"exp_avg": (small, torch.float32), "exp_avg_sq": (small, torch.float32)})
    return out


def grad_bytes(numel: int, grads: str, compute_bytes: int) -> int:
    """Bytes of one block's stored gradients (``numel`` padded elements)."""
    return numel + numel // BLOCK_8BIT * 4 if grads == "8bit" else numel * compute_bytes


class BlockStore:
    """Masters and optimizer states of every block, RAM-backed (see the module docstring)."""

    #: the engine fetches the next block only after queueing the current one's compute (a store whose ``acquire``
    #: may wait for a disk read); else before it, so that its copy overlaps the compute
    late_prefetch = False

    def __init__(self, blocks: list[Block], formats: Formats, arena: HostArena, group_of: dict[int, int],
                 min_quant_size: int = 4096, fp32_state_params: set[int] | None = None, world: int = 1, rank: int = 0):
        self.formats, self.arena = formats, arena
        self.world, self.rank = world, rank  # ranks sharing the blocks (hf_lowmem.engine.dist); this one's index
        self.master_dtype = DTYPES[formats.master]
        keep32 = fp32_state_params or set()
        owner: dict[int, tuple[int, Slot]] = {}
        self.layouts: list[BlockLayout] = []
        for k, b in enumerate(blocks):
            slots, off, soff = [], 0, 0
            for name, p in b.params.items():
                q = formats.states != "fp32" and p.numel() >= min_quant_size and id(p) not in keep32
                s = Slot(name, p, off, group_of.get(id(p), 0), q, 0 if q else soff)
                slots.append(s)
                owner[id(p)] = (k, s)
                off += s.padded
                soff += 0 if q else s.numel
            lay = BlockLayout(slots, round_up(off, ALIGN * world), soff)  # world equal shards of whole ALIGN blocks
            for name, p in b.shared.items():
                lay.shared[name] = owner[id(p)]
            self.layouts.append(lay)
        self._masters: list[torch.Tensor] = []
        self._states: list[dict[str, torch.Tensor]] = []
        #: dtype the model's floating-point weights had when adopted (what checkpoints and save_model write)
        self.original_dtype: torch.dtype | None = None

    @property
    def save_dtype(self) -> torch.dtype:
        """The dtype checkpoints and ``save_model`` write weights in: bf16 when the masters or the model as given
        were bf16 (a bf16 checkpoint stays bf16), else the model's own dtype."""
        if torch.bfloat16 in (self.master_dtype, self.original_dtype):
            return torch.bfloat16
        return self.original_dtype or self.master_dtype

    # ---- building ------------------------------------------------------------------------------------------
    def adopt(self) -> None:
        """Move every parameter into its block's master buffer, block by block, freeing each original as it
        goes (never a whole converted copy beside the original model): ``p.data`` becomes a view."""
        for lay in self.layouts:
            flat = self.arena.empty(lay.numel, self.master_dtype)
            for s in lay.slots:
                src = s.param.data
                if self.original_dtype is None and src.is_floating_point():
                    self.original_dtype = src.dtype
                view = flat[s.offset: s.offset + s.numel]
                view.copy_(src.reshape(-1))  # from any device and dtype (bf16 -> fp32 is exact)
                s.param.data = view.view(s.shape)
                del src
            self._masters.append(flat)
            _trim_heap()  # hand the originals' freed heap pages back to the OS before the next block

    def allocate_states(self) -> None:
        for lay in self.layouts:
            self._states.append({name: self.arena.zeros(n, dt) for name, (n, dt) in
                                 state_shapes(lay, self.formats.states).items()})

    # ---- the interface a file-backed or sharded store implements -------------------------------------------
    def master(self, k: int) -> torch.Tensor:
        return self._masters[k]

    def states(self, k: int) -> dict[str, torch.Tensor]:
        return self._states[k]

    def shard(self, k: int) -> tuple[int, int]:
        """Flat elements ``[lo, hi)`` of block ``k`` this rank streams, updates and stores gradients for (all of
        them with one process)."""
        n = self.layouts[k].numel // self.world
        return self.rank * n, (self.rank + 1) * n

    def acquire(self, k: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Host views of block ``k``'s masters and states, readable (and writable) until :meth:`release`."""
        return self._masters[k], self._states[k]

    def release(self, k: int, after=None) -> None:
        """Done with block ``k`` once the event ``after`` (its device-to-host write-back) completes."""

    def stash_pool(self, arena, n_layers: int, hidden: int, compute_dtype, grads: str, stash_every: int) -> StashPool:
        """The pool of the activation stash and the stored gradients (the SSD tier may keep the gradients itself)."""
        return StashPool(arena, self.layouts, n_layers, hidden, compute_dtype, grads, stash_every, world=self.world)

    def bind_save(self, model, original=None, flush=None):
        """The ``save_pretrained`` the model gets: sharded safetensors written from the host buffers."""
        import functools

        from hf_lowmem.engine.weights_io import save_pretrained_streaming

        return functools.partial(save_pretrained_streaming, model, save_dtype=self.save_dtype, original=original)

    def load_checkpoint(self, folder: str) -> bool:
        """Restore a checkpoint's weights here (``True``), or leave it to the Trainer (``False``: the parameters are
        views of the master buffers, so its weight loading writes straight into them)."""
        import os

        if os.path.isdir(os.path.join(folder, "offload")):
            from hf_lowmem.errors import CheckpointError

            raise CheckpointError(f"checkpoint {folder!r} was written by the SSD tier (its weights and states are in "
                                  "offload/); resume it with the same lowmem_options stream offload_dir setting")
        return False

    # ---- accounting -----------------------------------------------------------------------------------------
    def nbytes(self) -> dict[str, int]:
        es = torch.empty((), dtype=self.master_dtype).element_size()
        return {"master_weights": sum(lay.numel for lay in self.layouts) * es,
                "optimizer_states": sum(t.numel() * t.element_size() for st in self._states for t in st.values())}

    def param_state_views(self, k: int, s: Slot) -> dict[str, torch.Tensor]:
        """Views of parameter ``s``'s optimizer states (for inspection; the engine works on whole blocks)."""
        st = self._states[k]
        if not s.quantized:
            return {n: st[n][s.soff: s.soff + s.numel].view(s.shape) for n in ("exp_avg", "exp_avg_sq")}
        lo, n = s.offset, s.numel
        if self.formats.states == "8bit":
            out = {n_: st[n_][lo: lo + n].view(s.shape) for n_ in ("state1", "state2")}
            out.update({n_: st[n_][lo // BLOCK_8BIT: (lo + s.padded) // BLOCK_8BIT] for n_ in ("absmax1", "absmax2")})
            return out
        out = {n_: st[n_][lo // 2: (lo + s.padded) // 2] for n_ in ("m", "v")}
        out.update({n_: st[n_][lo // BLOCK_4BIT: (lo + s.padded) // BLOCK_4BIT] for n_ in ("m_scale", "v_scale")})
        return out


def create_store(engine, blocks: list[Block], formats: Formats, arena: HostArena, group_of: dict[int, int],
                 min_quant_size: int = 4096, fp32_state_params: set[int] | None = None) -> BlockStore:
    """The engine's store: in host RAM (under several ranks, shards in memory they share:
    :func:`hf_lowmem.engine.dist.make_store`), or in files on a disk when ``offload_dir`` is set (the SSD tier,
    one process only: refused under several ranks)."""
    from hf_lowmem.engine import dist as dist_mod
    from hf_lowmem.engine.stream_options import offload_dirs

    dist = engine.dist
    if not offload_dirs(engine.options):
        return dist_mod.make_store(blocks, formats, arena, dist, group_of, min_quant_size, fp32_state_params)
    if dist.world > 1:
        from hf_lowmem.errors import PluginError

        raise PluginError(f"the SSD tier runs on one process and this run has {dist.world}; drop offload_dir (the "
                          "RAM tier shares host memory between the ranks) or run one process")
    from hf_lowmem.engine.filestore import FileBlockStore

    def pending(k: int) -> bool:
        return engine.pending is not None and k in engine.pending["todo"]

    return FileBlockStore(blocks, formats, arena, group_of, min_quant_size, fp32_state_params,
                          options=engine.options, device=engine.dev, pending=pending,
                          compute_bytes=engine.compute_dtype.itemsize)


class StashPool:
    """Host memory of one window: the activation stash and the stored gradients, sharing slots.

    With ``n = stash_every``, the outputs of blocks 0, n, 2n, ... (the inputs of layer groups
    g = 0, 1, ...: layers g*n+1 .. g*n+n) are stashed: slot g holds group g's input during a window. Once
    group g's backward has read it, slot g takes the gradients of group g-1's layers (slot 0: the embedding's),
    which stay there until their deferred update reads them in the next forward, just before that forward
    writes group g's next input into slot g. Slot G (G groups) holds the last group's gradients, slot G+1
    the head's. Each slot is as large as the larger of its two tenants; with n=1 this is one slot per layer.
    """

    def __init__(self, arena: HostArena, layouts: list[BlockLayout], n_layers: int, hidden: int,
                 compute_dtype: torch.dtype, grads: str, stash_every: int, world: int = 1):
        self.arena, self.layouts, self.n_layers, self.hidden = arena, layouts, n_layers, hidden
        self.compute_dtype, self.grads, self.n = compute_dtype, grads, stash_every
        self.cb = torch.empty((), dtype=compute_dtype).element_size()
        self.groups = math.ceil(n_layers / stash_every)
        self.slots: list[torch.Tensor] = []
        self.window_tokens = 0
        # gradient regions: block k -> (slot, byte offset, bytes)
        self.grad_at: dict[int, tuple[int, int, int]] = {}
        used = [0] * (self.groups + 2)
        for k, lay in enumerate(layouts):
            slot = self.grad_slot(k)
            nb = round_up(grad_bytes(lay.numel // world, grads, self.cb), 512)  # this rank's shard
            self.grad_at[k] = (slot, used[slot], nb)
            used[slot] += nb
        self.grad_slot_bytes = used

    def grad_slot(self, k: int) -> int:
        if k == 0:
            return 0
        if k > self.n_layers:
            return self.groups + 1
        return (k - 1) // self.n + 1

    def stash_slot(self, k: int) -> int | None:
        """The slot block ``k``'s output goes to, or ``None`` when it is not stashed."""
        return k // self.n if k < self.n_layers and k % self.n == 0 else None

    def group_layers(self, g: int) -> list[int]:
        return list(range(g * self.n + 1, min((g + 1) * self.n, self.n_layers) + 1))

    def slot_bytes(self, window_tokens: int) -> list[int]:
        act = window_tokens * self.hidden * self.cb
        return [max(act if s < self.groups else 0, self.grad_slot_bytes[s], 1) for s in range(self.groups + 2)]

    def nbytes(self, window_tokens: int) -> dict[str, int]:
        total = sum(self.slot_bytes(window_tokens))
        stash = self.groups * window_tokens * self.hidden * self.cb
        return {"activation_stash": stash, "gradients": total - stash}

    def ensure(self, window_tokens: int) -> bool:
        """Slots for windows of ``window_tokens``; ``True`` when they had to be (re)allocated."""
        if self.slots and window_tokens <= self.window_tokens:
            return False
        for t in self.slots:
            self.arena.free(t)
        self.slots = [self.arena.empty(n, torch.uint8) for n in self.slot_bytes(window_tokens)]
        self.window_tokens = window_tokens
        return True

    def grad_region(self, k: int) -> tuple[int, torch.Tensor]:
        slot, off, nb = self.grad_at[k]
        return slot, self.slots[slot][off: off + nb]

    def grad_out(self, k: int) -> tuple[int, torch.Tensor]:
        """Where backward puts block ``k``'s gradients (here: the same region the update reads)."""
        return self.grad_region(k)

    def grad_stored(self, k: int, event) -> None:
        """Block ``k``'s gradients are being copied into :meth:`grad_out`'s region (done when ``event`` fires)."""

    def stash_region(self, slot: int, elem_offset: int, numel: int) -> torch.Tensor:
        return self.slots[slot].view(self.compute_dtype)[elem_offset: elem_offset + numel]


def _trim_heap() -> None:
    """glibc keeps freed heap pages; ``malloc_trim`` returns them (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
