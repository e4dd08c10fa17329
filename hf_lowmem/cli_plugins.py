"""``hf-lowmem plugins``: every registered plugin with its kind, distribution, version and whether its
dependencies are installed, and for lossy optimizers what they measured at your learning rate; plugins that
failed to load are listed with the reason."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--verbose", action="store_true", help="show the traceback of plugins that failed to load")


def rows(host) -> list[dict]:
    out = []
    for info in host.registry:
        missing = info.missing_requirements()
        out.append({
            "kind": info.kind, "name": info.name, "distribution": info.distribution, "version": info.version,
            "entry_point": host.registry.owner(info.name),
            "dependencies": "ok" if not missing else f"missing {', '.join(missing)} (pip install 'hf-lowmem[{info.extra}]')"
            if info.extra else f"missing {', '.join(missing)}",
            "lossless": info.lossless, "modes": list(info.modes), "help": info.help,
            "quality_gap_pct": info.quality_gap, "lr_advice": info.lr_advice,
        })
    return out


def run(a: argparse.Namespace) -> int:
    from hf_lowmem.plugins import load_plugins

    host = load_plugins()
    table = rows(host)
    failures = [{"entry_point": f.entry_point, "distribution": f.distribution, "error": f.error} for f in host.failures]
    if a.json:
        print(json.dumps({"plugins": table, "failed": failures, "blocked": host.blocked}, indent=2))
        return 0
    cols = ["kind", "name", "distribution", "version", "dependencies"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in table)) if table else len(c) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols) + "  DESCRIPTION")
    for r in table:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols) + "  " + r["help"]
              + (f" [learning rate: {r['lr_advice']}]" if r["lr_advice"] else ""))
    for f in host.failures:
        print(f"\nFAILED TO LOAD: {f}")
        if a.verbose:
            print(f.traceback)
    if host.blocked:
        print(f"\nblocked by HF_LOWMEM_PLUGINS / HF_LOWMEM_DISABLE_PLUGINS: {', '.join(host.blocked)}")
    return 0
