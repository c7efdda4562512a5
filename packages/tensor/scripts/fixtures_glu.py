"""PyTorch reference cases for gatedActivation (src/ops/glu.ts) -> test/fixtures/glu.json.

out = act(gate) * up with gate, up = x.chunk(2, -1) (gate first), act = F.silu (swiglu),
F.gelu (geglu) or F.gelu(approximate="tanh") (geglu-tanh). bfloat16 / float16 references are
computed in float32 from the 16-bit values and rounded once, as the fused kernel does; float32
and float64 references in float64. Each case stores the random upstream gradient as the input
"gout" and the gradient of x (both halves: [dgate, dup]).

Cases: inputs x, gout; args activation; outputs out; grads x.
Run: /usr/bin/python3 scripts/fixtures_glu.py
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_util import compact, enc, make_input, save  # noqa: E402

ACTS = {
    "swiglu": F.silu,
    "geglu": F.gelu,
    "geglu-tanh": lambda t: F.gelu(t, approximate="tanh"),
}
NAMES = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}


def glu_case(gen, cases, activation, shape, dtype=torch.float32, layout="contiguous", scale=2.0):
    x = make_input(shape, dtype, layout, gen, scale=scale)
    wide = torch.float32 if dtype in (torch.bfloat16, torch.float16) else torch.float64
    xw = x.detach().to(wide).requires_grad_(True)
    gate, up = xw.chunk(2, -1)
    out = ACTS[activation](gate) * up
    gout = (torch.randn(*out.shape, generator=gen)).to(dtype)
    out.backward(gout.to(wide))
    name = f"{activation} {NAMES[dtype]} {list(shape)}{' transposed' if layout == 'transposed' else ''}"
    cases.append({
        "name": name,
        "args": {"activation": activation},
        "inputs": {"x": enc(x, layout), "gout": enc(gout)},
        "outputs": {"out": enc(out.to(dtype))},
        "grads": {"x": enc(xw.grad.to(dtype))},
    })


def main():
    gen = torch.Generator().manual_seed(20250517)
    cases = []
    for act in ACTS:
        glu_case(gen, cases, act, [5, 14])            # f = 7 (odd)
        glu_case(gen, cases, act, [2, 3, 32])         # f = 16
        glu_case(gen, cases, act, [2])                # f = 1, 1-d
        glu_case(gen, cases, act, [3, 8, 6], layout="transposed")  # non-contiguous x
        glu_case(gen, cases, act, [4, 22], scale=6.0)  # the tails of the activations
        glu_case(gen, cases, act, [3, 18], torch.bfloat16)
        glu_case(gen, cases, act, [2, 5, 8], torch.float16)
        glu_case(gen, cases, act, [3, 10], torch.float64)
    compact(cases)
    save("glu", cases, os.path.basename(__file__))


if __name__ == "__main__":
    main()
