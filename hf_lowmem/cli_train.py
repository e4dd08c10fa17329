"""``hf-lowmem train``: an ``HfArgumentParser`` front over ``LowMemTrainer``.

    hf-lowmem train --model PATH_OR_HUB_ID_OR_CONFIG.json --data FILE_OR_FOLDER_OR_DATASET \
        --output_dir out --max_steps 100 --lowmem_optimizer bnb-adamw8bit

Every ``TrainingArguments`` and ``LowMemTrainingArguments`` flag works (``--help_all`` lists them; ``--help`` the
common ones); ``--config FILE.yaml`` reads them from a file (see :mod:`hf_lowmem.cli_args`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

PASSTHROUGH = True


@dataclass
class ModelDataArguments:
    model: str = field(metadata={"help": "A local model folder, a hub id, or a config.json to build a fresh model from."})
    data: str = field(metadata={"help": "A text file, a folder of text files, or a dataset name `datasets` can load."})
    block_size: int = field(default=512, metadata={"help": "Tokens per training example."})
    eval_fraction: float = field(default=0.0, metadata={"help": "Fraction of the text held out for evaluation."})
    dtype: str = field(default="float32", metadata={"help": "Dtype the weights are loaded in (float32, bfloat16)."})


def build_model(spec: str, dtype: str = "float32"):
    """A model from a folder or hub id (weights), or from a ``config.json`` (fresh random weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    if spec.endswith(".json") and os.path.isfile(spec):
        config = AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(spec)) if os.path.basename(spec) == "config.json" else spec)
        return AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    has_weights = os.path.isdir(spec) and any(f.endswith((".safetensors", ".bin")) for f in os.listdir(spec))
    if os.path.isdir(spec) and not has_weights:
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec), dtype=torch_dtype)
    return AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype)


def run_argv(argv: list[str]) -> int:
    from hf_lowmem.args import LowMemTrainingArguments
    from hf_lowmem.cli_args import parse_train_argv
    from hf_lowmem.textdata import load_text_dataset, tokenizer_for
    from hf_lowmem.trainer import LowMemTrainer

    margs, targs = parse_train_argv((ModelDataArguments, LowMemTrainingArguments), argv)  # --config, short --help
    if targs.lowmem_gpu_memory:  # plan from the config alone: a budget no plan meets fails before weights load
        from hf_lowmem.errors import MemoryBudgetError

        try:
            targs.lowmem_plan(margs.model, seq_len=margs.block_size, param_dtype=margs.dtype)
        except MemoryBudgetError as e:
            raise SystemExit(f"hf-lowmem train: {e}") from None
    tokenize, tokenizer = tokenizer_for(margs.model if os.path.isdir(margs.model) else None)
    from transformers import enable_full_determinism, set_seed

    # seeded before the model is built, so that --seed fixes a fresh model's initial weights too
    (enable_full_determinism if targs.full_determinism else set_seed)(targs.seed)
    model = build_model(margs.model, margs.dtype)
    if tokenizer is None and model.config.vocab_size < 256:
        raise SystemExit(f"the model's vocabulary ({model.config.vocab_size}) is smaller than the byte tokenizer's 256;"
                         " give a model folder with a tokenizer")
    train, evald = load_text_dataset(margs.data, tokenize, margs.block_size, margs.eval_fraction)
    trainer = LowMemTrainer(model=model, args=targs, train_dataset=train, eval_dataset=evald,
                            processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint)
    trainer.save_model()
    if evald is not None:
        print(trainer.evaluate())
    return 0
