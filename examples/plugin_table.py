"""Print the README's plugin table from the installed plugins (what ``hf-lowmem plugins --json`` reports).

    python examples/plugin_table.py          # print it
    python examples/plugin_table.py --write  # write it between the plugin-table markers in README.md
    python examples/plugin_table.py --check  # exit 1 if README.md's table differs
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- plugin-table:begin -->", "<!-- plugin-table:end -->"


def table() -> str:
    out = subprocess.run([str(Path(sys.executable).parent / "hf-lowmem"), "plugins", "--json"], capture_output=True,
                         text=True, check=True).stdout
    rows = [p for p in json.loads(out)["plugins"] if p["distribution"] == "hf-lowmem"]
    lines = ["| kind | name | lossless | distributed modes | needs | what it does | at your AdamW learning rate "
             "(H200: bench/results/quality_gpu.md) |",
             "|---|---|---|---|---|---|---|"]
    for p in rows:  # "needs": what `hf-lowmem plugins` derives from each plugin's needs_cuda, requires and extra
        needs = ", ".join(x if x == "CUDA GPU" else f"`{x}`" for x in p["needs"])
        lines.append(f"| {p['kind']} | `{p['name']}` | {'yes' if p['lossless'] else 'no'} | {', '.join(p['modes'])} "
                     f"| {needs} | {p['help']} | {p.get('lr_advice') or ''} |")
    return "\n".join(lines)


def readme_table() -> str:
    m = re.search(re.escape(BEGIN) + r"\n(.*?)\n" + re.escape(END), README.read_text(), re.S)
    return m.group(1) if m else ""


if __name__ == "__main__":
    t = table()
    if "--check" in sys.argv:
        same = readme_table() == t
        print("README plugin table is up to date" if same else "README plugin table is stale: run python examples/plugin_table.py --write")
        raise SystemExit(0 if same else 1)
    if "--write" in sys.argv:
        text = README.read_text()
        README.write_text(re.sub(re.escape(BEGIN) + r"\n.*?\n" + re.escape(END), lambda _: f"{BEGIN}\n{t}\n{END}", text, flags=re.S))
    print(t)
