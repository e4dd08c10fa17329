"""Streams, events and copies, with the same interface on CPU (where they are no-ops and copies are
synchronous) so that the engine runs one code path on CPU and GPU. Host memory comes from
:mod:`hf_lowmem.engine.hostmem`."""

from __future__ import annotations

import contextlib

import torch

from hf_lowmem.engine.hostmem import cgroup_memory_limit  # noqa: F401  (re-exported: the planner reads it here)


class _NullEvent:
    def record(self, stream=None):
        return self

    def wait(self, stream=None):
        return None

    def synchronize(self):
        return None

    def query(self) -> bool:
        return True


class _NullStream:
    def wait_event(self, event):
        return None

    def wait_stream(self, stream):
        return None

    def synchronize(self):
        return None


class Profile:
    """Optional accounting of where a step's time goes: bytes and busy time of each copy stream, and time
    of named compute segments (CUDA events; read at :meth:`collect`, which synchronizes)."""

    def __init__(self):
        self.bytes = {"h2d": 0, "d2h": 0}
        self._copies: list[tuple[str, object, object]] = []
        self._segments: list[tuple[str, object, object]] = []
        self.totals: dict[str, float] = {}

    def copy(self, direction: str, nbytes: int, start, end) -> None:
        self.bytes[direction] += nbytes
        if start is not None:
            self._copies.append((direction, start, end))

    def segment(self, name: str, start, end) -> None:
        self._segments.append((name, start, end))

    def collect(self) -> dict[str, float]:
        """Add the pending events' times (seconds) to ``totals`` and return them."""
        torch.cuda.synchronize()
        for direction, a, b in self._copies:
            self.totals[f"{direction}_busy_s"] = self.totals.get(f"{direction}_busy_s", 0.0) + a.elapsed_time(b) / 1e3
        for name, a, b in self._segments:
            self.totals[f"{name}_s"] = self.totals.get(f"{name}_s", 0.0) + a.elapsed_time(b) / 1e3
        for d, n in self.bytes.items():
            self.totals[f"{d}_GB"] = self.totals.get(f"{d}_GB", 0.0) + n / 1e9
        self._copies, self._segments, self.bytes = [], [], {"h2d": 0, "d2h": 0}
        return self.totals


class Device:
    """The compute device plus two copy streams: ``h2d`` (host to device) and ``d2h`` (device to host)."""

    def __init__(self, device: torch.device | str, profile: bool = False):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.profile = Profile() if (profile and self.cuda) else None
        if self.cuda:
            self.compute = torch.cuda.current_stream(self.device)
            self.h2d = torch.cuda.Stream(self.device)
            self.d2h = torch.cuda.Stream(self.device)
        else:
            self.compute = self.h2d = self.d2h = _NullStream()

    def event(self):
        return torch.cuda.Event() if self.cuda else _NullEvent()

    def record(self, stream=None):
        """An event recorded now on ``stream`` (default: the compute stream)."""
        ev = self.event()
        ev.record(stream if stream is not None else self.compute) if self.cuda else None
        return ev

    def on(self, stream):
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()

    def to_device(self, host: torch.Tensor, after=None) -> tuple[torch.Tensor, object]:
        """Copy ``host`` to the device on the h2d stream (after ``after``, an event); returns the device
        tensor and an event the consumer must wait on."""
        if not self.cuda:
            return host.clone(), _NullEvent()
        with torch.cuda.stream(self.h2d):
            if after is not None:
                self.h2d.wait_event(after)
            t0 = self._mark(self.h2d)
            dev = host.to(self.device, non_blocking=True)
            if self.profile is not None:
                self.profile.copy("h2d", host.numel() * host.element_size(), t0, self._mark(self.h2d))
            # allocated on the copy stream, used on the compute stream: keep the allocator from handing
            # the block out again before the compute stream is done with it
            dev.record_stream(self.compute)
            ev = torch.cuda.Event()
            ev.record(self.h2d)
        return dev, ev

    def to_host(self, dev: torch.Tensor, host: torch.Tensor, after=None):
        """Copy ``dev`` (produced on the compute stream) into ``host`` on the d2h stream; returns the event
        that marks the copy done. The device tensor is kept alive for the copy (record_stream)."""
        if not self.cuda:
            host.copy_(dev)
            return _NullEvent()
        ready = torch.cuda.Event()
        ready.record(self.compute)
        with torch.cuda.stream(self.d2h):
            self.d2h.wait_event(ready)
            if after is not None:
                self.d2h.wait_event(after)
            t0 = self._mark(self.d2h)
            host.copy_(dev, non_blocking=True)
            if self.profile is not None:
                self.profile.copy("d2h", dev.numel() * dev.element_size(), t0, self._mark(self.d2h))
            dev.record_stream(self.d2h)
            ev = torch.cuda.Event()
            ev.record(self.d2h)
        return ev

    def _mark(self, stream):
        if self.profile is None:
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream)
        return ev

    @contextlib.contextmanager
    def segment(self, name: str):
        """Time a stretch of compute-stream work under ``name`` (only when profiling)."""
        t0 = self._mark(self.compute)
        yield
        if t0 is not None:
            self.profile.segment(name, t0, self._mark(self.compute))

    def wait(self, event) -> None:
        """Make the compute stream wait for ``event``."""
        if self.cuda and event is not None:
            self.compute.wait_event(event)

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
