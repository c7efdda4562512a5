"""PyTorch reference cases for RMSNorm and LayerNorm.

Writes test/fixtures/norm.json (see fixture_util.py for the format). torch 1.13 has no
rms_norm, so the reference is the formula x * rsqrt(mean(x^2) + eps) * weight. bfloat16
references are computed in float32 from the bfloat16 values and rounded once, as the fused
kernels do; float32 references in float64 (exact math, rounded once), so that the comparison
measures the kernels' rounding rather than the sum of theirs and torch's. Each case stores the random upstream gradient as the input "gout" and the gradients
of x, weight and bias.
Run: /usr/bin/python3 scripts/fixtures_norm.py
"""
import torch
import torch.nn.functional as F

from fixture_util import compact, enc, make_input, save

gen = torch.Generator().manual_seed(20240612)
cases = []


def rms_norm(x, shape, weight, eps):
    dims = tuple(range(-len(shape), 0))
    y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    return y * weight if weight is not None else y


def param(shape, dtype, offset):
    return (torch.randn(*shape, generator=gen) * 0.5 + offset).to(dtype).requires_grad_(True)


def norm_case(name, op, shape, nshape, dtype=torch.float32, layout="contiguous", weight=True, bias=True,
              eps=None, scale=1.0, shift=0.0):
    x = make_input(shape, dtype, layout, gen, scale=scale)
    if shift:
        x = (x.detach().float() + shift).to(dtype)
        if layout == "transposed":
            x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        x.requires_grad_(True)
    w = param(nshape, dtype, 1.0) if weight else None
    b = param(nshape, dtype, 0.0) if bias and op == "layerNorm" else None
    wide = torch.float32 if dtype == torch.bfloat16 else torch.float64
    up = lambda t: t.to(wide) if t is not None else None  # noqa: E731
    if op == "rmsNorm":
        eps = 1e-6 if eps is None else eps
        y = rms_norm(up(x), nshape, up(w), eps).to(dtype)
    else:
        eps = 1e-5 if eps is None else eps
        y = F.layer_norm(up(x), nshape, up(w), up(b), eps).to(dtype)
    gout = torch.randn(tuple(y.shape), generator=gen).to(dtype)
    y.backward(gout)
    inputs = {"x": enc(x, layout), "gout": enc(gout)}
    grads = {"x": enc(x.grad)}
    if w is not None:
        inputs["weight"] = enc(w)
        grads["weight"] = enc(w.grad)
    if b is not None:
        inputs["bias"] = enc(b)
        grads["bias"] = enc(b.grad)
    cases.append({
        "name": name,
        "args": {"op": op, "normalizedShape": list(nshape), "eps": eps},
        "inputs": inputs,
        "outputs": {"y": enc(y)},
        "grads": grads,
    })


rms = "rmsNorm"
norm_case("rms f32 [7,13] weight", rms, [7, 13], [13])
norm_case("rms f32 [3,5,33] no weight", rms, [3, 5, 33], [33], weight=False)
norm_case("rms f32 [2,3,4,6] shape [4,6] weight eps 1e-5", rms, [2, 3, 4, 6], [4, 6], eps=1e-5)
norm_case("rms f32 [6,9] transposed weight", rms, [6, 9], [9], layout="transposed")
norm_case("rms f32 [5,1] rows of length 1", rms, [5, 1], [1])
norm_case("rms f32 [17] 1-d", rms, [17], [17])
norm_case("rms f32 [4,130] small values", rms, [4, 130], [130], scale=1e-2)
norm_case("rms bf16 [7,16] weight", rms, [7, 16], [16], torch.bfloat16)
norm_case("rms bf16 [3,5,33] no weight", rms, [3, 5, 33], [33], torch.bfloat16, weight=False)
norm_case("rms bf16 [6,9] transposed weight", rms, [6, 9], [9], torch.bfloat16, layout="transposed")

ln = "layerNorm"
norm_case("ln f32 [7,13] weight bias", ln, [7, 13], [13])
norm_case("ln f32 [7,13] weight only", ln, [7, 13], [13], bias=False)
norm_case("ln f32 [3,5,33] no affine", ln, [3, 5, 33], [33], weight=False, bias=False)
norm_case("ln f32 [2,3,4,6] shape [4,6]", ln, [2, 3, 4, 6], [4, 6])
norm_case("ln f32 [2,3,4,6] shape [3,4,6] eps 1e-3", ln, [2, 3, 4, 6], [3, 4, 6], eps=1e-3)
norm_case("ln f32 [6,9] transposed", ln, [6, 9], [9], layout="transposed")
norm_case("ln f32 [5,1] rows of length 1", ln, [5, 1], [1])
norm_case("ln f32 [4,100] offset mean", ln, [4, 100], [100], shift=20.0)
norm_case("ln bf16 [7,16] weight bias", ln, [7, 16], [16], torch.bfloat16)
norm_case("ln bf16 [3,5,33] no affine", ln, [3, 5, 33], [33], torch.bfloat16, weight=False, bias=False)
norm_case("ln bf16 [6,9] transposed", ln, [6, 9], [9], torch.bfloat16, layout="transposed")

compact(cases)
save("norm", cases, "fixtures_norm.py")
