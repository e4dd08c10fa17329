"""The ``hf-lowmem`` command. Each subcommand lives in its own module with ``add_arguments(parser)`` and
``run(namespace)``; modules are imported only when their subcommand runs, so ``hf-lowmem --help`` is
fast and works with no optional package installed.

Flags are written with underscores, as the Trainer's are (``--gpu_memory``); the dashed spelling is the
same flag. An error is one line on stderr and exit status 2; ``hf-lowmem --debug COMMAND ...`` or
``HF_LOWMEM_DEBUG=1`` shows the traceback instead.

Before torch is imported, two environment defaults are set when the user has not set them:
``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep instead of spinning: on a 2-core machine with one
other busy process, 20 demo steps took 108 s with spinning threads and 5.2 s with sleeping ones, see
notes/first-hour.md) and ``TOKENIZERS_PARALLELISM=false`` (text is tokenized in one call, and a forked
DataLoader worker would otherwise warn).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("hf_lowmem.demo", "train a small Llama on generated text (the main job on an embedded default)"),
    "train": ("hf_lowmem.cli_train", "train a model on your data with LowMemTrainer (Trainer flags, --config FILE.yaml)"),
    "plugins": ("hf_lowmem.cli_plugins", "list every plugin: kind, name, distribution, version, dependencies"),
    "plan": ("hf_lowmem.cli_plan", "will a model train in this much GPU/host memory, and with which plugins"),
    "export": ("hf_lowmem.cli_export", "export a trained model folder to hf safetensors, ONNX, TorchScript or a torch.export program"),
}

#: environment defaults set before torch is imported (see the module docstring)
ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}


def set_env_defaults() -> None:
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)


def _debug_requested() -> bool:
    return os.environ.get("HF_LOWMEM_DEBUG", "").lower() not in ("", "0", "false", "no", "off")


def one_line(e: BaseException) -> str:
    """An exception as one line: hf-lowmem's own messages as written, others' first lines joined."""
    from hf_lowmem.errors import LowMemError

    text = str(e).strip() or type(e).__name__
    if isinstance(e, LowMemError):
        return " ".join(text.split("\n"))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    msg = " ".join(lines[:2])
    if isinstance(e, FileNotFoundError) and e.filename and str(e.filename) not in msg:
        msg = f"{msg}: {e.filename}"
    return f"{type(e).__name__}: {msg[:400]}"


def _run(name: str, rest: list[str]) -> int:
    from hf_lowmem.cli_args import Parser, normalize_flags

    module = importlib.import_module(COMMANDS[name][0])
    if getattr(module, "PASSTHROUGH", False):  # parses its own flags (HfArgumentParser)
        return int(module.run_argv(rest) or 0)
    p = Parser(prog=f"hf-lowmem {name}", description=COMMANDS[name][1],
               epilog="Flags are written with underscores, as the Trainer's; the same flag with dashes for "
                      "underscores works too.")
    module.add_arguments(p)
    ns = p.parse_args(normalize_flags(p, rest))
    if name == "plan":  # a typo of a preset must not wait for the Hub's retries
        from hf_lowmem.cli_args import check_model_name
        from hf_lowmem.planner import preset_names

        check_model_name("--model", ns.model, preset_names())
    result = module.run(ns)
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="hf-lowmem",
        description="Full-parameter training of large language models on small GPUs, on the Hugging Face Trainer.",
        epilog="`hf-lowmem COMMAND --help` for a command's flags. Errors are one line; --debug (or HF_LOWMEM_DEBUG=1) "
               "shows the traceback.",
    )
    from hf_lowmem import __version__

    parser.add_argument("--version", action="version", version=f"hf-lowmem {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    debug = _debug_requested()
    if argv[:1] == ["--debug"]:
        debug, argv = True, argv[1:]
    if not argv or argv[0] in ("-h", "--help", "--version") or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 0
    set_env_defaults()
    name, rest = argv[0], argv[1:]
    from hf_lowmem.errors import LowMemError

    try:
        return _run(name, rest)
    except BrokenPipeError:
        raise
    except (LowMemError, ValueError, OSError, ImportError) as e:
        if debug:
            raise
        hint = "" if isinstance(e, LowMemError) else " (hf-lowmem --debug ... shows the traceback)"
        print(f"hf-lowmem {name}: error: {one_line(e)}{hint}", file=sys.stderr)
        return 2


def entry() -> int:  # pragma: no cover - the console script
    try:
        return main()
    except BrokenPipeError:  # `hf-lowmem plugins | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(entry())
