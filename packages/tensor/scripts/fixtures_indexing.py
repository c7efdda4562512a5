"""PyTorch reference fixtures for the indexing family (src/ops/indexing.ts).

Writes test/fixtures/indexing.json. Run with /usr/bin/python3 from packages/tensor.

Every differentiable case stores a random upstream gradient as the input "gout"; the reference
gradients come from out.backward(gout). bfloat16 cases are computed by torch in float32 from the
bf16-valued inputs and rounded to bf16 once at the end: megapatch accumulates 16-bit floats in
float32 (embedding / indexSelect gradients, scatterAdd, indexAdd), which torch's bf16 kernels do
not, so "float32 then round" is the exact answer our kernels aim at. topk inputs are built from
permutations so that no row has ties.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_util import enc, save  # noqa: E402

gen = torch.Generator().manual_seed(20240611)


def randn(shape, dtype, layout="contiguous"):
    """A random float tensor; for "transposed" a non-contiguous view of the last two dims."""
    if layout == "transposed":
        base = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen)
        return base.to(dtype).transpose(-1, -2)
    return torch.randn(*shape, generator=gen).to(dtype)


def distinct(shape, dtype, layout="contiguous"):
    """Values (p - n/2) / 4 for a random permutation p: no ties, exact in bfloat16 (n <= 1024)."""
    n = 1
    for s in shape:
        n *= s
    shp = list(shape) if layout == "contiguous" else list(shape[:-2]) + [shape[-1], shape[-2]]
    t = ((torch.randperm(n, generator=gen).double() - n // 2) / 4).reshape(shp).to(dtype)
    return t if layout == "contiguous" else t.transpose(-1, -2)


def ids(shape, high, dtype=torch.int64, repeat=True):
    """Random ids in [0, high) with guaranteed repeats (the first id appears at least 3 times)."""
    t = torch.randint(0, high, tuple(shape), generator=gen)
    flat = t.view(-1)
    if repeat and flat.numel() >= 3:
        flat[1] = flat[0]
        flat[-1] = flat[0]
    return t.to(dtype)


cases = []


def case(name, args, inputs, fn, diff=(), layouts=None):
    """Runs fn on the inputs (floats upcast to float32 for bf16) and records outputs and the
    gradients of the `diff` inputs for a random upstream gradient of output "out"/"values"."""
    layouts = layouts or {}
    ref = {}
    low = None
    for k, t in inputs.items():
        if t.dtype.is_floating_point:
            if t.dtype in (torch.bfloat16, torch.float16):
                low = t.dtype
            r = t.detach().float() if t.dtype in (torch.bfloat16, torch.float16) else t.detach().clone()
            if k in diff:
                r.requires_grad_(True)
            ref[k] = r
        else:
            ref[k] = t
    outs = fn(**ref)
    enc_inputs = {k: enc(t, layouts.get(k, "contiguous")) for k, t in inputs.items()}

    def rounded(t):
        return t.to(low) if low is not None and t.dtype.is_floating_point else t

    grads = {}
    if diff:
        main = outs["out"] if "out" in outs else outs["values"]
        gdtype = low or main.dtype
        gout = torch.randn(*main.shape, generator=gen).to(gdtype)
        main.backward(gout.float() if low else gout)
        enc_inputs["gout"] = enc(gout)
        grads = {k: enc(rounded(ref[k].grad)) for k in diff}
    cases.append({
        "name": name,
        "args": args,
        "inputs": enc_inputs,
        "outputs": {k: enc(rounded(v)) for k, v in outs.items()},
        "grads": grads,
    })


f32, bf16 = torch.float32, torch.bfloat16

# ---- embedding -----------------------------------------------------------------------------
case("embedding f32 [3,5] ids, V=11 H=6", {"op": "embedding"},
     {"input": ids([3, 5], 11), "weight": randn([11, 6], f32)},
     lambda input, weight: {"out": F.embedding(input, weight)}, diff=["weight"])
pad_ids = ids([2, 7], 9, torch.int32)
pad_ids.view(-1)[2] = 3
pad_ids.view(-1)[5] = 3
case("embedding bf16 int32 ids, paddingIdx 3", {"op": "embedding", "paddingIdx": 3},
     {"input": pad_ids, "weight": randn([9, 5], bf16)},
     lambda input, weight: {"out": F.embedding(input, weight, padding_idx=3)}, diff=["weight"])
neg_ids = ids([4, 3], 8)
neg_ids.view(-1)[4] = 7
case("embedding transposed weight, paddingIdx -1", {"op": "embedding", "paddingIdx": -1},
     {"input": neg_ids, "weight": randn([8, 5], f32, "transposed")},
     lambda input, weight: {"out": F.embedding(input, weight, padding_idx=-1)}, diff=["weight"],
     layouts={"weight": "transposed"})
case("embedding 1-D ids", {"op": "embedding"},
     {"input": ids([6], 4), "weight": randn([4, 3], f32)},
     lambda input, weight: {"out": F.embedding(input, weight)}, diff=["weight"])

# ---- indexSelect ---------------------------------------------------------------------------
for name, shape, dim, index, dtype, layout in [
    ("indexSelect dim 0", [5, 4], 0, ids([6], 5), f32, "contiguous"),
    ("indexSelect 3-D dim 1 int32", [3, 5, 4], 1, ids([4], 5, torch.int32), f32, "contiguous"),
    ("indexSelect bf16 dim -1", [4, 3, 6], -1, ids([5], 6), bf16, "contiguous"),
    ("indexSelect transposed dim 1", [6, 5], 1, ids([3], 5), f32, "transposed"),
]:
    case(name, {"op": "indexSelect", "dim": dim},
         {"x": randn(shape, dtype, layout), "index": index},
         lambda x, index, dim=dim: {"out": torch.index_select(x, dim, index)}, diff=["x"],
         layouts={"x": layout})

# ---- gather --------------------------------------------------------------------------------
for name, shape, dim, ishape, dtype, layout, idtype in [
    ("gather dim 1", [4, 6], 1, [4, 3], f32, "contiguous", torch.int64),
    ("gather 3-D dim 0, index longer along dim", [5, 4, 3], 0, [7, 3, 2], f32, "contiguous", torch.int64),
    ("gather bf16 dim 1", [3, 7], 1, [3, 9], bf16, "contiguous", torch.int64),
    ("gather transposed dim -1", [5, 6], -1, [5, 4], f32, "transposed", torch.int64),
    ("gather 3-D dim 2 int32", [2, 3, 5], 2, [2, 2, 4], f32, "contiguous", torch.int32),
]:
    size = shape[dim]
    index = ids(ishape, size, idtype)
    case(name, {"op": "gather", "dim": dim},
         {"x": randn(shape, dtype, layout), "index": index},
         lambda x, index, dim=dim: {"out": torch.gather(x, dim, index.long())}, diff=["x"],
         layouts={"x": layout})

# ---- scatterAdd ----------------------------------------------------------------------------
for name, shape, dim, ishape, sshape, dtype, layout in [
    ("scatterAdd dim 0, src larger than index", [5, 6], 0, [7, 4], [8, 6], f32, "contiguous"),
    ("scatterAdd 3-D dim 2", [3, 4, 5], 2, [3, 4, 7], [3, 4, 7], f32, "contiguous"),
    ("scatterAdd bf16 dim 1", [4, 5], 1, [4, 8], [4, 8], bf16, "contiguous"),
    ("scatterAdd transposed dim 0", [6, 5], 0, [6, 5], [6, 5], f32, "transposed"),
]:
    index = ids(ishape, shape[dim])
    case(name, {"op": "scatterAdd", "dim": dim},
         {"x": randn(shape, dtype, layout), "index": index, "src": randn(sshape, dtype, layout)},
         # scatter_add reads src only inside the index's extent; slicing src to it first gives the
         # same output and lets autograd zero-pad the src gradient, which torch 1.13 refuses to do
         lambda x, index, src, dim=dim: {
             "out": torch.scatter_add(x, dim, index, src[tuple(slice(0, n) for n in index.shape)])},
         diff=["x", "src"],
         layouts={"x": layout, "src": layout})

# ---- indexAdd ------------------------------------------------------------------------------
for name, shape, dim, n, alpha, dtype, layout, idtype in [
    ("indexAdd 3-D dim 1 alpha 0.5", [5, 4, 3], 1, 6, 0.5, f32, "contiguous", torch.int64),
    ("indexAdd bf16 dim 0 int32", [4, 6], 0, 7, 1.0, bf16, "contiguous", torch.int32),
    ("indexAdd transposed dim -1 alpha -2", [5, 6], -1, 4, -2.0, f32, "transposed", torch.int64),
]:
    index = ids([n], shape[dim], idtype)
    sshape = list(shape)
    sshape[dim] = n
    case(name, {"op": "indexAdd", "dim": dim, "alpha": alpha},
         {"x": randn(shape, dtype, layout), "index": index, "source": randn(sshape, dtype, layout)},
         lambda x, index, source, dim=dim, alpha=alpha: {
             "out": torch.index_add(x, dim, index.long(), source, alpha=alpha)},
         diff=["x", "source"], layouts={"x": layout, "source": layout})

# ---- topk ----------------------------------------------------------------------------------
for name, shape, k, dim, largest, dtype, layout in [
    ("topk largest k 3 dim -1", [4, 9], 3, -1, True, f32, "contiguous"),
    ("topk smallest k 2 dim 0", [7, 5], 2, 0, False, f32, "contiguous"),
    ("topk 3-D k 4 dim 1", [2, 6, 3], 4, 1, True, f32, "contiguous"),
    ("topk bf16 k 5", [3, 8], 5, -1, True, bf16, "contiguous"),
    ("topk transposed smallest k 2", [6, 5], 2, -1, False, f32, "transposed"),
    ("topk k = size", [3, 4], 4, 1, True, f32, "contiguous"),
]:
    case(name, {"op": "topk", "k": k, "dim": dim, "largest": largest},
         {"x": distinct(shape, dtype, layout)},
         lambda x, k=k, dim=dim, largest=largest: dict(
             zip(["values", "indices"], torch.topk(x, k, dim=dim, largest=largest, sorted=True))),
         diff=["x"], layouts={"x": layout})

# ---- triu / tril ---------------------------------------------------------------------------
for name, op, shape, diag, dtype, layout in [
    ("triu [5,7]", "triu", [5, 7], 0, f32, "contiguous"),
    ("tril [5,7]", "tril", [5, 7], 0, f32, "contiguous"),
    ("triu batched diagonal 1", "triu", [2, 4, 6], 1, f32, "contiguous"),
    ("tril batched diagonal -2", "tril", [2, 4, 6], -2, f32, "contiguous"),
    ("triu bf16 diagonal -1", "triu", [3, 3], -1, bf16, "contiguous"),
    ("tril transposed diagonal 2", "tril", [6, 4], 2, f32, "transposed"),
    ("triu diagonal beyond the matrix", "triu", [3, 4], 10, f32, "contiguous"),
]:
    fn = torch.triu if op == "triu" else torch.tril
    case(name, {"op": op, "diagonal": diag}, {"x": randn(shape, dtype, layout)},
         lambda x, fn=fn, diag=diag: {"out": fn(x, diag)}, diff=["x"], layouts={"x": layout})

# ---- oneHot --------------------------------------------------------------------------------
case("oneHot [2,3] 5 classes", {"op": "oneHot", "numClasses": 5}, {"indices": ids([2, 3], 5)},
     lambda indices: {"out": F.one_hot(indices, 5)})
case("oneHot inferred classes", {"op": "oneHot", "numClasses": -1}, {"indices": ids([4], 6)},
     lambda indices: {"out": F.one_hot(indices)})

save("indexing", cases, "fixtures_indexing.py")
