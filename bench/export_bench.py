"""Export a real model to every format and measure it: export time, file size, largest logit difference.

    python bench/export_bench.py --model assets/smollm2-135m            # the real run (CPU is enough)
    python bench/export_bench.py --smoke                                # a tiny Llama, seconds

Each format runs in a fresh subprocess (so its time includes the exporter's own imports, as a user of
``hf-lowmem export`` pays them, and its peak RSS is its own). Per format it records what
:func:`hf_lowmem.export.export_model` measured (load, export and validation seconds, artifact size,
largest logit difference on inputs of two shapes) plus a check on real text: the artifact, loaded back
with the plain library call of its format, is run on tokenized code snippets and its greedy next-token
choice is compared with the PyTorch model's at every position. Results go to ``--json`` and ``--md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("hf", "onnx", "torchscript", "exported-program")
PROMPTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "import os\nfor name in os.listdir('.'):\n    print(",
]


def _machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": mem, "python": platform.python_version(),
            "gpu": "none used (the export runs on the CPU)"}


def _texts(model_dir: Path) -> list[str]:
    """Four code snippets of different lengths: from the asset corpus beside the model when it is there
    (fetch-assets.sh puts it at DEST/corpus/stdlib-code.txt), else the built-in prompts."""
    corpus = model_dir.parent / "corpus" / "stdlib-code.txt"
    if not corpus.is_file():
        return PROMPTS
    with corpus.open(encoding="utf-8", errors="replace") as f:
        text = f.read(400_000)
    starts = [10_000, 100_000, 200_000, 300_000]
    return [text[s: s + n] for s, n in zip(starts, (600, 450, 300, 150))]


def _real_text_check(fmt: str, out: Path, model_dir: Path, dtype: str) -> dict:
    """Greedy next-token agreement between the loaded artifact and the PyTorch model on real text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir = model_dir if (model_dir / "tokenizer_config.json").exists() else None
    if tok_dir is None:
        return {"skipped": "no tokenizer in the model folder"}
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(_texts(model_dir), return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        ref = ref_model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        if fmt == "hf":
            got = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids, attention_mask=mask, use_cache=False).logits
        elif fmt == "onnx":
            import onnxruntime as ort

            sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])
        elif fmt == "torchscript":
            got = torch.jit.load(str(out / "model.pt"))(ids, mask)
        else:
            got = torch.export.load(str(out / "model.pt2")).module()(ids, mask)
    got = got.float()
    keep = mask.bool()
    agree = (got.argmax(-1) == ref.argmax(-1))[keep]
    top2 = ref[keep].topk(2, dim=-1).values
    gaps = (top2[:, 0] - top2[:, 1])[~agree]  # how close the reference's top two were where the choice differs
    return {"tokens": int(keep.sum()), "top1_agreement": round(float(agree.float().mean()), 4),
            "disagreements": int((~agree).sum()),
            "reference_top2_gap_at_disagreements": [round(float(g), 6) for g in gaps],
            "max_abs_diff_real_text": float((got - ref).abs()[keep].max())}


def run_one(fmt: str, model_dir: Path, out_root: Path) -> dict:
    """One format, in this process: export, then the real-text check."""
    t_imp = time.perf_counter()
    import torch  # noqa: F401 - imports are timed apart from the export
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_lowmem.export import export_model

    AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(model_dir))]  # the model's module
    if fmt == "onnx":
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
        import torch.onnx  # noqa: F401
    import_seconds = time.perf_counter() - t_imp

    out = out_root / fmt
    t0 = time.perf_counter()
    result = export_model(model_dir, out, fmt, overwrite=True)
    wall = time.perf_counter() - t0
    row = result.to_dict()
    row["wall_seconds"] = round(wall, 2)
    row["import_seconds"] = round(import_seconds, 2)
    row["real_text"] = _real_text_check(fmt, out, model_dir, result.dtype)
    row["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return row


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _make_smoke_model(where: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.tiny import tiny_model

    path = where / "tiny-llama"
    tiny_model("llama", seed=0).save_pretrained(path)
    return path


def _markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [
        f"# Export benchmark: {doc['model_name']}",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"Ran on the CPU of the 2-core dev machine ({m['cores']} cores, {m['cpu']}, {m['ram_gib']} GiB RAM; "
        f"no GPU), shared with other jobs: load average {doc['loadavg_start']} at the start, {doc['loadavg_end']} at "
        f"the end, so the times are upper bounds for this machine. {doc['date']}. torch {doc['versions'].get('torch')}, "
        f"transformers {doc['versions'].get('transformers')}, onnx {doc['versions'].get('onnx', '-')}, onnxruntime "
        f"{doc['versions'].get('onnxruntime', '-')}, onnxscript {doc['versions'].get('onnxscript', '-')}.",
        "",
        "| format | dtype | exporter | export time (s) | load source (s) | validate (s) | imports (s) | file size (MB) | largest logit diff vs PyTorch (1x7, 3x19) | tolerance | largest logit diff on real text | top-1 agreement on real text | peak RSS (GiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in doc["results"]:
        if "error" in r:
            lines.append(f"| {r['format']} | | FAILED: {r['error'][:200]} | | | | | | | | | | |")
            continue
        rt = r["real_text"]
        agree = f"{rt['top1_agreement'] * 100:.2f}% of {rt['tokens']} tokens" if "top1_agreement" in rt else rt.get("skipped", "")
        if rt.get("disagreements"):
            gap = max(rt["reference_top2_gap_at_disagreements"])
            agree += (f" ({rt['disagreements']} differ; there the PyTorch model's top two logits were "
                      + ("exactly tied" if gap == 0 else f"at most {gap:.2g} apart") + ")")
        lines.append(
            f"| {r['format']} | {r['dtype']} | {r['exporter']} | {r['export_seconds']:.1f} | {r['load_seconds']:.1f} | "
            f"{r['validate_seconds']:.1f} | {r['import_seconds']:.1f} | {r['size_bytes'] / 1e6:.1f} | {r['max_abs_diff']:.3g} | {r['tolerance']:.3g} | "
            f"{rt.get('max_abs_diff_real_text', float('nan')):.3g} | {agree} | {r['peak_rss_gib']} |")
    lines += [
        "",
        "- export time: writing the artifact and loading it back (the ONNX session, `from_pretrained`, ...), in a fresh "
        "process after torch, transformers (and for ONNX onnxscript/onnxruntime) were imported; load source: reading "
        "the model folder into a plain model; validate: running both models on the sample inputs.",
        "- largest logit diff: the artifact as loaded from disk against the PyTorch model in the same precision, over "
        "the positions the attention mask keeps, on a 1x7 and a left-padded 3x19 input of random tokens; `hf` is "
        "compared with the source folder's model, loaded by `from_pretrained` in its own precision.",
        "- ONNX is exported in float32 by default (onnxruntime's CPU kernels lack bfloat16); the other formats keep the "
        "checkpoint's precision. Tolerance: 1e-4 (float32) or 1.5e-2 (bfloat16) times max(1, largest |logit|).",
        "- top-1 agreement: greedy next-token choice of the loaded artifact vs the PyTorch model at every position of "
        "four snippets of the CPython standard library from the asset corpus (a left-padded batch of 4, different lengths).",
    ]
    for r in doc["results"]:
        for n in r.get("notes") or []:
            lines.append(f"- {r['format']}: {n}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="model folder (e.g. assets/smollm2-135m from shared/assets/fetch-assets.sh)")
    p.add_argument("--smoke", action="store_true", help="a tiny Llama instead of --model")
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    p.add_argument("--work", type=Path, default=None, help="where the exports are written (default: a temp dir, removed)")
    p.add_argument("--json", type=Path, default=None, help="write results here (default: bench/export_results.json, "
                                                           "or nothing with --smoke)")
    p.add_argument("--md", type=Path, default=None, help="write the markdown table here (default: beside --json)")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="only re-render the markdown of a results JSON (to --md, default beside it)")
    p.add_argument("--one", choices=FORMATS, help=argparse.SUPPRESS)  # internal: run one format, print JSON
    a = p.parse_args(argv)

    if a.render:
        md = a.md or a.render.with_suffix(".md")
        md.write_text(_markdown(json.loads(a.render.read_text())))
        print(f"wrote {md}")
        return 0

    if a.one:  # the per-format subprocess
        row = run_one(a.one, a.model, a.work)
        print("@@RESULT@@" + json.dumps(row))
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="export-bench-"))
    work = a.work or tmp
    try:
        if a.smoke:
            model_dir = _make_smoke_model(tmp)
        elif a.model is None:
            p.error("pass --model PATH (or --smoke)")
        else:
            model_dir = a.model.resolve()
        out_json = a.json if a.json is not None else (None if a.smoke else ROOT / "bench" / "export_results.json")
        out_md = a.md if a.md is not None else (out_json.with_suffix(".md") if out_json else None)

        doc = {
            "model": str(model_dir), "model_name": model_dir.name,
            "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:])),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": _machine(), "loadavg_start": _loadavg(), "results": [],
        }
        for fmt in a.formats:
            print(f"== {fmt}", flush=True)
            cmd = [sys.executable, os.path.abspath(__file__), "--one", fmt, "--model", str(model_dir), "--work", str(work)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@")), None)
            if proc.returncode != 0 or line is None:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"   FAILED: {err}", flush=True)
                doc["results"].append({"format": fmt, "error": err})
                continue
            row = json.loads(line[len("@@RESULT@@"):])
            doc["results"].append(row)
            rt = row["real_text"]
            print(f"   {row['dtype']}, {row['size_bytes'] / 1e6:.1f} MB, export {row['export_seconds']:.1f} s, "
                  f"largest logit diff {row['max_abs_diff']:.3g} (tolerance {row['tolerance']:.3g}), "
                  f"top-1 agreement {rt.get('top1_agreement', '-')}", flush=True)
        doc["loadavg_end"] = _loadavg()
        doc["versions"] = next((r["versions"] for r in doc["results"] if r.get("format") == "onnx" and "versions" in r),
                               next((r["versions"] for r in doc["results"] if "versions" in r), {}))
        if out_json:
            out_json.write_text(json.dumps(doc, indent=2) + "\n")
            print(f"wrote {out_json}")
        if out_md:
            out_md.write_text(_markdown(doc))
            print(f"wrote {out_md}")
        else:
            print(_markdown(doc))
        return 0 if all("error" not in r for r in doc["results"]) else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
