"""`hf-lowmem plugins` and the README plugin table say what each plugin needs (a CUDA GPU, an extra), derived
from the plugin's own attributes (needs_cuda, requires, extra), for third-party plugins too."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from hf_lowmem import Plugin
from hf_lowmem.cli_plugins import needs, rows
from hf_lowmem.testing import host_with

ROOT = Path(__file__).resolve().parents[1]


class GpuWidget(Plugin):
    name, kind, help = "gpu-widget", "offload", "a third-party plugin that needs a GPU and an extra"
    requires, extra, needs_cuda = ("json",), "widgets", True


class PlainWidget(Plugin):
    name, kind, help = "plain-widget", "offload", "a third-party plugin that needs a package, no extra"
    requires = ("json.decoder",)


def test_needs_are_derived_from_the_plugins_attributes():
    assert needs(GpuWidget()) == ["CUDA GPU", "hf-lowmem[widgets]"]
    assert needs(PlainWidget()) == ["json"]
    assert needs(Plugin(name="bare", kind="offload")) == []
    host = host_with(GpuWidget(), PlainWidget())
    by_name = {r["name"]: r for r in rows(host)}
    assert by_name["galore-adamw8bit"]["needs"] == ["CUDA GPU", "hf-lowmem[galore,bnb]"]  # before: "galore" only
    assert by_name["galore-adamw"]["needs"] == ["hf-lowmem[galore]"] and by_name["adamw"]["needs"] == []
    assert by_name["gpu-widget"]["needs"] == ["CUDA GPU", "hf-lowmem[widgets]"]


def test_the_table_has_a_needs_column_and_says_when_the_gpu_is_missing(monkeypatch, capsys):
    import torch

    import hf_lowmem.cli_plugins as cli_plugins
    import hf_lowmem.plugins as plugins_mod

    host = host_with(GpuWidget(), PlainWidget())
    monkeypatch.setattr(plugins_mod, "load_plugins", lambda *a, **k: host)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli_plugins.run(argparse.Namespace(json=False, verbose=False)) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split()[:6] == ["KIND", "NAME", "DISTRIBUTION", "VERSION", "DEPENDENCIES", "NEEDS"]
    line = {ln.split()[1]: ln for ln in lines if ln.strip()}
    # before: "ok" and nothing else for a plugin that cannot run on this CPU-only machine
    assert " ok " in line["galore-adamw8bit"] and "CUDA GPU (none here), hf-lowmem[galore,bnb]" in line["galore-adamw8bit"]
    assert "CUDA GPU (none here), hf-lowmem[widgets]" in line["gpu-widget"] and " json " in line["plain-widget"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cli_plugins.run(argparse.Namespace(json=False, verbose=False))
    out = capsys.readouterr().out
    assert "CUDA GPU, hf-lowmem[galore,bnb]" in out and "none here" not in out


def test_the_readme_table_shows_what_each_first_party_plugin_needs():
    from hf_lowmem.plugins import load_plugins

    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- plugin-table:begin -->")[1].split("<!-- plugin-table:end -->")[0].strip().splitlines()
    assert [c.strip() for c in table[0].strip("|").split("|")][4] == "needs"
    listed = {}
    for line in table[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        listed[cells[1].strip("`")] = cells[4]
    for info in load_plugins().registry:
        if info.distribution == "hf-lowmem":
            want = ", ".join(x if x == "CUDA GPU" else f"`{x}`" for x in needs(info))
            assert listed[info.name] == want, f"{info.name}: python examples/plugin_table.py --write"


@pytest.mark.parametrize("name", ["galore-adamw8bit", "flash-attn"])
def test_gpu_only_first_party_plugins_are_marked(name):
    from hf_lowmem.plugins import load_plugins

    assert needs(load_plugins().registry[name])[0] == "CUDA GPU"
