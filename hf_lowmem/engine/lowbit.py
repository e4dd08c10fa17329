"""Low-bit storage for the compact host tier, in plain torch ops (run on whichever device holds the data):

* block-wise 4-bit quantization of AdamW's moments (Li et al. 2023, "Memory Efficient Optimizers with 4-bit
  States"; the same choices as torchao's 4-bit AdamW): blocks of 128 values share one fp32 scale (their
  largest magnitude); the first moment uses a signed dynamic-exponent code book, the second moment an unsigned
  linear one *without zero* (a second moment rounded to zero would turn ``m / (sqrt(v) + eps)`` into a huge
  step), applied to ``sqrt(v)`` rather than ``v`` (:data:`SECOND_MOMENT`): the smallest code is then 1/256 of
  the block's largest ``v`` instead of 1/16: the values of a block down to 1/256 of its largest keep codes of
  their own instead of all rounding up to the floor (which shrinks their steps). On the CPU ablation of the compact
  tier (bench/results/quality_cpu_compact_v4.json) this cut its eval-loss gap from +6.60% to +2.79%, at no
  extra memory. The optimizer rounds both moments stochastically (:func:`quantize_4bit`): with it the gap fell
  to +1.35% there, and to +0.01 to +0.07% of the exact tier on SmolLM2-135M on the GPU (3 seeds). Two codes
  per byte: 0.5 + 4/128 = 0.53 bytes per value and state;
* block-wise 8-bit quantization of stored gradients, through bitsandbytes' kernels (blocks of 256, its signed
  dynamic map): 1 + 4/256 bytes per value;
* stochastic rounding of fp32 to bf16 (unbiased: rounds up with probability equal to the distance to the
  lower neighbour, in units of the bf16 spacing), from a seeded generator whose state is checkpointed.
"""

from __future__ import annotations

import torch

BLOCK_4BIT = 128
BLOCK_8BIT = 256


def dynamic_map(bits: int, exponent_bits: int) -> list[float]:
    """A signed dynamic-exponent code book of ``2**bits`` sorted values in [-1, 1] (Dettmers et al. 2022):
    besides 0 and 1, decade ``e`` (values near ``10**(e - exponent_bits + 1)``) gets ``2**e`` evenly spaced
    magnitudes (the midpoints of a split of [0.1, 1]), each with both signs; small values get fine steps, large
    ones coarse steps. 4 bits with 3 exponent bits is the 4-bit first-moment map; 8 with 7, bitsandbytes'."""
    extra = bits - 1 - exponent_bits
    if extra < 0:
        raise ValueError("exponent_bits must be < bits")
    values = [0.0, 1.0]
    for e in range(exponent_bits):
        n = 2 ** (e + extra)
        edges = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float64)
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (e - exponent_bits + 1)
        values += mids.tolist() + (-mids).tolist()
    if len(values) != 2**bits:
        raise ValueError(f"{bits} bits with {exponent_bits} exponent bits does not fill a code book")
    return sorted(values)


#: first moment (signed) and second moment (unsigned, no zero: 1/16 .. 16/16)
MAP_SIGNED_4BIT = dynamic_map(4, 3)
MAP_UNSIGNED_4BIT = [(i + 1) / 16 for i in range(16)]
#: what the 4-bit second-moment codes hold: ``sqrt(v)``. Checkpoints record it, so that one written when they
#: held ``v`` itself is refused instead of read as garbage.
SECOND_MOMENT = "sqrt"


class Codebook:
    """A 16-entry code book on one device, with the tables its rounding and decoding read: the decision
    boundaries of nearest rounding; for stochastic rounding the inner codes (the search) and each code's gap to
    the next one; for decoding, the two values of each of the 256 bytes (high nibble first)."""

    _cache: dict[tuple, Codebook] = {}

    def __init__(self, values: list[float], device: torch.device):
        self.values = torch.tensor(values, dtype=torch.float32, device=device)
        self.bounds = (self.values[1:] + self.values[:-1]) / 2
        self.inner = self.values[1:-1].contiguous()
        self.gaps = self.values[1:] - self.values[:-1]
        byte = torch.arange(256, device=device)
        self.pairs = torch.stack((self.values[byte >> 4], self.values[byte & 15]), dim=1).contiguous()

    @classmethod
    def get(cls, values: list[float], device: torch.device) -> Codebook:
        key = (tuple(values), str(device))
        if key not in cls._cache:
            cls._cache[key] = cls(values, device)
        return cls._cache[key]


def quantize_4bit(x: torch.Tensor, book: Codebook, codes: torch.Tensor, scales: torch.Tensor,
                  generator: torch.Generator | None = None) -> None:
    """Quantize fp32 ``x`` (length a multiple of 128) into ``codes`` (uint8, half the length: even positions in
    the high nibble) and ``scales`` (fp32, one per block of 128), in place. Without ``generator``, to the
    nearest code; with it, stochastically: a value a fraction ``f`` of the way from one code to the next takes
    the upper one with probability ``f`` (unbiased). The optimizer rounds its moments stochastically: an
    exponential average moves by a small fraction per step (the second moment by 0.1%), which nearest rounding
    drops whenever it is under half a code's gap, so the stored moment would stick."""
    xb = x.view(-1, BLOCK_4BIT)
    torch.amax(xb.abs(), dim=1, out=scales)
    norm = xb / scales.clamp(min=1e-30).unsqueeze(1)
    if generator is None:
        idx = torch.bucketize(norm, book.bounds, out_int32=True)
    else:
        # lo: the code at or below (0 below the lowest code: the unsigned map has no zero, and such a value
        # stays the lowest; the top code's lower neighbour for the largest value)
        lo = torch.bucketize(norm, book.inner, right=True, out_int32=True)
        u = torch.rand(norm.shape, generator=generator, device=norm.device)
        up = u.mul_(book.gaps[lo]) < norm - book.values[lo]
        idx = lo.add_(up)
    idx = idx.view(-1, 2)
    codes.copy_(torch.add(idx[:, 1], idx[:, 0], alpha=16))  # two codes per byte, the even position high


def dequantize_4bit(codes: torch.Tensor, scales: torch.Tensor, book: Codebook) -> torch.Tensor:
    """The fp32 values of ``codes`` / ``scales`` (the inverse of :func:`quantize_4bit`, up to rounding)."""
    pairs = book.pairs[codes.to(torch.int32)].view(-1, BLOCK_4BIT)  # each byte's two values
    return pairs.mul_(scales.unsqueeze(1)).view(-1)


def quantize_8bit(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor) -> None:
    """fp32 ``x`` (length a multiple of 256) into 8-bit codes and per-256 scales (bitsandbytes' kernel)."""
    import bitsandbytes.functional as F

    F.quantize_blockwise(x, code=_code8(x.device), absmax=absmax, out=codes, blocksize=BLOCK_8BIT)


def dequantize_8bit(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as F

    return F.dequantize_blockwise(codes, absmax=absmax, code=_code8(codes.device), blocksize=BLOCK_8BIT)


_CODE8: dict[str, torch.Tensor] = {}


def _code8(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _CODE8:
        import bitsandbytes.functional as F

        _CODE8[key] = F.create_dynamic_map(signed=True).to(device)
    return _CODE8[key]


def round_to_bf16_stochastic(x: torch.Tensor, out: torch.Tensor, generator: torch.Generator) -> None:
    """Write fp32 ``x`` into bf16 ``out`` with stochastic rounding: a uniform 16-bit integer is added to the
    low half of each fp32 bit pattern before it is cut off, so a value a fraction ``f`` of the way from one bf16
    neighbour to the next rounds up with probability ``f`` (the magnitude is rounded; the sign is kept)."""
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    bits = x.contiguous().view(torch.int32) + noise
    out.copy_(bits.bitwise_and_(-65536).view(torch.float32))  # low 16 bits zero: the bf16 cast is exact
