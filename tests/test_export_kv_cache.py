"""The ONNX export carries the KV cache (past_key_values inputs, present outputs, as optimum's
text-generation-with-past exports do): loaded with plain onnxruntime, it generates greedily the same 20
tokens as ``model.generate`` for a batch with a left-padded prompt; a model without a cache gets the
logits-only graph; a cache that is not faithful is caught by the generation check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_lowmem.export import export_model
from tests.test_export import toy
from tests.tiny import tiny_model

pytest.importorskip("onnxruntime")


def ort_greedy(path, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> np.ndarray:
    """Generation with the exported cache, written against onnxruntime alone (not hf_lowmem's helper)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    past_inputs = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    past = {i.name: np.zeros((ids.shape[0], i.shape[1], 0, i.shape[3]), np.float32) for i in past_inputs}
    cur, m = ids.numpy(), mask.numpy()
    pos = np.clip(m.cumsum(-1) - 1, 0, None)
    out_names = [o.name for o in sess.get_outputs()]
    tokens = []
    for _ in range(new_tokens):
        res = dict(zip(out_names, sess.run(None, {"input_ids": cur, "attention_mask": m, "position_ids": pos, **past})))
        nxt = res["logits"][:, -1].argmax(-1)
        tokens.append(nxt)
        past = {n: res[n.replace("past_key_values.", "present.")] for n in past}
        cur, pos = nxt[:, None].astype(np.int64), pos[:, -1:] + 1
        m = np.concatenate([m, np.ones((m.shape[0], 1), np.int64)], axis=1)
    return np.stack(tokens, 1)


def prompts(vocab: int):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, vocab, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("arch,exporter", [("llama", "auto"), ("qwen2", "auto"), ("mistral", "torchscript")])
def test_onnx_with_kv_cache_generates_the_same_20_tokens_as_pytorch(tmp_path, arch, exporter):
    model = tiny_model(arch, seed=11).eval()
    out = tmp_path / "onnx"
    result = export_model(model, out, "onnx", onnx_exporter=exporter)
    assert any("greedy generation of 20 tokens" in n and "equals PyTorch's" in n for n in result.notes), result.notes
    import onnx

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    n = model.config.num_hidden_layers
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    assert [o.name for o in graph.output] == ["logits"] + [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]

    ids, mask = prompts(model.config.vocab_size)
    model.generation_config.eos_token_id = None  # 20 tokens, no early stop
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                             pad_token_id=0)[:, ids.shape[1]:]
    got = ort_greedy(out / "model.onnx", ids, mask, 20)
    assert got.shape == (2, 20)
    assert got.tolist() == ref.tolist()


def test_a_model_without_a_cache_gets_the_logits_only_graph(tmp_path):
    result = export_model(toy("plain"), tmp_path / "o", "onnx")
    import onnx

    graph = onnx.load(str(tmp_path / "o" / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert not any("KV cache" in n for n in result.notes)


def test_an_unfaithful_cache_is_caught_by_the_generation_check(tmp_path, monkeypatch):
    """A graph that ignores its past gives the right logits on a whole sequence (the logits check passes)
    but generates wrong tokens: the generation check refuses it, and the export falls back to the graph
    without a cache, saying so."""
    from hf_lowmem.export import kv_cache

    real = kv_cache.with_past

    def forgetful(model, layout):
        wrapper = real(model, layout)

        class Forgetful(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = wrapper

            def forward(self, input_ids, attention_mask, position_ids, *past):
                empty = tuple(p[:, :, :0] for p in past)  # drop the past, keep the graph's inputs
                return self.inner(input_ids, attention_mask[:, -input_ids.shape[1]:], position_ids, *empty)

        return Forgetful().eval()

    monkeypatch.setattr(kv_cache, "with_past", forgetful)
    result = export_model(tiny_model("llama", seed=11).eval(), tmp_path / "o", "onnx", onnx_exporter="torchscript")
    notes = " ".join(result.notes)
    assert "exported WITHOUT a KV cache" in notes
    assert "generation with the exported KV cache differs from PyTorch's" in notes
