"""Fixtures for ropeCosSin and applyRotaryPosEmb (src/ops/rope.ts) -> test/fixtures/rope.json.

transformers is not installed, so the HF Llama rotary embedding is written out here:
inv_freq = 1 / base^(arange(0, dim, 2) / dim) in fp32, llama3 scaling as HF
`_compute_llama3_parameters`, linear scaling dividing the positions by the factor, angles
position * inv_freq in fp32, the frequencies concatenated twice, cos/sin in fp32.
applyRotaryPosEmb is x * cos + rotate_half(x) * sin on the first R = cos.shape[-1] channels
(the rest pass through), evaluated in float64 and rounded to the case dtype; its gradient is
taken w.r.t. x only.

Cases with op "cosSin": inputs positionIds; args dim, base, scaling; outputs cos, sin.
Cases with op "apply": inputs x, cos, sin, gout; outputs out; grads x.

Run: /usr/bin/python3 scripts/fixtures_rope.py
"""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_util import enc, make_input, save  # noqa: E402


def compact(t, layout="contiguous"):
    """enc() with float32 values cut to 7 significant digits to keep the JSON small."""
    e = enc(t, layout)
    if e["dtype"] in ("float32", "float64"):
        e["data"] = [float("%.7g" % v) for v in e["data"]]
    return e


def inv_freq_default(dim, base):
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def inv_freq_llama3(inv_freq, factor, low_freq_factor, high_freq_factor, old_context_len):
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are divided by the factor, short ones kept, the band between interpolated
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def cos_sin(position_ids, dim, base=10000.0, scaling=None):
    inv = inv_freq_default(dim, base)
    if scaling and scaling["type"] == "llama3":
        inv = inv_freq_llama3(inv, scaling["factor"], scaling["lowFreqFactor"], scaling["highFreqFactor"],
                              scaling["originalMaxPositionEmbeddings"])
    pos = position_ids.float()
    if scaling and scaling["type"] == "linear":
        pos = pos / scaling["factor"]
    freqs = pos[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(x, cos, sin):
    r = cos.shape[-1]
    if cos.dim() == 3:  # [B, S, R] -> [B, 1, S, R]
        cos, sin = cos[:, None], sin[:, None]
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


def cos_sin_case(name, positions, dim, base=10000.0, scaling=None):
    cos, sin = cos_sin(positions, dim, base, scaling)
    return {
        "name": name,
        "args": {"op": "cosSin", "dim": dim, "base": base, "scaling": scaling},
        "inputs": {"positionIds": enc(positions)},
        "outputs": {"cos": compact(cos), "sin": compact(sin)},
        "grads": {},
    }


def apply_case(gen, name, shape, cos, sin, dtype=torch.float32, layout="contiguous"):
    x = make_input(shape, dtype, layout, gen)
    gout = make_input(shape, dtype, gen=gen, requires_grad=False)
    x64 = x.detach().double().requires_grad_(True)
    out = apply_rope(x64, cos.double(), sin.double())
    out.backward(gout.double())
    return {
        "name": name,
        "args": {"op": "apply"},
        "inputs": {"x": compact(x, layout), "cos": compact(cos), "sin": compact(sin), "gout": compact(gout)},
        "outputs": {"out": compact(out.to(dtype))},
        "grads": {"x": compact(x64.grad.to(dtype))},
    }


def main():
    gen = torch.Generator().manual_seed(7301)
    llama3 = {"type": "llama3", "factor": 8.0, "lowFreqFactor": 1.0, "highFreqFactor": 4.0,
              "originalMaxPositionEmbeddings": 64}
    llama3_real = {"type": "llama3", "factor": 8.0, "lowFreqFactor": 1.0, "highFreqFactor": 4.0,
                   "originalMaxPositionEmbeddings": 8192}
    cases = [
        cos_sin_case("default_s12_d16", torch.arange(12), 16),
        cos_sin_case("batch_positions_d8", torch.randint(0, 100, (2, 5), generator=gen), 8, 500000.0),
        cos_sin_case("linear_x4_d16", torch.tensor([0, 1, 2, 3, 10, 17, 64, 255]), 16, 10000.0,
                     {"type": "linear", "factor": 4.0}),
        cos_sin_case("llama3_small_ctx_d32", torch.tensor([0, 1, 7, 100, 1000, 4000]), 32, 10000.0, llama3),
        cos_sin_case("llama3_8b_d128", torch.tensor([[0, 5, 8191, 70000]]), 128, 500000.0, llama3_real),
    ]
    cos5, sin5 = cos_sin(torch.arange(5), 8)
    cos_b, sin_b = cos_sin(torch.tensor([[3, 4, 5, 6], [0, 1, 2, 3]]), 8)
    cos7, sin7 = cos_sin(torch.arange(7), 16)
    cos_p, sin_p = cos_sin(torch.arange(6), 8)
    cos_q, sin_q = cos_sin(torch.arange(6) + 11, 4)
    cos1, sin1 = cos_sin(torch.tensor([9]), 8)
    cases += [
        apply_case(gen, "apply_f32", [2, 3, 5, 8], cos5, sin5),
        apply_case(gen, "apply_batch_tables_f32", [2, 2, 4, 8], cos_b, sin_b),
        apply_case(gen, "apply_partial_r8_d12_f32", [1, 2, 6, 12], cos_p, sin_p),
        apply_case(gen, "apply_partial_r4_d10_f32", [2, 1, 6, 10], cos_q, sin_q),
        apply_case(gen, "apply_s1_f32", [1, 3, 1, 8], cos1, sin1),
        apply_case(gen, "apply_transposed_f32", [1, 2, 5, 8], cos5, sin5, layout="transposed"),
        apply_case(gen, "apply_bf16", [1, 2, 7, 16], cos7, sin7, dtype=torch.bfloat16),
        apply_case(gen, "apply_partial_bf16", [1, 2, 6, 12], cos_p, sin_p, dtype=torch.bfloat16),
    ]
    save("rope", cases, os.path.basename(__file__))


if __name__ == "__main__":
    main()
