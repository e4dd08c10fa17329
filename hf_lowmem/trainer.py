"""``LowMemTrainer``: the Hugging Face ``Trainer`` with hf-lowmem's plugins.

Switching an existing script takes two lines::

    from hf_lowmem import LowMemTrainer as Trainer, LowMemTrainingArguments as TrainingArguments

A plain ``TrainingArguments`` is accepted and upgraded. :class:`LowMemTrainerMixin` gives any Trainer
subclass (e.g. TRL's ``SFTTrainer``) the same plugins: see :func:`lowmem_trainer_class`.

Checkpoints are written atomically with a verified manifest (:mod:`hf_lowmem.checkpoint`), and SIGTERM /
SIGINT stop the run at a step boundary with a checkpoint (:mod:`hf_lowmem.signals`).
"""

from __future__ import annotations

import functools
import logging
from functools import lru_cache

import torch
from transformers import Trainer

from hf_lowmem.announce import announce
from hf_lowmem.args import LowMemFields, upgrade_args
from hf_lowmem.context import LowMemContext, distributed_mode
from hf_lowmem.errors import PluginError
from hf_lowmem.hyperparams import check_training_arguments

logger = logging.getLogger("hf_lowmem")


class LowMemTrainerMixin:
    """Adds plugin selection, validation, model preparation, optimizer creation, an optional training
    engine, and save-time state-dict hooks to a ``transformers.Trainer`` subclass."""

    def __init__(self, model=None, args=None, *rest, plugin_host=None, **kwargs):
        if args is not None and not isinstance(args, LowMemFields):
            logger.info("hf-lowmem: upgrading %s to %s", type(args).__name__, "LowMem" + type(args).__name__)
        args = upgrade_args(args)
        check_training_arguments(args)
        if plugin_host is None:
            from hf_lowmem.plugins import get_plugin_host, load_plugins

            plugin_host = load_plugins(strict=True) if args.lowmem_strict_plugins else get_plugin_host()
        plan = None
        if args.lowmem_gpu_memory and model is not None:
            # the memory planner fills the selection (or refuses) before any plugin touches the model
            plan = args.lowmem_plan(model, host=plugin_host, train_dataset=kwargs.get("train_dataset", rest[1] if len(rest) > 1 else None))
        selection = args.lowmem_selection(plugin_host)
        ctx = LowMemContext(args=args, host=plugin_host, selection=selection, mode=distributed_mode(args), plan=plan)
        self.lowmem_ctx = ctx
        self.lowmem_engine = None
        self._lowmem_wants_engine = any(p.engine for p in ctx.plugins)
        # 1. validate the environment, before anything heavy
        plugin_host.validate(ctx=ctx)
        # 2. prepare the model, stage by stage
        if model is not None:
            model = plugin_host.prepare_model(ctx=ctx, model=model)
        # 3. callbacks
        plugin_callbacks = plugin_host.callbacks(ctx=ctx)
        from hf_lowmem.signals import stop_on_signal_callback

        self._lowmem_stopper = stop_on_signal_callback()
        callbacks = list(kwargs.pop("callbacks", None) or []) + plugin_callbacks + [self._lowmem_stopper]
        super().__init__(model, args, *rest, callbacks=callbacks, **kwargs)
        # plugin callbacks run first, so keys they add to `logs` in on_log reach the report_to integrations
        handler = self.callback_handler
        handler.callbacks = plugin_callbacks + [c for c in handler.callbacks if not any(c is p for p in plugin_callbacks)]
        # 4. an engine decides where weights live, so it is created before the Trainer moves anything
        if self._lowmem_wants_engine:
            engine = plugin_host.create_engine(ctx=ctx, model=self.model, trainer=self)
            if engine is None:
                names = [p.name for p in ctx.plugins if p.engine]
                raise PluginError(f"plugin(s) {names} declare an engine but none was created")
            self.lowmem_engine = engine
            self.accelerator.device_placement = False
            # an engine reduces gradients itself: never wrap the model in DistributedDataParallel
            self.accelerator.prepare_model = functools.partial(self.accelerator.prepare_model, evaluation_mode=True)
        announce(ctx, args)  # one line: the active plugins and what they replaced

    # ---- training: resume checks, signals --------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, trial=None, *rest, **kwargs):
        """The Trainer's ``train``, with the checks of :func:`hf_lowmem.checkpoint.prepare_resume` first
        and SIGTERM/SIGINT turned into a stop at the next step boundary (:mod:`hf_lowmem.signals`)."""
        from hf_lowmem import checkpoint, signals

        resume_from_checkpoint = checkpoint.prepare_resume(self, resume_from_checkpoint, trial)
        stopper = self._lowmem_stopper
        self._lowmem_last_checkpoint = None
        stopper.install()
        try:
            output = super().train(resume_from_checkpoint, trial, *rest, **kwargs)
            if self.lowmem_engine is not None:  # the last step's deferred update, on every rank
                self.lowmem_engine.flush()
        except BaseException:
            signals.run_cleanups()
            raise
        finally:
            stopper.restore()
        if stopper.received:
            stopper.finish(self)
        if self.args.world_size > 1:
            signals.destroy_process_group_at_exit()
        return output

    # ---- checkpoints -----------------------------------------------------------------------------------
    def _get_output_dir(self, trial):
        staging = getattr(self, "_lowmem_staging", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        from hf_lowmem.checkpoint import save_atomically

        save_atomically(self, model, trial, super()._save_checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        load = getattr(self.lowmem_engine, "load_checkpoint", None)
        if load is not None and load(resume_from_checkpoint):
            return  # the engine restored the weights itself (the stream engine's SSD tier links its block files)
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _save_rng_state(self, output_dir):
        from hf_lowmem.checkpoint import save_rng

        super()._save_rng_state(output_dir)
        save_rng(self.lowmem_ctx, output_dir, self.args.process_index, self.args.world_size)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if self.lowmem_engine is not None and checkpoint is not None:
            load = getattr(self.lowmem_engine, "load_checkpoint_optimizer", None)
            if load is not None and load(self, checkpoint):  # on the CPU, memory-mapped (the Trainer: every GPU)
                return None
        return super()._load_optimizer_and_scheduler(checkpoint)

    # ---- placement --------------------------------------------------------------------------------
    def _move_model_to_device(self, model, device):
        if getattr(self, "_lowmem_wants_engine", False):
            return  # the engine streams weights; the model stays in host memory
        return super()._move_model_to_device(model, device)

    # ---- optimizer --------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            if self.lowmem_engine is not None:
                self.optimizer = self.lowmem_engine.optimizer
            else:  # only the selected optimizer plugin is asked (a third-party one cannot replace it)
                opt_model = self.model if model is None else model
                self.optimizer = self.lowmem_ctx.host.create_optimizer(ctx=self.lowmem_ctx, model=opt_model, trainer=self)
        if self.optimizer is None:
            return super().create_optimizer(model)
        return self.optimizer

    # ---- the step -----------------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.lowmem_engine is not None and batches:
            self.lowmem_engine.begin_window(batches, num_items)
        return batches, num_items

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.lowmem_engine is not None:
            return self.lowmem_engine.training_step(inputs, num_items_in_batch)
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not return_outputs:
            loss = self.lowmem_ctx.host.compute_loss(
                ctx=self.lowmem_ctx, model=model, inputs=inputs, num_items_in_batch=num_items_in_batch
            )
            if loss is not None:
                return loss
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _clip_grad_norm(self, model):
        if self.lowmem_engine is not None:
            return self.lowmem_engine.clip_grad_norm(self.args.max_grad_norm)
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        if self.lowmem_engine is not None and grad_norm is None:
            return self.lowmem_engine.clip_grad_norm(float("inf"))
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    # ---- evaluation -----------------------------------------------------------------------------------
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if self.lowmem_engine is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        if not prediction_loss_only and self.compute_metrics is not None:
            raise PluginError(
                "the weight-streaming engine evaluates the loss only; drop compute_metrics or set prediction_loss_only=True"
            )
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.lowmem_engine.eval_loss(inputs)
        return loss.detach(), None, None

    # ---- saving -----------------------------------------------------------------------------------------
    def _save(self, output_dir=None, state_dict=None):
        if self.lowmem_engine is not None:
            self.lowmem_engine.flush()
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model, keep_torch_compile=False).state_dict()
        state_dict = dict(state_dict)
        self.lowmem_ctx.host.before_save(ctx=self.lowmem_ctx, model=self.model, state_dict=state_dict)
        return super()._save(output_dir, state_dict=state_dict)


class LowMemTrainer(LowMemTrainerMixin, Trainer):
    """``transformers.Trainer`` with hf-lowmem plugins; takes the same arguments, plus
    ``plugin_host=`` (a :class:`~hf_lowmem.plugins.PluginHost`, mostly for tests)."""


@lru_cache(maxsize=None)
def lowmem_trainer_class(base: type) -> type:
    """``base`` (a ``Trainer`` subclass such as TRL's ``SFTTrainer``) with hf-lowmem's plugins."""
    if issubclass(base, LowMemTrainerMixin):
        return base
    if base is Trainer:
        return LowMemTrainer
    return type(f"LowMem{base.__name__}", (LowMemTrainerMixin, base), {"__module__": __name__})
