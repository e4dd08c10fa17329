"""Streams, events and pinned host memory, with the same interface on CPU (where they are no-ops and
copies are synchronous) so that the engine runs one code path on CPU and GPU."""

from __future__ import annotations

import contextlib

import torch


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


class Device:
    """The compute device plus two copy streams: ``h2d`` (host to device) and ``d2h`` (device to host)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
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

    def empty_host(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Host memory for streaming: pinned on a CUDA run (pageable copies run at a third of the speed)."""
        return torch.empty(numel, dtype=dtype, pin_memory=self.cuda)

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory() if self.cuda and not t.is_pinned() else t

    def to_device(self, host: torch.Tensor, after=None) -> tuple[torch.Tensor, object]:
        """Copy ``host`` to the device on the h2d stream (after ``after``, an event); returns the device
        tensor and an event the consumer must wait on."""
        if not self.cuda:
            return host.clone(), _NullEvent()
        with torch.cuda.stream(self.h2d):
            if after is not None:
                self.h2d.wait_event(after)
            dev = host.to(self.device, non_blocking=True)
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
            host.copy_(dev, non_blocking=True)
            dev.record_stream(self.d2h)
            ev = torch.cuda.Event()
            ev.record(self.d2h)
        return ev

    def wait(self, event) -> None:
        """Make the compute stream wait for ``event``."""
        if self.cuda and event is not None:
            self.compute.wait_event(event)

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
