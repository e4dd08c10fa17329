"""Options of the ``stream`` plugin (no torch import, so registering the plugin stays cheap)."""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30


TIERS = ("exact", "compact")
MASTERS = ("auto", "fp32", "bf16")
STATES = ("auto", "fp32", "8bit", "4bit")
GRADS = ("auto", "compute", "8bit")


@dataclass
class StreamOptions:
    """Options of the ``stream`` plugin (``lowmem_options={"stream": {...}}``).

    :param tier: where host memory goes. ``exact`` (default): fp32 master weights, AdamW states as the optimizer
        keeps them (fp32: 8 B/param; ``bnb-adamw8bit``: 8-bit), gradients stored in the compute dtype: the same
        arithmetic as a plain Trainer. ``compact``: bf16 master weights updated in fp32 on the GPU and written
        back with stochastic rounding, 4-bit AdamW states, gradients stored in 8 bits (~4.1 B/param in all, 7B
        in a 32 GiB machine); lossy, measured in docs/streaming.md. The next four options override one part.
    :param master: master weights, ``fp32`` or ``bf16`` (``auto``: from the tier).
    :param states: AdamW states: ``fp32`` (exact, 8 B/param), ``8bit`` (bitsandbytes' block-wise kernel, ~2 B),
        ``4bit`` (block-wise, ~1.06 B), or ``auto``: ``8bit`` when ``lowmem_optimizer`` is ``bnb-adamw8bit``,
        else ``4bit`` in the compact tier and ``fp32`` in the exact one.
    :param grads: gradients kept between backward and the deferred update: ``compute`` (the compute dtype) or
        ``8bit`` (block-wise, ~1 B/param; the clipping norm is taken before they are quantized) (``auto``: tier).
    :param stash_every: keep the input of every n-th decoder layer in host memory and, in backward, recompute
        a group of n layers with autograd from it: the stash shrinks n-fold at the cost of n layers' weights and
        one micro-batch's activations of n layers on the GPU (no extra compute). ``auto``: the smallest n whose
        host memory fits the budget (``host_memory`` / ``lowmem_host_memory``, else the memory available).
    :param loss_chunk_tokens: tokens per chunk of the LM head + cross-entropy (bounds the logits memory).
    :param check_memory: refuse to start when the estimated GPU or host memory exceeds what is there.
    :param gpu_memory: GPU budget to check against (e.g. ``"8GiB"``); default: free memory under the
        process's cap (``torch.cuda.set_per_process_memory_fraction``).
    :param host_memory: host budget of the whole process tree (DataLoader workers included); default: available RAM.
    :param profile: time copies and compute with CUDA events (``engine.profile_totals()``), for benchmarks.
    :param offload_dir: the SSD tier (docs/ssd-tier.md): a folder on a local disk (or a list of folders, one per
        disk: blocks are spread over them in turn) where the master weights and optimizer states live, one file
        per block, read ahead and written behind while other blocks compute; host RAM holds only
        ``offload_window`` blocks. ``None`` (default): both live in host RAM.
    :param offload_window: blocks of the SSD tier held in host RAM at once (each as large as the largest block's
        masters + states), shared by read-ahead, the blocks on the GPU and write-behind; grown by the engine
        when a ``stash_every`` group needs more. Default 4.
    :param direct_io: ``auto`` (default): ``O_DIRECT`` where the file system supports it, else buffered I/O
        whose pages are dropped after each transfer (said in a log line); ``on``: refuse without it; ``off``.
    :param io_threads: threads issuing the SSD tier's reads and writes (each releases the GIL). Default 4.
    :param disk_gbps: the offload disk's sequential bandwidth in GB/s, for the preflight's step-time estimate;
        default: measured once per device with a short direct-I/O probe and cached.
    :param offload_grads: the SSD tier keeps the stored gradients on the disk too (written behind the backward
        pass, read with each block in the next forward) instead of host RAM: for models whose gradients alone
        outgrow the RAM (70B: ~70 GB in 8 bits). Default ``False``.
    """

    tier: str = "exact"
    master: str = "auto"
    states: str = "auto"
    grads: str = "auto"
    stash_every: int | str = "auto"
    loss_chunk_tokens: int = 2048
    check_memory: bool = True
    gpu_memory: str | None = None
    host_memory: str | None = None
    profile: bool = False
    offload_dir: str | list[str] | None = None
    offload_window: int = 4
    direct_io: str = "auto"
    io_threads: int = 4
    disk_gbps: float | None = None
    offload_grads: bool = False

    def __post_init__(self):
        for name, allowed in (("tier", TIERS), ("master", MASTERS), ("states", STATES), ("grads", GRADS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.stash_every != "auto":
            _check_int(self, "stash_every", 1)
        _check_int(self, "loss_chunk_tokens", 1)
        for name in ("check_memory", "profile", "offload_grads"):
            if not isinstance(getattr(self, name), bool):  # "no" is a true string: refuse it instead of guessing
                raise ValueError(f"{name} must be true or false (a JSON boolean), got {getattr(self, name)!r}")
        for name in ("gpu_memory", "host_memory"):
            _check_size(name, getattr(self, name))
        _check_offload(self)


@dataclass(frozen=True)
class Formats:
    """What the engine keeps, resolved from the options and the selected optimizer (see :class:`StreamOptions`)."""

    master: str  # fp32 | bf16
    states: str  # fp32 | 8bit | 4bit
    grads: str  # compute | 8bit
    stash_every: int | None  # None: chosen from the host budget at the first window

    @property
    def lossless(self) -> bool:
        return self.master == "fp32" and self.states == "fp32" and self.grads == "compute"

    def stored(self) -> dict:
        """What a checkpoint records of the host tier's formats and a resume must match: the masters, the
        states and, for 4-bit states, what their second-moment codes hold (``sqrt`` since it changed)."""
        from hf_lowmem.engine.lowbit import SECOND_MOMENT

        out = {"master": self.master, "states": self.states}
        if self.states == "4bit":
            out["second_moment"] = SECOND_MOMENT
        return out

    def mismatch(self, kept: dict) -> str | None:
        """None if a checkpoint that recorded ``kept`` (its :meth:`stored`) resumes in these formats, else why not
        and what to do, in one line."""
        here = self.stored()
        kept = {k: kept[k] for k in ("master", "states", "second_moment") if k in kept}
        if kept == here:
            return None
        if kept.get("states") == "4bit" == here["states"] and "second_moment" not in kept:
            return ("its 4-bit optimizer states were written by an earlier hf-lowmem, whose second-moment codes held v "
                    "(they now hold sqrt(v)); continue from its weights: load the model from the checkpoint folder and "
                    "train without resume_from_checkpoint (the optimizer states restart)")
        return (f"the checkpoint keeps {kept}, this run {here}; resume with the tier and stream options the checkpoint "
                "was written with, or start without resume_from_checkpoint")


def resolve_formats(opts: StreamOptions | None, optimizer_name: str | None = None) -> Formats:
    """The formats ``opts`` select (``auto`` resolved by tier and optimizer); one rule, used by the engine and
    its memory estimate."""
    opts = opts or StreamOptions()
    compact = opts.tier == "compact"
    states = opts.states
    if states == "auto":
        states = "8bit" if optimizer_name in ("bnb-adamw8bit", "adamw8bit") else ("4bit" if compact else "fp32")
    master = opts.master if opts.master != "auto" else ("bf16" if compact else "fp32")
    grads = opts.grads if opts.grads != "auto" else ("8bit" if compact else "compute")
    n = None if opts.stash_every == "auto" else int(opts.stash_every)
    return Formats(master=master, states=states, grads=grads, stash_every=n)


DIRECT_IO = ("auto", "on", "off")
#: the offload_dir the planner writes into the plans it prints (the user puts a folder on their SSD there)
PLANNER_DIR = "SSD_FOLDER"


def offload_dirs(opts: StreamOptions) -> list[str]:
    """The SSD tier's folders (empty: the tier is off)."""
    d = opts.offload_dir
    if d is None:
        return []
    return [str(d)] if isinstance(d, (str, bytes)) or hasattr(d, "__fspath__") else [str(x) for x in d]


def _check_offload(opts: StreamOptions) -> None:
    d = opts.offload_dir
    if d is not None:
        dirs = d if isinstance(d, (list, tuple)) else [d]
        if not dirs or not all(isinstance(x, str) and x.strip() for x in dirs):
            raise ValueError(f"offload_dir must be a folder (a string) or a list of folders, got {d!r}")
        if len(set(dirs)) != len(dirs):
            raise ValueError(f"offload_dir lists a folder twice: {d!r}; give one folder per disk")
    if opts.offload_grads is True and d is None:
        raise ValueError("offload_grads keeps the gradients in the SSD tier's files: set offload_dir too")
    _check_int(opts, "offload_window", 2)
    _check_int(opts, "io_threads", 1)
    if opts.direct_io not in DIRECT_IO:
        raise ValueError(f"direct_io must be one of {', '.join(DIRECT_IO)}, got {opts.direct_io!r}")
    g = opts.disk_gbps
    if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not g > 0):
        raise ValueError(f"disk_gbps must be a positive number of GB/s (e.g. 7.0), got {g!r}")


def _check_int(opts, name: str, lo: int) -> None:
    v = getattr(opts, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")


def _check_size(name: str, value) -> None:
    """A size option is read here, at construction, so a bad one fails before any model is touched."""
    if value is None:
        return
    if str(value).strip().startswith("-"):
        raise ValueError(f"{name} must be positive, got {value!r}; write a size like '32GiB'")
    from hf_lowmem.errors import PluginError

    try:
        parse_bytes(value, name)
    except PluginError as e:  # the registry reports ValueError as a bad option, with the plugin's name
        raise ValueError(str(e)) from None


def parse_bytes(text: str | float | None, what: str = "size") -> int | None:
    """A size option (``"8GiB"``, ``"8GB"`` = 10^9 bytes) in bytes, or ``None`` when unset; see :mod:`hf_lowmem.sizes`."""
    if text is None:
        return None
    from hf_lowmem.sizes import parse_size

    return parse_size(text, what)
