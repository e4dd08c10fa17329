"""The stream engine's host tiers (issue 12): the compact tier (bf16 masters with stochastic rounding, 4-bit
AdamW states rounded stochastically, 8-bit stored gradients) trains, resumes exactly and takes the bytes per parameter it is designed
to; ``stash_every`` groups are lossless; the low-bit pieces are checked one by one."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer

from hf_lowmem import LowMemTrainer
from hf_lowmem.engine import lowbit
from tests.tiny import RandomTokens, logged_losses, tiny_model, train_args

pytest.importorskip("bitsandbytes")  # 8-bit gradients and states go through its kernels
TOL = 1e-5
COMPACT = {"stream": {"tier": "compact"}}


class Counting(torch.utils.data.Dataset):
    """Learnable sequences: each token is the previous one plus one (mod the vocabulary), from a random start."""

    def __init__(self, n: int = 64, seq: int = 16, vocab: int = 32):
        self.n, self.seq, self.vocab = n, seq, vocab

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        start = int(torch.randint(0, self.vocab, (1,), generator=g))
        ids = (start + torch.arange(self.seq)) % self.vocab
        return {"input_ids": ids, "labels": ids.clone()}


MK = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, vocab_size=32)


def _run(tmp_path, options, *, resume=None, model_kw=None, dataset=None, **kw):
    base = dict(max_steps=10, gradient_accumulation_steps=2, learning_rate=1e-2, lowmem_offload=["stream"],
                lowmem_options=options, lr_scheduler_type="constant")
    base.update(kw)
    t = LowMemTrainer(model=tiny_model(**(model_kw or MK)), args=train_args(tmp_path, **base),
                      train_dataset=dataset or Counting())
    t.train(resume_from_checkpoint=resume)
    return t


def test_compact_tier_trains_close_to_the_exact_tier(tmp_path):
    kw = dict(max_steps=16, learning_rate=3e-3)
    c = _run(tmp_path / "c", COMPACT, **kw)
    e = _run(tmp_path / "e", {}, **kw)
    fm = c.lowmem_engine.formats
    assert (fm.master, fm.states, fm.grads) == ("bf16", "4bit", "8bit")
    assert all(p.dtype == torch.bfloat16 for p in c.model.parameters())  # the masters are the model's weights
    lc, le = logged_losses(c), logged_losses(e)
    end_c, end_e = sum(lc[-3:]) / 3, sum(le[-3:]) / 3
    assert end_c < lc[0] - 1.5 and end_e < le[0] - 1.5  # both learn the sequences
    assert abs(end_c - end_e) / end_e < 0.1
    assert lc != le  # the compact formats are really in use


@pytest.mark.parametrize("options", [COMPACT, {"stream": {"tier": "compact", "stash_every": 2}}],
                         ids=["compact", "compact-stash2"])
def test_compact_tier_resumes_with_the_same_losses(tmp_path, options):
    kw = dict(max_steps=6, save_strategy="steps", save_steps=3)
    full = _run(tmp_path, options, **kw)
    again = _run(tmp_path, options, resume=str(tmp_path / "checkpoint-3"), **kw)
    assert logged_losses(again)[3:] == logged_losses(full)[3:]  # bit for bit: stochastic rounding resumed too
    full.lowmem_engine.flush()
    again.lowmem_engine.flush()
    assert all(torch.equal(a, b) for a, b in zip(full.model.parameters(), again.model.parameters()))
    # the checkpoint's weights are bf16 safetensors a plain from_pretrained reads
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "checkpoint-3"))
    assert loaded.dtype == torch.bfloat16


def test_checkpoint_of_the_older_4bit_second_moment_is_refused(tmp_path):
    """4-bit second-moment codes now hold sqrt(v); a checkpoint whose codes held v (it does not record
    ``second_moment``) is refused in one line instead of resuming with garbage states."""
    from hf_lowmem.errors import PluginError

    _run(tmp_path, COMPACT, max_steps=2, save_strategy="steps", save_steps=2)
    path = tmp_path / "checkpoint-2" / "optimizer.pt"
    sd = torch.load(path, weights_only=False)
    assert sd["formats"] == {"master": "bf16", "states": "4bit", "second_moment": "sqrt"}
    del sd["formats"]["second_moment"]
    torch.save(sd, path)
    import json

    from hf_lowmem.checkpoint import MANIFEST_NAME, file_digest

    man_path = tmp_path / "checkpoint-2" / MANIFEST_NAME  # the edit is deliberate: re-seal the file's size and hash
    man = json.loads(man_path.read_text())
    man["files"]["optimizer.pt"].update(size=path.stat().st_size, hash=file_digest(path, algorithm=man["hash"]))
    man_path.write_text(json.dumps(man))
    with pytest.raises(PluginError, match=r"earlier hf-lowmem, whose second-moment codes held v .*train without "
                                          r"resume_from_checkpoint"):
        _run(tmp_path, COMPACT, resume=str(tmp_path / "checkpoint-2"), max_steps=4)


@pytest.mark.parametrize("n", [2, 3])
def test_stash_every_n_is_lossless(tmp_path, n):
    """Recomputing a group of n layers from every n-th stashed input gives the plain Trainer's losses and weights."""
    kw = dict(max_steps=3, gradient_accumulation_steps=2, learning_rate=1e-2, max_grad_norm=1.0)
    mk = dict(num_hidden_layers=4)
    s = LowMemTrainer(model=tiny_model(**mk), args=train_args(tmp_path / "s", lowmem_offload=["stream"],
                      lowmem_options={"stream": {"stash_every": n}}, **kw), train_dataset=RandomTokens())
    s.train()
    assert s.lowmem_engine.stash_every == n and s.lowmem_engine.pool.groups == -(-4 // n)
    p = Trainer(model=tiny_model(**mk), args=train_args(tmp_path / "p", **kw), train_dataset=RandomTokens())
    p.train()
    s.lowmem_engine.flush()
    assert max(abs(a - b) for a, b in zip(logged_losses(s), logged_losses(p))) < TOL
    assert max((x - y).abs().max().item() for x, y in zip(s.model.parameters(), p.model.parameters())) < TOL


def test_bnb_adamw8bit_through_the_engine_equals_bitsandbytes(tmp_path):
    """The engine's 8-bit states run bitsandbytes' own kernel with the plugin's options (min_8bit_size,
    embeddings_32bit): the losses of a plain Trainer stepping bnb's AdamW8bit, and its weights up to the few
    values whose 8-bit state code a last-bit difference in the gradient moved to the neighbouring code."""
    kw = dict(max_steps=4, gradient_accumulation_steps=2, learning_rate=1e-2, max_grad_norm=1.0,
              lowmem_optimizer="bnb-adamw8bit")
    mk = dict(hidden_size=64, intermediate_size=128)
    s = LowMemTrainer(model=tiny_model(**mk), args=train_args(tmp_path / "s", lowmem_offload=["stream"], **kw),
                      train_dataset=RandomTokens())
    s.train()
    p = LowMemTrainer(model=tiny_model(**mk), args=train_args(tmp_path / "p", **kw), train_dataset=RandomTokens())
    p.train()
    s.lowmem_engine.flush()
    emb = s.model.model.embed_tokens.weight
    assert "exp_avg" in s.lowmem_engine.optimizer.state[emb]  # embeddings_32bit (the plugin's default) honoured
    assert max(abs(a - b) for a, b in zip(logged_losses(s), logged_losses(p))) < TOL
    assert max((x - y).abs().max().item() for x, y in zip(s.model.parameters(), p.model.parameters())) < 1e-4


# ---- bytes per parameter, from the actual allocations -----------------------------------------------------------
@pytest.mark.parametrize("options,master,states,grads", [
    ({}, 4.0, 8.0, 4.0),  # exact, fp32 compute on the CPU: gradients in fp32
    ({"states": "8bit"}, 4.0, 2.0 + 8 / 256, 4.0),
    ({"tier": "compact"}, 2.0, 1.0 + 8 / 128, 1.0 + 4 / 256),
], ids=["exact", "exact-8bit", "compact"])
def test_bytes_per_parameter_as_designed(tmp_path, options, master, states, grads):
    mk = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, vocab_size=512, num_attention_heads=4,
              num_key_value_heads=4)
    t = _run(tmp_path, {"stream": options}, model_kw=mk, max_steps=1, gradient_accumulation_steps=1,
             dataset=RandomTokens(vocab=512))
    eng = t.lowmem_engine
    n = sum(p.numel() for p in t.model.parameters())
    small = sum(p.numel() for p in t.model.parameters() if p.numel() < 4096)  # norms: fp32 states in every format
    got = eng.store.nbytes()
    assert got["master_weights"] / n == pytest.approx(master, rel=1e-3)
    assert got["optimizer_states"] / n == pytest.approx(states + small * (8 - states) / n, rel=1e-3)
    stored = sum(eng.pool.grad_at[k][2] for k in eng.pool.grad_at)
    assert stored / n == pytest.approx(grads, rel=0.01)
    # and what the arena really mapped (page-rounded) is what the store and the pool report
    reported = sum(got.values()) + sum(t_.numel() for t_ in eng.pool.slots)
    assert reported <= eng.arena.nbytes <= reported + 4096 * (len(eng.arena.ranges()))


# ---- the low-bit pieces -------------------------------------------------------------------------------------------
def test_stochastic_rounding_is_unbiased_and_nearest_is_not():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, dtype=torch.float32) * 3 + 1  # values between bf16 neighbours, in [1, 4)
    draws = 4000
    xs = x.repeat(draws)
    out = torch.empty_like(xs, dtype=torch.bfloat16)
    lowbit.round_to_bf16_stochastic(xs, out, g)
    lower = (x.view(torch.int32) & -65536).view(torch.float32).double()  # the bf16 neighbour below (truncation)
    ulp = 2.0 ** (torch.floor(torch.log2(x.double())) - 7)  # bf16 spacing at x
    drawn = out.double().view(draws, -1)
    assert ((drawn == lower) | (drawn == lower + ulp)).all()  # only the two neighbours are ever drawn
    # each draw is one of two neighbours ulp apart: the mean's standard error is at most ulp / (2 sqrt(draws))
    mean = drawn.mean(0)
    assert ((mean - x.double()).abs() <= 5 * ulp / (2 * draws**0.5)).all()
    nearest_err = (x.to(torch.bfloat16).double() - x.double()).abs()
    assert (nearest_err > 5 * ulp / (2 * draws**0.5)).any()  # the test can tell a biased rounding apart
    again = torch.empty_like(out)
    lowbit.round_to_bf16_stochastic(xs, again, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # a seeded generator draws the same numbers (what resume relies on)


def test_4bit_quantization_error_is_bounded():
    torch.manual_seed(0)
    x = torch.randn(128 * 64) * torch.logspace(-4, 1, 64).repeat_interleave(128)  # blocks of different scales
    for values, data, bound in ((lowbit.MAP_SIGNED_4BIT, x, 0.1125), (lowbit.MAP_UNSIGNED_4BIT, x**2, 1 / 16)):
        book = lowbit.Codebook.get(values, x.device)
        codes = torch.empty(x.numel() // 2, dtype=torch.uint8)
        scales = torch.empty(x.numel() // 128)
        lowbit.quantize_4bit(data, book, codes, scales)
        assert torch.equal(scales, data.abs().view(-1, 128).amax(1))  # one scale per block: its largest magnitude
        y = lowbit.dequantize_4bit(codes, scales, book)
        err = (y - data).abs().view(-1, 128) / scales.unsqueeze(1)
        assert err.max() <= bound + 1e-6  # half the widest gap of the code book (v: its lowest code, 1/16)
        assert err.max() > bound / 4  # and the bound is not vacuous
    assert (y > 0).all()  # the second moment never rounds to zero


def test_4bit_stochastic_rounding_is_unbiased():
    """The moments' stochastic quantization averages to the value; nearest rounding keeps a small step of an
    exponential average (the case it exists for) from ever moving the stored value."""
    book = lowbit.Codebook.get(lowbit.MAP_UNSIGNED_4BIT, torch.device("cpu"))
    x = torch.full((128,), 0.3)
    x[0] = 1.0  # the block's scale
    draws, gen = 400, torch.Generator().manual_seed(0)
    codes, scales = torch.empty(64, dtype=torch.uint8), torch.empty(1)
    mean = torch.zeros(128)
    for _ in range(draws):
        lowbit.quantize_4bit(x, book, codes, scales, gen)
        mean += lowbit.dequantize_4bit(codes, scales, book) / draws
    assert abs(mean[1:].mean().item() - 0.3) < 2e-3  # 0.3 lies between the codes 0.25 and 0.3125
    lowbit.quantize_4bit(x, book, codes, scales)
    assert lowbit.dequantize_4bit(codes, scales, book)[1].item() == 0.3125  # nearest: biased by +0.0125
    again = torch.empty_like(codes)
    lowbit.quantize_4bit(x, book, codes, scales, torch.Generator().manual_seed(1))
    lowbit.quantize_4bit(x, book, again, scales, torch.Generator().manual_seed(1))
    assert torch.equal(codes, again)  # seeded: a resume draws the same codes


def test_4bit_map_matches_its_definition():
    m = lowbit.MAP_SIGNED_4BIT
    assert len(m) == 16 and m == sorted(m) and 0.0 in m and m[-1] == 1.0
    import bitsandbytes.functional as F

    ref = F.create_dynamic_map(signed=True)  # the same construction at 8 bits is bitsandbytes' map
    assert torch.allclose(torch.tensor(lowbit.dynamic_map(8, 7), dtype=torch.float32), ref, atol=1e-6)


@pytest.mark.gpu
def test_gpu_compact_tier_trains_and_resumes_bit_for_bit(tmp_path):
    """The same on the GPU: bf16 compute, the CUDA generator's state in the checkpoint, bitsandbytes' CUDA kernels
    for the 8-bit gradients, page-locked host buffers."""
    kw = dict(max_steps=6, save_strategy="steps", save_steps=3, use_cpu=False, bf16=True, learning_rate=3e-3)
    opts = {"stream": {"tier": "compact", "stash_every": 2}}
    full = _run(tmp_path, opts, **kw)
    again = _run(tmp_path, opts, resume=str(tmp_path / "checkpoint-3"), **kw)
    lf = logged_losses(full)
    assert lf[-1] < lf[0]
    assert logged_losses(again)[3:] == lf[3:]
