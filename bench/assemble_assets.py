"""Rebuild, on the GPU machine, the SmolLM2-135M asset that ../shared/assets/fetch-assets.sh makes here.

That machine reaches no registry and a call carries at most 64 MiB, so the GGUF file travels in two halves
over two consecutive calls (kept under /tmp/xfer while the machine stays warm), plus the small files
(tokenizer, config, corpus). This script joins the halves, checks the GGUF's sha256, and converts it with
the same transformers code fetch-assets.sh uses; it prints a digest of the weights to compare with the
local asset (bench/assets_digest.txt)."""

import hashlib
import pathlib
import sys

import torch


def state_digest(sd) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main(xfer: str, dest: str) -> None:
    xfer, dest = pathlib.Path(xfer), pathlib.Path(dest)
    gguf = xfer / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(gguf, "wb") as out:
        for part in sorted(xfer.glob("gguf.part*")):
            out.write(part.read_bytes())
    want = (xfer / "gguf.sha256").read_text().strip()
    got = hashlib.sha256(gguf.read_bytes()).hexdigest()
    if got != want:
        raise SystemExit(f"GGUF sha256 mismatch: {got} != {want}")
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    q = AutoModelForCausalLM.from_pretrained(str(xfer), gguf_file=gguf.name, dtype=torch.float32)
    cfg = q.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    m = LlamaForCausalLM(cfg)
    m.load_state_dict(q.state_dict())
    m = m.to(torch.bfloat16)
    out = dest / "smollm2-135m"
    m.save_pretrained(str(out))  # the tokenizer files came with the small-files archive
    print("asset digest", state_digest(m.state_dict()))


if __name__ == "__main__":
    if sys.argv[1] == "--digest":
        from transformers import AutoModelForCausalLM

        print("asset digest", state_digest(AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.bfloat16).state_dict()))
    else:
        main(sys.argv[1], sys.argv[2])
