#!/usr/bin/env bash
# Sourced at the start of every command on the GPU machine: installs the carried wheels (.whl/) and hf-lowmem
# itself (from this checkout) into /tmp/site, since that machine reaches no package registry.
set -u
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/tmp/pip.log 2>&1 \
  || { cat /tmp/pip.log; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
# hf-lowmem's entry points: an egg-info next to the sources makes them discoverable without pip
mkdir -p /tmp/hfl && python3 - <<'PY'
import os, re, pathlib, tomllib
root = pathlib.Path.cwd()
meta = tomllib.loads((root / "pyproject.toml").read_text())
eps = meta["project"]["entry-points"]["hf_lowmem"]
d = pathlib.Path("/tmp/site/hf_lowmem-0.1.0.dist-info"); d.mkdir(parents=True, exist_ok=True)
(d / "METADATA").write_text("Metadata-Version: 2.1\nName: hf-lowmem\nVersion: 0.1.0\n")
(d / "entry_points.txt").write_text("[hf_lowmem]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
(d / "top_level.txt").write_text("hf_lowmem\nhf_lowmem_plugins\n")
link = pathlib.Path("/tmp/site/hf_lowmem_plugins")
if not link.exists():
    link.symlink_to(root / "plugins")
print("entry points:", len(eps))
PY
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'gpu', torch.cuda.get_device_name(0))"
