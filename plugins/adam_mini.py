"""Adam-mini (the ``adam-mini`` package, version 1.1.x) as the hf-lowmem plugin ``adam-mini``.

Adam-mini (Zhang et al., 2024, "Use fewer learning rates to gain more") keeps Adam's first moment in full
but replaces the second moment by one mean value per block: per attention head for queries and keys, per
output neuron (row) for values, the attention output, the MLP, the embeddings and the LM head, and one per
tensor for norms. Its state is therefore about half of AdamW's (4 bytes per parameter plus a few floats per
row), and it is meant to run at AdamW's learning rate.

Adam-mini finds the blocks by parameter *names* (``embed``/``lm_head``/``q_proj``/``k_proj``/``v_proj``/
``o_proj``/``mlp``...), which is what Llama, Mistral, Qwen2 and other Hugging Face decoders use. The plugin
builds it from ``model.named_parameters()`` with the model config's hidden size and head counts and fixes
three things on the instance:

* ``head_numel`` is ``head_dim * hidden_size`` (Adam-mini derives it as ``hidden^2 / heads``, wrong for
  models whose ``head_dim`` is not ``hidden / heads``);
* ``world_size`` is the torch.distributed world size (Adam-mini reads ``torch.cuda.device_count()``, so a
  single process on a machine with several GPUs would call ``all_gather`` without a process group);
* each parameter's weight decay follows the Trainer's own parameter groups (``trainer_param_groups``;
  Adam-mini's own rule is a name match on ``norm``/``ln``/``bias``).

Adam-mini takes named parameters, not parameter groups, and makes one group per parameter itself, so the
plugin builds it (``create_optimizer``) instead of handing the Trainer a class.

**Memory** (the planner's model): the first moment of every parameter in the parameters' dtype (4 bytes per
parameter in fp32, half of AdamW's 8) and one second-moment value per row (per head for queries and keys:
fewer); biases get both of Adam's states (Adam-mini's ``bias`` blocks), which the model does not count
(Llama-style models have none). The step works one parameter at a time: the squared gradient and the
update of the largest tensor are its temporaries.

**Quality** (``EVIDENCE``; bench/results/quality_gpu.md, an H200): at AdamW's learning rate, +7.07% eval loss
against AdamW when pretraining a 25.6M Llama from scratch (+3.16% at 0.5x, its best and the smallest multiple
run; +35.47% at 2x, +53.60% at 4x, +61.06% at 8x) and +0.41% fine-tuning SmolLM2-135M (its best; +0.50% at 0.5x,
+0.78% at 2x, +1.85% at 4x, +5.01% at 8x). So it warns in pretraining, where no multiple from 0.5x to 8x came
within 2% of AdamW, and names 0.5x as the closest.

Not supported: FSDP and DeepSpeed (not tested here; Adam-mini documents its own sharded use), the ``stream``
engine (it brings its own optimizer).
"""

from __future__ import annotations

import logging

from hf_lowmem import Plugin, hookimpl
from hf_lowmem.errors import PluginError
from hf_lowmem_plugins.lr_evidence import FINETUNE, PRETRAIN, Evidence, Measured, advice, say_once
from hf_lowmem_plugins.lr_evidence import lr_message as evidence_message

logger = logging.getLogger("hf_lowmem.adam_mini")
NAME = "adam-mini"

#: what bench/quality.py measured with the defaults (bench/results/quality_gpu.md)
EVIDENCE = Evidence((Measured(7.07, 0.5, 3.16, PRETRAIN), Measured(0.41, 1, 0.41, FINETUNE)), "adam-mini")


def lr_message(lr: float) -> tuple[int, str]:
    """(logging level, text) logged once at construction: Adam-mini is meant to run at AdamW's learning rate;
    what was measured there."""
    return evidence_message(NAME, EVIDENCE, lr, "meant to run at AdamW's learning rate, with one second-moment value "
                                                "per head or neuron block instead of one per parameter")


class AdamMiniPlugin(Plugin):
    name, kind, requires, extra, lossless = NAME, "optimizer", ("adam_mini",), "adam-mini", False
    modes = ("single", "ddp")
    help = "Adam-mini: Adam's first moment, one second-moment value per head/neuron block (about half AdamW's state)"
    incompatible = {"stream": "Adam-mini is built when the Trainer asks for its optimizer; the stream engine brings "
                              "its own optimizer. Use Adam-mini without stream"}
    quality_gap, lr_advice = EVIDENCE.gap_pct, advice(EVIDENCE)

    def validate(self, ctx):
        say_once(logger, *lr_message(ctx.args.learning_rate))

    def create_optimizer(self, ctx, model, trainer):
        import torch.distributed as dist
        from adam_mini import Adam_mini

        from hf_lowmem.context import trainer_param_groups

        args = ctx.args
        hidden, heads, kv, head_dim = _heads(model)
        decay = {id(p): g.get("weight_decay", args.weight_decay) for g in trainer_param_groups(trainer, model)
                 for p in g["params"]}
        named = [(n, p) for n, p in model.named_parameters() if id(p) in decay]
        opt = Adam_mini(named_parameters=named, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                        eps=args.adam_epsilon, weight_decay=args.weight_decay, dim=hidden, n_heads=heads,
                        n_kv_heads=kv, verbose=False)
        opt.head_numel = head_dim * hidden
        opt.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        for group in opt.param_groups:
            (p,) = group["params"]
            group["weight_decay"] = decay[id(p)]
        logger.info("%s: %d parameter blocks (hidden %d, %d heads, %d kv heads, head_dim %d)", NAME,
                    len(opt.param_groups), hidden, heads, kv, head_dim)
        return opt

    def memory_model(self, plan, st):
        sh, pb = plan.shape, plan.setup.param_bytes
        # the first moment of every parameter; one second-moment value per row, per head for queries and keys
        # (Adam-mini's name rule), per vocabulary row for the embedding and the LM head
        per_head = ("q_proj", "k_proj", "wq", "wk", "query", "key")
        rows = sh.n_layers * sum(r // sh.head_dim if any(k in n for k in per_head) else r
                                 for n, (r, c) in sh.layer_matrices) + sh.vocab * (1 if sh.tied else 2)
        st.states = pb * sh.params_total + pb * rows
        st.opt_ws = 2.0 * sh.largest_param * pb  # grad * grad and the update, one tensor at a time
        st.opt_bytes_per_param = 6 * pb  # read p, g, m; write p, m; the update temporary
        st.opt_kernel_factor = 3.0  # one parameter at a time, unfused


@hookimpl
def hf_lowmem_register(register):
    register(AdamMiniPlugin())


def _heads(model) -> tuple[int, int, int, int]:
    """(hidden size, attention heads, key/value heads, head dim) from the model's config."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    hidden = getattr(cfg, "hidden_size", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if not hidden or not heads:
        raise PluginError(f"plugin {NAME!r} needs a model config with hidden_size and num_attention_heads "
                          "(Adam-mini groups query and key weights per attention head); choose another optimizer "
                          "for this model")
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return hidden, heads, kv, head_dim
