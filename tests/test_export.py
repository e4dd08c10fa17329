"""Export for inference on tiny Llama, Mistral and Qwen2 models: every format, loaded back the way a user
would load it and run on a shape the exporter never saw; the LowMemTrainer round trip (plain and with the
int8-weights plugin) through save_model, export and AutoModelForCausalLM.from_pretrained; the module
protocol for plugin-changed live models; and failures that must be clear and leave no partial output."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from hf_lowmem.export import ExportError, export_model
from tests.tiny import RandomTokens, tiny_model, train_args

ARCHS = ("llama", "mistral", "qwen2")
FORMATS = ("hf", "onnx", "torchscript", "exported-program")


def fresh_inputs(vocab: int, batch: int = 2, seq: int = 5, seed: int = 99):
    """A shape that differs from the export example (2x11) and the validation inputs (1x7, 3x19)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in the second row
    return ids, mask


def torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()


def load_and_run(fmt: str, out, ids, mask):
    """Load the artifact with the plain library calls of each format (not through hf_lowmem)."""
    if fmt == "hf":
        return torch_logits(AutoModelForCausalLM.from_pretrained(out), ids, mask)
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        for i in sess.get_inputs()[2:]:  # the KV cache: positions 0..n-1 and an empty past (tests/test_export_kv_cache.py)
            feed[i.name] = (torch.arange(ids.shape[1]).expand_as(ids).numpy() if i.name == "position_ids" else
                            torch.zeros(ids.shape[0], i.shape[1], 0, i.shape[3]).numpy())
        return torch.from_numpy(sess.run(["logits"], feed)[0])
    with torch.no_grad():
        if fmt == "torchscript":
            return torch.jit.load(str(out / "model.pt"))(ids, mask).float()
        return torch.export.load(str(out / "model.pt2")).module()(ids, mask).float()


def masked_max_diff(a, b, mask):
    keep = mask.bool()
    return (a[keep] - b[keep]).abs().max().item()


def no_leftovers(parent) -> bool:
    return not [p for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch, seed=3).eval() for arch in ARCHS}


# ---- every format on every architecture ------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ARCHS)
def test_export_validates_and_loads_back(tmp_path, monkeypatch, models, arch, fmt):
    model = models[arch]
    out = tmp_path / f"{arch}-{fmt}"
    external = arch == "llama" and fmt == "onnx"
    if external:  # the path a model over protobuf's 2 GB limit takes: weights in model.onnx.data
        from hf_lowmem.export import formats

        monkeypatch.setattr(formats, "ONNX_EXTERNAL_DATA_BYTES", 0)
    result = export_model(model, out, fmt)
    if external:
        assert (out / "model.onnx.data").is_file() and "external data" in " ".join(result.notes)
        assert result.size_bytes == (out / "model.onnx").stat().st_size + (out / "model.onnx.data").stat().st_size
    # the validation ran on two different shapes and stayed within its tolerance
    assert len({(c.batch, c.seq) for c in result.checks}) == 2
    assert result.max_abs_diff is not None and result.max_abs_diff <= result.tolerance
    assert result.max_abs_diff < 1e-4  # float32 end to end on a tiny model
    assert (out / result.artifact).is_file() and result.size_bytes > 0
    report = json.loads((out / "hf_lowmem_export.json").read_text())
    assert report["format"] == fmt and report["max_abs_diff"] == result.max_abs_diff
    assert (out / "config.json").is_file()
    if fmt == "onnx":  # batch and sequence are symbolic in the graph, logits too
        import onnx

        graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
        for value in (*graph.input, *graph.output):
            dims = value.type.tensor_type.shape.dim
            seq = 2 if value.name.startswith(("past_key_values.", "present.")) else 1  # (batch, kv heads, seq, dim)
            assert dims[0].dim_param and dims[seq].dim_param and not dims[0].dim_value, (value.name, dims)
    # independently: load it as a user would and run an unseen shape
    ids, mask = fresh_inputs(model.config.vocab_size)
    got = load_and_run(fmt, out, ids, mask)
    ref = torch_logits(model, ids, mask)
    assert got.shape == ref.shape == (2, 5, model.config.vocab_size)
    assert masked_max_diff(got, ref, mask) < 1e-4
    assert no_leftovers(tmp_path)


def test_hf_export_keeps_the_original_precision_and_tied_weights(tmp_path):
    from tests.tiny import tiny_config

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", tie_word_embeddings=True), dtype=torch.bfloat16).eval()
    out = tmp_path / "bf16"
    result = export_model(model, out, "hf")
    assert result.dtype == "bfloat16" and result.max_abs_diff == 0.0  # bit for bit
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert {f.get_tensor(k).dtype for k in keys} == {torch.bfloat16}
    assert keys == set(model.state_dict()) - {"lm_head.weight"}  # tied: stored once
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.bfloat16
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    # the graph formats keep it too, except ONNX (float32 by default: onnxruntime's CPU lacks bfloat16)
    ts = export_model(out, tmp_path / "ts", "torchscript")
    assert ts.dtype == "bfloat16" and ts.max_abs_diff <= ts.tolerance


def test_onnx_falls_back_to_the_torchscript_exporter_and_says_so(tmp_path, models):
    result = export_model(models["llama"], tmp_path / "o", "onnx", onnx_exporter="torchscript")
    assert "dynamo=False" in result.exporter and result.max_abs_diff < 1e-4


def test_cli_exports_a_folder_and_prints_the_difference(tmp_path, models, capsys):
    from hf_lowmem.cli import main

    src = tmp_path / "src"
    models["qwen2"].save_pretrained(src)
    assert main(["export", str(src), "--format", "torchscript", "--output", str(tmp_path / "ts")]) == 0
    printed = capsys.readouterr().out
    assert "largest logit difference" in printed and "model.pt" in printed
    assert (tmp_path / "ts" / "model.pt").is_file()
    # exporting again onto a non-empty folder is refused unless --overwrite
    assert main(["export", str(src), "--format", "hf", "--output", str(tmp_path / "ts")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(src), "--format", "hf", "--output", str(tmp_path / "ts"), "--overwrite"]) == 0
    assert (tmp_path / "ts" / "model.safetensors").is_file() and not (tmp_path / "ts" / "model.pt").exists()
    assert no_leftovers(tmp_path)


# ---- LowMemTrainer round trips -----------------------------------------------------------------------------------
def _train(tmp_path, **lowmem):
    from hf_lowmem import LowMemTrainer

    trainer = LowMemTrainer(model=tiny_model("llama", seed=0), args=train_args(tmp_path / "run", **lowmem),
                            train_dataset=RandomTokens(n=16, seq=16))
    trainer.train()
    return trainer


def test_trainer_save_export_from_pretrained_round_trip(tmp_path):
    trainer = _train(tmp_path)
    before = tiny_model("llama", seed=0)
    trainer.save_model(str(tmp_path / "saved"))
    result = export_model(tmp_path / "saved", tmp_path / "hf", "hf")
    assert result.max_abs_diff == 0.0
    ids, mask = fresh_inputs(128)
    exported = torch_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), ids, mask)
    trained = torch_logits(trainer.model.eval(), ids, mask)
    assert masked_max_diff(exported, trained, mask) < 1e-5
    assert masked_max_diff(exported, torch_logits(before, ids, mask), mask) > 1e-3  # the trained weights, not the initial ones
    # and straight from the trainer object
    result = export_model(trainer, tmp_path / "hf2", "torchscript")
    assert result.max_abs_diff < 1e-4


def test_int8_weights_training_exports_the_original_precision(tmp_path):
    """int8-weights stores Linear weights as int8 + scales; the export must hold standard float weights
    that reproduce the trained (quantized) model's logits, through the saved folder and from the trainer."""
    trainer = _train(tmp_path, lowmem_quantization="int8-weights")
    live = trainer.model.eval()
    assert any(k.endswith("weight_int8") for k in live.state_dict())
    ids, mask = fresh_inputs(128)
    trained = torch_logits(live, ids, mask)

    trainer.save_model(str(tmp_path / "saved"))
    export_model(tmp_path / "saved", tmp_path / "from-folder", "hf")
    res = export_model(trainer, tmp_path / "from-trainer", "hf")
    assert res.reference.startswith("the live model") and res.max_abs_diff <= 1e-5
    for out in ("from-folder", "from-trainer"):
        with safe_open(str(tmp_path / out / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
        assert keys == set(tiny_model("llama").state_dict()), keys ^ set(tiny_model("llama").state_dict())
        config = json.loads((tmp_path / out / "config.json").read_text())
        assert "quantization_config" not in config and not any("lowmem" in k for k in config)
        exported = torch_logits(AutoModelForCausalLM.from_pretrained(tmp_path / out), ids, mask)
        assert masked_max_diff(exported, trained, mask) < 1e-5

    # the bare model object without its run context: the placeholder weights are refused, not exported
    with pytest.raises(ExportError, match=r"self_attn\.q_proj\.weight.*weight_int8.*lowmem_ctx"):
        export_model(live, tmp_path / "bare", "hf")
    assert not (tmp_path / "bare").exists() and no_leftovers(tmp_path)
    # with the context, the plugin's save hook restores them
    res = export_model(live, tmp_path / "bare", "torchscript", ctx=trainer.lowmem_ctx)
    assert res.max_abs_diff < 1e-4


# ---- the module protocol on a live model -----------------------------------------------------------------------
class FakeInt8Linear(torch.nn.Module):
    """A Linear stored as int8 + per-row scale, with a plugin-only counter buffer, that hands back its
    standard state through ``hf_lowmem_dequantized_state``."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("q", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))
        self._dtype = w.dtype

    def dequantized(self):
        return (self.q.float() * self.scale).to(self._dtype)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.dequantized())

    def hf_lowmem_dequantized_state(self):
        return {"weight": self.dequantized()}


def test_live_model_with_protocol_modules_and_plugin_only_keys(tmp_path):
    model = tiny_model("mistral", seed=5).eval()
    for layer in model.model.layers:
        layer.mlp.up_proj = FakeInt8Linear(layer.mlp.up_proj)
    model.model.norm.register_buffer("hf_lowmem_calibration", torch.ones(4))  # a plugin-only key
    result = export_model(model, tmp_path / "hf", "hf")
    assert result.dropped_keys == ["model.norm.hf_lowmem_calibration"]
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(tiny_model("mistral").state_dict())
    ids, mask = fresh_inputs(128)
    got = torch_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), ids, mask)
    assert masked_max_diff(got, torch_logits(model, ids, mask), mask) < 1e-5
    assert result.max_abs_diff < 1e-5


def test_a_weight_with_the_wrong_shape_is_named(tmp_path):
    model = tiny_model("llama").eval()
    packed = model.model.layers[0].mlp.down_proj
    packed.weight = torch.nn.Parameter(packed.weight.detach().reshape(-1)[: packed.weight.numel() // 2].clone())
    with pytest.raises(ExportError, match=r"model\.layers\.0\.mlp\.down_proj\.weight.*shape.*hf_lowmem_dequantized_state"):
        export_model(model, tmp_path / "x", "hf")
    assert not (tmp_path / "x").exists()


# ---- architectures the exporters cannot handle -------------------------------------------------------------------
class ToyConfig(PretrainedConfig):
    model_type = "hf-lowmem-toy"

    def __init__(self, vocab_size=32, hidden_size=8, trick="zeta", **kw):
        self.vocab_size, self.hidden_size, self.trick = vocab_size, hidden_size, trick
        super().__init__(**kw)


class ToyForCausalLM(PreTrainedModel):
    """A causal LM whose forward uses something an exporter cannot handle (``config.trick``)."""

    config_class = ToyConfig
    base_model_prefix = "toy"

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None, use_cache=None, return_dict=None, **kw):
        from transformers.modeling_outputs import CausalLMOutput

        h = self.embed(input_ids)
        if self.config.trick == "zeta":  # no ONNX operator for it, in either exporter
            h = torch.special.zeta(h.abs() + 2.0, torch.tensor(2.0))
        elif self.config.trick == "branch":  # data-dependent control flow: torch.export refuses it
            if h.sum() > 0:
                h = -h
        elif self.config.trick == "frozen-shape":  # a Python int from a shape: torch.jit.trace bakes it in
            h = h * torch.arange(int(input_ids.shape[1]), dtype=h.dtype).view(1, -1, 1)
        return CausalLMOutput(logits=self.head(h))


def toy(trick: str):
    torch.manual_seed(0)
    return ToyForCausalLM(ToyConfig(trick=trick)).eval()


@pytest.mark.parametrize("trick,fmt,match", [
    ("zeta", "onnx", r"cannot be exported to ONNX: dynamo exporter: .*; torchscript exporter: .*special_zeta"),
    ("branch", "exported-program", r"torch.export cannot export ToyForCausalLM"),
    ("frozen-shape", "torchscript", r"fails on an input of shape|differ from PyTorch"),
])
def test_an_architecture_the_exporter_cannot_handle_fails_clearly_and_leaves_nothing(tmp_path, trick, fmt, match):
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=match):
        export_model(toy(trick), out, fmt)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder either


def test_a_failed_overwrite_keeps_the_previous_export(tmp_path, models):
    out = tmp_path / "out"
    export_model(models["llama"], out, "torchscript")
    with pytest.raises(ExportError):
        export_model(toy("branch"), out, "exported-program", overwrite=True)
    assert (out / "model.pt").is_file() and no_leftovers(tmp_path)


# ---- bad inputs -----------------------------------------------------------------------------------------------------
def test_bad_inputs_get_clear_errors(tmp_path, models):
    src = tmp_path / "src"
    models["llama"].save_pretrained(src)
    with pytest.raises(ExportError, match="unknown export format 'gguf'; choose one of: hf, onnx"):
        export_model(src, tmp_path / "o", "gguf")
    with pytest.raises(ExportError, match="no model folder at"):
        export_model(tmp_path / "missing", tmp_path / "o", "hf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="has no config.json"):
        export_model(tmp_path / "empty", tmp_path / "o", "hf")
    with pytest.raises(ExportError, match="is the source folder"):
        export_model(src, src, "hf", overwrite=True)
    with pytest.raises(ExportError, match="contains the source folder"):
        export_model(src, tmp_path, "hf", overwrite=True)
    assert (src / "model.safetensors").is_file()
    with pytest.raises(ExportError, match="LlamaModel has no language-model head"):
        export_model(models["llama"].model, tmp_path / "o", "hf")
    with pytest.raises(ExportError, match="cannot export a dict: pass a model folder path"):
        export_model({"not": "a model"}, tmp_path / "o", "hf")
    with pytest.raises(ExportError, match="unknown dtype 'int4'"):
        export_model(src, tmp_path / "o", "hf", dtype="int4")
    from transformers import T5Config

    t5 = tmp_path / "t5"
    T5Config(d_model=8, num_layers=1, vocab_size=16).save_pretrained(t5)
    (t5 / "model.safetensors").write_bytes(b"")
    with pytest.raises(ExportError, match="AutoModelForCausalLM cannot load: export handles causal language models"):
        export_model(t5, tmp_path / "o", "onnx")
    assert not (tmp_path / "o").exists() and no_leftovers(tmp_path)
