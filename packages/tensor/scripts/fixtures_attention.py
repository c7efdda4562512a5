"""Fixtures for scaledDotProductAttention (src/ops/attention.ts) -> test/fixtures/attention.json.

torch 1.13 has no F.scaled_dot_product_attention, so the reference is written out:
softmax(q k^T * scale + mask) v with K/V repeated per query-head group (GQA), the causal mask as
tril(ones(Sq, Sk)) (top-left aligned, like torch 2.x), bool masks with True = attend, and packed
variable-length rows as a block-diagonal mask. Rows with nothing to attend to give 0 (the op's
contract; torch's math path would give NaN). The math runs in float64; outputs and gradients are
rounded to the case dtype (bfloat16 cases thus compare the op's fp32 math with exact math).

Each case: inputs q, k, v, gout (the upstream gradient), optional mask and cuSeqlens; outputs
out; grads q, k, v. args: isCausal, scale (null = default), maskKind.
JSON has no infinities: -inf entries of an additive mask are written as null.

Run: /usr/bin/python3 scripts/fixtures_attention.py
"""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_util import enc, make_input, save  # noqa: E402


def compact(t, layout="contiguous"):
    """enc() with float32 values cut to 7 significant digits (far below the test tolerances) to
    keep the JSON small; -inf becomes null."""
    e = enc(t, layout)
    if e["dtype"] in ("float32", "float64"):
        e["data"] = [None if v == -math.inf else float("%.7g" % v) for v in e["data"]]
    return e


def reference(q, k, v, mask=None, causal=False, scale=None, cu=None):
    """Attention in the dtype of q (float64 here), written without fused ops."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    s = (q @ k.transpose(-1, -2)) * scale
    allow = torch.ones(Sq, Sk, dtype=torch.bool)
    if causal:
        allow = torch.tril(allow)
    if cu is not None:
        seg = torch.zeros(Sq, dtype=torch.int64)
        for i in range(len(cu) - 1):
            seg[cu[i]:cu[i + 1]] = i
        allow = allow & (seg[:, None] == seg[None, :])
    allow = allow.expand(B, Hq, Sq, Sk)
    if mask is not None:
        if mask.dtype == torch.bool:
            allow = allow & mask
        else:
            s = s + mask.to(s.dtype)
    s = s.masked_fill(~allow, -math.inf)
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    p = torch.where(l > 0, p / l.clamp_min(1e-300), torch.zeros_like(p))
    return p @ v


def make_case(gen, name, B, Hq, Hkv, Sq, Sk, D, Dv=None, dtype=torch.float32, causal=False, scale=None,
              mask_kind=None, cu=None, layout="contiguous"):
    Dv = Dv or D
    q = make_input([B, Hq, Sq, D], dtype, layout, gen)
    k = make_input([B, Hkv, Sk, D], dtype, layout, gen)
    v = make_input([B, Hkv, Sk, Dv], dtype, layout, gen)
    gout = make_input([B, Hq, Sq, Dv], dtype, gen=gen, requires_grad=False)
    mask = None
    if mask_kind == "bool":
        # [B, 1, Sq, Sk]: shared by the heads; one row of batch 0 is fully masked
        mask = torch.rand(B, 1, Sq, Sk, generator=gen) > 0.3
        mask[0, 0, min(2, Sq - 1), :] = False
    elif mask_kind == "additive":
        # [Sq, Sk]: shared by batch and heads; some -inf, and the last row all -inf
        mask = torch.randn(Sq, Sk, generator=gen)
        mask = mask.masked_fill(torch.rand(Sq, Sk, generator=gen) < 0.25, -math.inf)
        mask[Sq - 1, :] = -math.inf
    elif mask_kind == "additive_heads":
        # [1, Hq, Sq, Sk]: a different mask per head, finite values only
        mask = torch.randn(1, Hq, Sq, Sk, generator=gen) * 2
    x64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    out = reference(*x64, mask=mask, causal=causal, scale=scale, cu=cu)
    out.backward(gout.double())
    inputs = {"q": compact(q, layout), "k": compact(k, layout), "v": compact(v, layout), "gout": compact(gout)}
    if mask is not None:
        inputs["mask"] = compact(mask)
    if cu is not None:
        inputs["cuSeqlens"] = enc(torch.tensor(cu, dtype=torch.int32))
    return {
        "name": name,
        "args": {"isCausal": causal, "scale": scale, "maskKind": mask_kind},
        "inputs": inputs,
        "outputs": {"out": compact(out.to(dtype))},
        "grads": {n: compact(t.grad.to(dtype)) for n, t in zip("qkv", x64)},
    }


def main():
    gen = torch.Generator().manual_seed(20240611)
    f32, bf16 = torch.float32, torch.bfloat16
    specs = [
        # name, B, Hq, Hkv, Sq, Sk, D, options
        ("basic_f32", 2, 2, 2, 7, 7, 8, {}),
        ("causal_f32", 1, 2, 2, 7, 7, 8, {"causal": True}),
        ("gqa_causal_f32", 1, 4, 2, 7, 7, 16, {"causal": True}),
        ("gqa_s33_f32", 1, 2, 1, 33, 33, 8, {}),
        ("causal_s33_f32", 1, 2, 2, 33, 33, 8, {"causal": True}),
        ("s1_f32", 2, 2, 2, 1, 1, 8, {}),
        ("s1_causal_gqa_f32", 1, 4, 2, 1, 1, 8, {"causal": True}),
        ("cross_sq5_sk9_causal_f32", 1, 2, 1, 5, 9, 8, {"causal": True}),
        ("cross_sq9_sk5_causal_f32", 1, 2, 2, 9, 5, 8, {"causal": True}),
        ("cross_sq5_sk9_f32", 2, 2, 1, 5, 9, 8, {}),
        ("bool_mask_f32", 2, 2, 2, 6, 7, 8, {"mask_kind": "bool"}),
        ("bool_mask_causal_f32", 2, 4, 2, 6, 6, 8, {"mask_kind": "bool", "causal": True}),
        ("additive_mask_gqa_f32", 1, 4, 2, 6, 7, 8, {"mask_kind": "additive"}),
        ("additive_head_mask_f32", 1, 2, 2, 5, 5, 8, {"mask_kind": "additive_heads"}),
        ("varlen_f32", 1, 2, 2, 15, 15, 8, {"cu": [0, 3, 10, 15]}),
        ("varlen_causal_f32", 1, 4, 2, 15, 15, 8, {"cu": [0, 3, 10, 15], "causal": True}),
        ("scale_dv16_f32", 1, 2, 2, 7, 7, 8, {"scale": 0.3, "Dv": 16}),
        ("transposed_layout_causal_f32", 1, 2, 1, 7, 7, 8, {"causal": True, "layout": "transposed"}),
        ("gqa_causal_bf16", 1, 4, 2, 7, 7, 8, {"dtype": bf16, "causal": True}),
        ("s33_bf16", 1, 2, 1, 33, 33, 8, {"dtype": bf16}),
        ("varlen_causal_bf16", 1, 2, 1, 15, 15, 8, {"dtype": bf16, "cu": [0, 3, 10, 15], "causal": True}),
        ("bool_mask_bf16", 2, 2, 2, 6, 7, 8, {"dtype": bf16, "mask_kind": "bool"}),
    ]
    cases = []
    for name, B, Hq, Hkv, Sq, Sk, D, opt in specs:
        opt = dict(opt)
        dtype = opt.pop("dtype", f32)
        cases.append(make_case(gen, name, B, Hq, Hkv, Sq, Sk, D, dtype=dtype, **opt))
    save("attention", cases, os.path.basename(__file__))


if __name__ == "__main__":
    main()
