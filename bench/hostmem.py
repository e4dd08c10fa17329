"""Host memory of a run, measured the way the kernel's OOM killer sees it (issue 12).

``ru_maxrss`` (``peak_host_rss_gib`` in the bench rows) is the peak resident set of one process: it does not
count forked DataLoader workers, and a worker's copy of page-locked memory is invisible to it. This sampler
records, through the run, on a background thread:

* ``host_used_gib``: the peak of the process tree's memory: the sum of Pss (``/proc/<pid>/smaps_rollup``) over
  the process and all its descendants, page-locked memory included (pages shared copy-on-write counted once,
  pages a worker copied counted in both);
* ``tree_rss_peak_gib``: the peak of the sum of RSS over the tree (shared pages counted in every process);
* ``memavailable_drop_gib``: how far the machine's ``MemAvailable`` fell below its value at the start;
* ``cgroup_current_peak_gib`` / ``cgroup_peak_gib``: the cgroup's ``memory.current`` peak during the run and
  its ``memory.peak`` (since the cgroup was created) at the end, where readable.

Usage::

    with HostMemSampler() as hm:
        with hm.phase("load"):
            ...
        with hm.phase("train"):
            ...
    row.update(hm.result())   # host_used_gib, ..., phases: {"load": {"host_used_gib": ...}, ...}

``python bench/hostmem.py -- CMD ARGS`` runs a command and prints its tree's figures as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_lowmem.engine.hostmem import (
    cgroup_memory_current,
    cgroup_memory_peak,
    mem_available,
    tree_memory,
)

GiB = 2**30


class HostMemSampler:
    """Samples the memory of the tree rooted at ``pid`` (default: this process) every ``interval`` seconds."""

    def __init__(self, pid: int | None = None, interval: float = 1.0):
        self.pid = os.getpid() if pid is None else pid
        self.interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.samples = 0
        self.start_available = mem_available()
        self.peak = {"pss": 0, "rss": 0, "drop": 0, "cgroup": 0, "workers": 0}
        self._phase: str | None = None
        self.phases: dict[str, dict[str, int]] = {}

    # ---- sampling ----------------------------------------------------------------------------------------
    def sample(self) -> dict:
        t = tree_memory(self.pid)
        drop = max(0, self.start_available - mem_available())
        cg = cgroup_memory_current() or 0
        with self._lock:
            self.samples += 1
            for key, v in (("pss", t["pss"]), ("rss", t["rss"]), ("drop", drop), ("cgroup", cg),
                           ("workers", t["processes"] - 1)):
                self.peak[key] = max(self.peak[key], v)
                if self._phase is not None:
                    ph = self.phases[self._phase]
                    ph[key] = max(ph.get(key, 0), v)
        return t

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a process of the tree exited between listing and reading
                pass

    def start(self) -> HostMemSampler:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="hostmem-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def __enter__(self) -> HostMemSampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    class _Phase:
        def __init__(self, owner: HostMemSampler, name: str):
            self.owner, self.name = owner, name

        def __enter__(self):
            with self.owner._lock:
                self.owner._phase = self.name
                self.owner.phases.setdefault(self.name, {})
            self.owner.sample()
            return self

        def __exit__(self, *exc):
            self.owner.sample()
            with self.owner._lock:
                self.owner._phase = None

    def phase(self, name: str) -> _Phase:
        """Peaks inside this block are also recorded under ``phases[name]``."""
        return HostMemSampler._Phase(self, name)

    # ---- results -------------------------------------------------------------------------------------------
    def result(self) -> dict:
        g = lambda v: round(v / GiB, 2)
        out = {
            "host_used_gib": g(self.peak["pss"]),
            "tree_rss_peak_gib": g(self.peak["rss"]),
            "memavailable_drop_gib": g(self.peak["drop"]),
            "host_samples": self.samples,
            "max_child_processes": self.peak["workers"],
        }
        if self.peak["cgroup"]:
            out["cgroup_current_peak_gib"] = g(self.peak["cgroup"])
        peak = cgroup_memory_peak()
        if peak is not None:
            out["cgroup_peak_gib"] = g(peak)
        if self.phases:
            out["phases"] = {name: {"host_used_gib": g(ph.get("pss", 0)), "memavailable_drop_gib": g(ph.get("drop", 0))}
                             for name, ph in self.phases.items()}
        return out


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise SystemExit("usage: python bench/hostmem.py -- COMMAND [ARGS...]")
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv)
    hm = HostMemSampler(pid=proc.pid).start()
    rc = proc.wait()
    hm.stop()
    print(json.dumps({"command": " ".join(argv), "returncode": rc, "wall_s": round(time.perf_counter() - t0, 1),
                      **hm.result()}))
    sys.exit(rc)


if __name__ == "__main__":
    main()
