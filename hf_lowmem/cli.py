"""The ``hf-lowmem`` command. Each subcommand lives in its own module with ``add_arguments(parser)`` and
``run(namespace)``; modules are imported only when their subcommand runs, so ``hf-lowmem --help`` is
fast and works with no optional package installed."""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("hf_lowmem.demo", "train a small Llama on generated text (the main job on an embedded default)"),
    "train": ("hf_lowmem.cli_train", "train a model on your data with LowMemTrainer (HfArgumentParser flags)"),
    "plugins": ("hf_lowmem.cli_plugins", "list every plugin: kind, name, distribution, version, dependencies"),
    "plan": ("hf_lowmem.cli_plan", "will a model train in this much GPU/host memory, and with which plugins"),
    "export": ("hf_lowmem.cli_export", "export a trained model folder to hf safetensors, ONNX, TorchScript or a torch.export program"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="hf-lowmem",
        description="Full-parameter training of large language models on small GPUs, on the Hugging Face Trainer.",
    )
    from hf_lowmem import __version__

    parser.add_argument("--version", action="version", version=f"hf-lowmem {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help", "--version") or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 0
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    if getattr(module, "PASSTHROUGH", False):  # parses its own flags (HfArgumentParser)
        return int(module.run_argv(rest) or 0)
    p = argparse.ArgumentParser(prog=f"hf-lowmem {name}", description=COMMANDS[name][1])
    module.add_arguments(p)
    result = module.run(p.parse_args(rest))
    return result if isinstance(result, int) else 0


def entry() -> int:  # pragma: no cover - the console script
    try:
        return main()
    except BrokenPipeError:  # `hf-lowmem plugins | head`
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(entry())
