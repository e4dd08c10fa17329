"""Text to training examples: a byte-level tokenizer for models built from a config, the demo corpus the
package generates (nothing is downloaded), and loaders for a text file, a folder of text files, or a
dataset ``datasets`` can load."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Callable, Iterable

import torch


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocabulary 256): needs no files, so a model built from a config can
    train on any text. Models with their own tokenizer use it instead."""

    vocab_size = 256

    def __call__(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


_NAMES = ["Ada", "Grace", "Alan", "Linus", "Barbara", "Ken", "Margaret", "Dennis", "Frances", "Edsger"]
_THINGS = ["model", "kernel", "tensor", "layer", "gradient", "optimizer", "batch", "token", "buffer", "stream"]
_VERBS = ["trains", "streams", "copies", "updates", "checks", "offloads", "measures", "saves", "loads", "prints"]


def demo_corpus(n_lines: int = 4000, seed: int = 0) -> str:
    """A deterministic synthetic corpus with learnable structure: templated sentences and arithmetic.
    A small model's loss falls visibly within a few hundred steps."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        r = rng.random()
        if r < 0.4:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            lines.append(f"{a} plus {b} is {a + b}.")
        elif r < 0.8:
            lines.append(f"{rng.choice(_NAMES)} {rng.choice(_VERBS)} the {rng.choice(_THINGS)}"
                         f" {rng.randint(2, 9)} times.")
        else:
            k = rng.randint(1, 9)
            lines.append("count: " + " ".join(str(i) for i in range(k, k + 6)) + ".")
    return "\n".join(lines) + "\n"


class TokenBlocks(torch.utils.data.Dataset):
    """A token stream cut into fixed-length blocks of ``{"input_ids", "labels"}`` (labels = inputs; the
    model shifts them)."""

    def __init__(self, ids: list[int] | torch.Tensor, block_size: int):
        ids = torch.as_tensor(ids, dtype=torch.long)
        n = len(ids) // block_size
        if n == 0:
            raise ValueError(f"the text has {len(ids)} tokens, fewer than one block of {block_size}")
        self.blocks = ids[: n * block_size].view(n, block_size)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.blocks[i]
        return {"input_ids": x, "labels": x.clone()}


def read_texts(source: str) -> str:
    """The text of a file, or of every ``.txt``/``.md``/``.py`` file under a folder (sorted)."""
    p = Path(source)
    if p.is_file():
        return p.read_text(encoding="utf-8", errors="ignore")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".md", ".py", ".text"))
        if not files:
            raise FileNotFoundError(f"no .txt/.md/.py files under {source}")
        return "\n\n".join(f.read_text(encoding="utf-8", errors="ignore") for f in files)
    raise FileNotFoundError(source)


def load_text_dataset(source: str, tokenize: Callable[[str], list[int]], block_size: int,
                      eval_fraction: float = 0.0) -> tuple[TokenBlocks, TokenBlocks | None]:
    """Train (and optionally eval) blocks from a text file, a folder of text files, or a dataset name
    (``datasets.load_dataset``; its ``text`` column, or its first string column)."""
    if os.path.exists(source):
        text = read_texts(source)
    else:
        try:
            import datasets
        except ImportError as e:
            raise FileNotFoundError(
                f"{source!r} is not a file or folder, and loading it as a dataset needs `pip install 'hf-lowmem[datasets]'`"
            ) from e
        ds = datasets.load_dataset(source, split="train")
        col = "text" if "text" in ds.column_names else next(
            c for c in ds.column_names if isinstance(ds[0][c], str))
        text = "\n\n".join(ds[col])
    ids = tokenize(text)
    if eval_fraction > 0:
        cut = int(len(ids) * (1 - eval_fraction))
        return TokenBlocks(ids[:cut], block_size), TokenBlocks(ids[cut:], block_size)
    return TokenBlocks(ids, block_size), None


def tokenizer_for(model_path: str | None) -> tuple[Callable[[str], list[int]], Any]:
    """The model's own tokenizer when its folder has one, else :class:`ByteTokenizer`."""
    if model_path and os.path.isdir(model_path) and any(
            os.path.exists(os.path.join(model_path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_path)
        return (lambda text: tok(text, add_special_tokens=False)["input_ids"]), tok
    tok = ByteTokenizer()
    return tok, None
