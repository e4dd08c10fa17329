"""``hf-lowmem plugins``: every registered plugin with its kind, what it needs (a CUDA GPU, an extra), its
distribution, version and whether its dependencies are installed here, and for lossy optimizers what they
measured at your learning rate; plugins that failed to load are listed with the reason. The "needs" column is
derived from each plugin's own attributes (``needs_cuda``, ``requires`` and ``extra``), so a third-party plugin
shows its needs the same way."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--verbose", action="store_true", help="show the traceback of plugins that failed to load")


def needs(info) -> list[str]:
    """What a plugin needs beyond hf-lowmem itself: ``"CUDA GPU"`` when it only runs on one, and the extra
    that installs its packages (``"hf-lowmem[galore,bnb]"``), or the packages when it names no extra."""
    out = ["CUDA GPU"] if info.needs_cuda else []
    if info.extra:
        out.append(f"hf-lowmem[{info.extra}]")
    elif info.requires:
        out.extend(sorted({m.split(".")[0] for m in info.requires}))
    return out


def _cuda_here() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken torch: it has no usable GPU either
        return False


def rows(host) -> list[dict]:
    out = []
    cuda = None
    for info in host.registry:
        missing = info.missing_requirements()
        if info.needs_cuda and cuda is None:
            cuda = _cuda_here()
        out.append({
            "kind": info.kind, "name": info.name, "distribution": info.distribution, "version": info.version,
            "entry_point": host.registry.owner(info.name),
            "dependencies": "ok" if not missing else f"missing {', '.join(missing)} (pip install 'hf-lowmem[{info.extra}]')"
            if info.extra else f"missing {', '.join(missing)}",
            "needs": needs(info), "needs_cuda": info.needs_cuda, "extra": info.extra, "requires": list(info.requires),
            "runs_here": not missing and (not info.needs_cuda or bool(cuda)),
            "gpu_missing": bool(info.needs_cuda and not cuda),
            "lossless": info.lossless, "modes": list(info.modes), "help": info.help,
            "quality_gap_pct": info.quality_gap, "lr_advice": info.lr_advice,
        })
    return out


def needs_text(row: dict) -> str:
    """The NEEDS column: what :func:`needs` lists, with "(none here)" after a CUDA GPU this machine lacks."""
    parts = [p + (" (none here)" if p == "CUDA GPU" and row["gpu_missing"] else "") for p in row["needs"]]
    return ", ".join(parts) or "-"


def run(a: argparse.Namespace) -> int:
    from hf_lowmem.plugins import load_plugins

    host = load_plugins()
    table = rows(host)
    failures = [{"entry_point": f.entry_point, "distribution": f.distribution, "error": f.error} for f in host.failures]
    if a.json:
        print(json.dumps({"plugins": table, "failed": failures, "blocked": host.blocked}, indent=2))
        return 0
    cols = ["kind", "name", "distribution", "version", "dependencies", "needs"]
    shown = [{**r, "needs": needs_text(r)} for r in table]
    widths = {c: max(len(c), *(len(str(r[c])) for r in shown)) if shown else len(c) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols) + "  DESCRIPTION")
    for r in shown:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols) + "  " + r["help"]
              + (f" [learning rate: {r['lr_advice']}]" if r["lr_advice"] else ""))
    for f in host.failures:
        print(f"\nFAILED TO LOAD: {f}")
        if a.verbose:
            print(f.traceback)
    if host.blocked:
        print(f"\nblocked by HF_LOWMEM_PLUGINS / HF_LOWMEM_DISABLE_PLUGINS: {', '.join(host.blocked)}")
    return 0
