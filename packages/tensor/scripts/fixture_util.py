"""Shared helpers for the PyTorch fixture scripts (scripts/fixtures_*.py).

Each script writes test/fixtures/<family>.json:
  {"generator": "<script>", "torch": "<version>", "cases": [case, ...]}
with case = {"name", "args": {...}, "inputs": {name: tensor}, "outputs": {name: tensor},
             "grads": {input name: tensor}}
and tensor = {"shape": [...], "dtype": "float32"|"bfloat16"|"float64"|"int64"|"bool",
              "data": [flat row-major values], "layout": "contiguous"|"transposed"}.
"transposed" inputs are built in the test as the transpose of the last two dimensions of a
contiguous tensor, so kernels see non-contiguous strides.
Run with /usr/bin/python3 (Debian python3-torch).
"""
import json
import os
import struct

import torch

DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16",
          torch.float16: "float16", torch.int64: "int64", torch.int32: "int32", torch.bool: "bool",
          torch.uint8: "uint8"}

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "test", "fixtures")


def enc(t, layout="contiguous"):
    """Encodes a tensor (its values exactly: bf16 values are representable as JSON doubles)."""
    t = t.detach()
    dt = DTYPES[t.dtype]
    if t.dtype in (torch.bfloat16, torch.float16):
        vals = t.float().reshape(-1).tolist()
    elif t.dtype == torch.bool:
        vals = [bool(v) for v in t.reshape(-1).tolist()]
    else:
        vals = t.reshape(-1).tolist()
    return {"shape": list(t.shape), "dtype": dt, "data": vals, "layout": layout}


def make_input(shape, dtype=torch.float32, layout="contiguous", gen=None, scale=1.0, requires_grad=True):
    """A random input; for "transposed" the returned tensor is a non-contiguous view."""
    if layout == "transposed":
        base = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen) * scale
        t = base.to(dtype).transpose(-1, -2)
    else:
        t = (torch.randn(*shape, generator=gen) * scale).to(dtype)
    if requires_grad and dtype.is_floating_point:
        t.requires_grad_(True)
    return t


def save(family, cases, script):
    os.makedirs(FIXTURES, exist_ok=True)
    path = os.path.join(FIXTURES, family + ".json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"generator": "scripts/" + script, "torch": torch.__version__, "cases": cases}, f,
                  separators=(",", ":"))
    os.replace(tmp, path)
    print(f"wrote {path}: {len(cases)} cases")


def shortest(v):
    """The fewest significant digits that still read back as the same float32."""
    f = struct.unpack("f", struct.pack("f", v))[0]
    for digits in range(4, 10):
        s = float("%.*g" % (digits, f))
        if struct.unpack("f", struct.pack("f", s))[0] == f:
            return s
    return f


def compact(cases):
    """Rewrites float32 / bfloat16 data with shortest(); keeps each JSON file small."""
    for case in cases:
        for group in ("inputs", "outputs", "grads"):
            for t in case[group].values():
                if t["dtype"] in ("float32", "bfloat16"):
                    t["data"] = [shortest(v) for v in t["data"]]
