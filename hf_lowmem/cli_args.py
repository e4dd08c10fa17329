"""Command-line parsing shared by the ``hf-lowmem`` subcommands.

- One flag style: underscores, as ``HfArgumentParser`` and the Trainer write them (``--gpu_memory``,
  ``--output_dir``); the dashed spelling (``--gpu-memory``) is accepted as the same flag everywhere.
- A usage error is one line (``hf-lowmem plan: error: ... (see hf-lowmem plan --help)``), never the
  700-flag usage block ``HfArgumentParser`` would print.
- ``hf-lowmem train --config FILE.yaml|json``: a file of the same keys as the flags (as ``trl sft --config``
  reads one); flags given on the command line override it; an unknown key is an error naming close matches.
- ``hf-lowmem train --help`` is short (the hf-lowmem flags and the common Trainer ones); ``--help_all``
  lists every ``TrainingArguments`` flag.
- Paths that look local (``./x``, ``/x``, ``x.txt``, ``a/b/c``) and do not exist are refused at once, instead
  of being looked up on the Hub (where a missing network means retries before the error).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hf_lowmem.errors import PluginError

#: Trainer flags ``hf-lowmem train --help`` shows beside the hf-lowmem ones (``--help_all`` shows every one)
COMMON_TRAINER_FLAGS = (
    "output_dir", "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
    "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "bf16", "logging_steps",
    "eval_strategy", "eval_steps", "save_strategy", "save_steps", "seed", "report_to", "use_cpu",
    "resume_from_checkpoint",
)

#: keys TRL / LLaMA-Factory config files use for what ``hf-lowmem train`` calls ``model`` and ``data``
CONFIG_ALIASES = {"model_name_or_path": "model", "dataset_name": "data", "dataset": "data"}

#: file suffixes that mark a name as a local file, never a Hub id
_LOCAL_SUFFIXES = (".txt", ".text", ".md", ".py", ".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow",
                   ".yaml", ".yml", ".safetensors", ".bin", ".gguf")


class UsageError(PluginError):
    """A command-line flag, value or config key that cannot work; the message says how to fix it."""


class OneLineErrors:
    """argparse mixin: a usage error is one line on stderr and exit status 2 (no usage block)."""

    def error(self, message: str):
        prog = getattr(self, "prog", "hf-lowmem")
        sys.stderr.write(f"{prog}: error: {message} (see {prog} --help)\n")
        raise SystemExit(2)


class Parser(OneLineErrors, argparse.ArgumentParser):
    """The subcommands' ``argparse`` parser."""


def close_matches(word: str, choices: Sequence[str], n: int = 3) -> str:
    """``"; did you mean a, b?"`` or ``""``."""
    near = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)
    return f"; did you mean {', '.join(near)}?" if near else ""


def _known_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return parser._option_string_actions  # argparse has no public accessor


def normalize_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``--gpu-memory`` -> ``--gpu_memory`` (or the other way) where only the other spelling is a flag."""
    known = _known_flags(parser)
    out: list[str] = []
    for i, tok in enumerate(argv):
        if tok == "--":
            out.extend(argv[i:])
            break
        if tok.startswith("--") and len(tok) > 2:
            name, eq, value = tok.partition("=")
            if name not in known:
                for alt in ("--" + name[2:].replace("-", "_"), "--" + name[2:].replace("_", "-")):
                    if alt in known:
                        tok = alt + eq + value
                        break
        out.append(tok)
    return out


def unknown_flag_message(parser: argparse.ArgumentParser, leftover: Sequence[str]) -> str:
    flags = [t.partition("=")[0] for t in leftover if t.startswith("-")]
    if not flags:
        return f"unexpected argument(s): {' '.join(leftover)}"
    known = [f for f in _known_flags(parser) if f.startswith("--") and "-" not in f[2:]]
    return "; ".join(f"unknown flag {f}{close_matches(f.replace('-', '_'), known)}" for f in flags)


# ---- local paths ------------------------------------------------------------------------------------------
def looks_local(spec: str) -> bool:
    """True for a name that can only be a local path: ``./x``, ``../x``, ``/x``, ``~/x``, ``x.txt``, ``a/b/c``
    (a Hub id is ``name`` or ``owner/name``)."""
    s = str(spec)
    if s.startswith((".", "/", "~", "\\")) or (len(s) > 1 and s[1] == ":"):
        return True
    if s.lower().endswith(_LOCAL_SUFFIXES):
        return True
    return s.count("/") >= 2 or os.sep != "/" and os.sep in s


def check_local_path(flag: str, spec: str | None, what: str) -> None:
    """A path-looking ``spec`` that does not exist: :class:`UsageError` (no Hub lookup)."""
    if spec and looks_local(spec) and not os.path.exists(os.path.expanduser(spec)):
        raise UsageError(f"{flag} {spec}: no such file or folder ({what})")


def check_model_name(flag: str, spec: str, presets: Sequence[str] = ()) -> None:
    """Refuse at once, without asking the Hub, a missing local path and a near-miss of a preset name (a
    name with no ``owner/`` that is not in the Hub cache)."""
    check_local_path(flag, spec, "a model folder or a config.json")
    if os.path.exists(spec) or spec in presets:
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(spec, "config.json"), str)
    except (ValueError, OSError):  # not a valid repo id at all
        cached = False
    if cached:
        return
    near = close_matches(spec.lower(), list(presets))
    if near and "/" not in spec:
        raise UsageError(f"{flag} {spec}: not a preset, a local path or a cached model{near}")


# ---- config files --------------------------------------------------------------------------------------
def load_config(path: str) -> dict[str, Any]:
    """A YAML or JSON mapping of flag names (without ``--``) to values."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"--config {path}: no such file")
    text = p.read_text(encoding="utf-8")
    import yaml

    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise UsageError(f"--config {path}: cannot read it as {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: "
                         f"{str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values (like `max_steps: 100`), "
                         f"got a {type(data).__name__}")
    return data


def apply_config(parser: argparse.ArgumentParser, config: dict[str, Any], source: str) -> None:
    """Make the config's values the parser's defaults (so command-line flags override them)."""
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", argparse.SUPPRESS)}
    values: dict[str, Any] = {}
    for key, value in config.items():
        dest = str(key).lstrip("-").replace("-", "_")
        dest = CONFIG_ALIASES.get(dest, dest) if dest not in actions else dest
        if dest not in actions or dest in ("config", "help_all"):
            raise UsageError(f"--config {source}: unknown key {key!r}{close_matches(dest, list(actions))}")
        values[dest] = value
    for dest in values:
        actions[dest].required = False
    parser.set_defaults(**values)


def _pop_flag_value(argv: list[str], names: Sequence[str]) -> tuple[list[str], str | None]:
    rest, value, i = [], None, 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            rest.extend(argv[i:])
            break
        name, eq, v = tok.partition("=")
        if name in names:
            if eq:
                value = v
            elif i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            else:
                raise UsageError(f"{name} needs a file: {name} FILE.yaml")
        else:
            rest.append(tok)
        i += 1
    return rest, value


# ---- hf-lowmem train -----------------------------------------------------------------------------------------
def train_parser(dataclass_types: Sequence[type], prog: str = "hf-lowmem train"):
    from transformers import HfArgumentParser

    cls = type("TrainArgumentParser", (OneLineErrors, HfArgumentParser), {})
    parser = cls(
        dataclass_types, prog=prog, add_help=False,
        usage=f"{prog} --model MODEL --data DATA --output_dir OUT [--config FILE.yaml] [flags]",
        description="Train a model on your data with LowMemTrainer. Flags are the Trainer's (underscores; the dashed "
                    "spelling works too); a --config file holds the same keys, and flags given here override it.",
    )
    group = parser.add_argument_group("help and config")
    group.add_argument("-h", "--help", action="store_true", help="this short help")
    group.add_argument("--help_all", "--help-all", action="store_true", help="every flag (all of TrainingArguments)")
    group.add_argument("--config", metavar="FILE.yaml|json",
                       help="flags from a YAML or JSON file of the same keys (e.g. `max_steps: 100`); flags given on "
                            "the command line override it")
    return parser


def _first_sentence(text: str | None) -> str:
    import re

    text = " ".join((text or "").split())
    m = re.search(r"(?<!e\.g)(?<!i\.e)\.\s", text)
    return text if m is None else text[: m.start() + 1]


def _metavar(a: argparse.Action) -> str:
    if a.nargs == 0:
        return ""
    if a.nargs == "?" and a.const is True:  # HfArgumentParser's booleans: --bf16, --bf16 false
        return " [BOOL]"
    if isinstance(a.metavar, str):
        return f" {a.metavar}"
    if a.choices:
        return " {" + ",".join(map(str, list(a.choices)[:4])) + (",...}" if len(a.choices) > 4 else "}")
    kind = {int: "N", float: "X"}.get(a.type, "VALUE")
    return f" {kind} [{kind} ...]" if a.nargs in ("+", "*") else f" {kind}"


def print_short_help(parser: argparse.ArgumentParser, first_fields: Sequence[str], width: int = 100) -> None:
    """The model/data flags, every ``lowmem_`` flag and :data:`COMMON_TRAINER_FLAGS`: one entry each, the
    underscore spelling, its help (the first sentence of the Trainer's) and its default."""
    import textwrap

    by_dest: dict[str, argparse.Action] = {}
    for a in parser._actions:
        if a.option_strings and a.dest not in by_dest and not a.option_strings[0].startswith("--no_"):
            by_dest[a.dest] = a
    lowmem = [d for d in by_dest if d.startswith("lowmem_")]
    groups = (("model and data", list(first_fields)), ("common Trainer flags", list(COMMON_TRAINER_FLAGS)),
              ("hf-lowmem (`hf-lowmem plugins` lists the names)", lowmem),
              ("help and config", ["help", "help_all", "config"]))
    rows = [f"usage: {parser.usage}", "", textwrap.fill(parser.description or "", width), ""]
    shown = set()
    for title, dests in groups:
        rows.append(f"{title}:")
        for d in dests:
            a = by_dest.get(d)
            if a is None:
                continue
            shown.add(d)
            flag = "  " + next((o for o in a.option_strings if o.startswith("--")), a.option_strings[0]) + _metavar(a)
            text = a.help if d.startswith("lowmem_") or d in first_fields else _first_sentence(a.help)
            text = " ".join((text or "").split())
            if a.default not in (None, False, "", argparse.SUPPRESS) and d not in ("help", "help_all"):
                text += f" [default: {a.default}]"
            col = 34
            if len(flag) >= col:
                rows.append(flag)
                rows.extend(textwrap.wrap(text, width, initial_indent=" " * col, subsequent_indent=" " * col,
                                           break_on_hyphens=False))
            else:
                rows.extend(textwrap.wrap(text, width, initial_indent=flag.ljust(col), subsequent_indent=" " * col,
                                           break_on_hyphens=False))
        rows.append("")
    n_more = len({a.dest for a in parser._actions if a.option_strings} - shown)
    rows.append(textwrap.fill(f"{n_more} more Trainer flags: {parser.prog} --help_all. Every flag can also go in a "
                              "--config file; `hf-lowmem plan` picks the plugins for a memory budget.", width,
                              break_on_hyphens=False))
    print("\n".join(rows))


def parse_train_argv(dataclass_types: Sequence[type], argv: Sequence[str], prog: str = "hf-lowmem train") -> tuple:
    """``hf-lowmem train``'s flags (and ``--config FILE``) into the dataclasses, in order. ``--help`` and
    ``--help_all`` print and exit 0; errors raise :class:`UsageError` or exit 2 with one line."""
    import dataclasses

    parser = train_parser(dataclass_types, prog)
    argv = normalize_flags(parser, list(argv))
    head = argv[: argv.index("--")] if "--" in argv else argv
    if "--help_all" in head:
        parser.print_help()
        raise SystemExit(0)
    if "-h" in head or "--help" in head:
        print_short_help(parser, [f.name for f in dataclasses.fields(dataclass_types[0])])
        raise SystemExit(0)
    argv, config_path = _pop_flag_value(argv, ("--config",))
    if config_path:
        apply_config(parser, load_config(config_path), config_path)
    *outputs, leftover = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if leftover:
        raise UsageError(unknown_flag_message(parser, leftover))
    first = outputs[0]
    if isinstance(getattr(first, "model", None), str):
        check_model_name("--model", first.model)
    if isinstance(getattr(first, "data", None), str):
        check_local_path("--data", first.data, "a text file or a folder of text files")
    return tuple(outputs[: len(dataclass_types)])
