"""PyTorch reference fixtures for the core ops of @megapatch/tensor (test/core-ops.test.ts).

Writes test/fixtures/core.json. Every case is described by `args` (op name and parameters);
`apply()` below interprets them with torch exactly as the TypeScript test interprets them with
our ops, so a case is defined once. Differentiable cases store a random upstream gradient as
input "gout" (or gout0, gout1, ... for ops returning a list) and torch's input gradients.

Run: /usr/bin/python3 scripts/fixtures_core.py   (Debian python3-torch, seeded, deterministic)
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_util import enc, make_input, save  # noqa: E402

torch.manual_seed(0)
GEN = torch.Generator().manual_seed(20240611)
f32, bf16, f64 = torch.float32, torch.bfloat16, torch.float64
TORCH_DTYPES = {"float32": f32, "bfloat16": bf16, "float64": f64, "int64": torch.int64, "bool": torch.bool}

# bfloat16 reference. torch 1.13's CPU bf16 kernels are not a good reference: they accumulate
# matmul in bf16 (a [7,13]@[13,6] entry came out 0.1826 where the exact value is 0.2120), and
# round intermediates inside some backward formulas (gelu-tanh backward gave 0 for -0.0116, rsqrt
# backward was 6 ulps off). So a case with bf16 inputs runs in torch twice: in bf16 (for the
# output dtypes and the bf16 upstream gradient) and in float64 on the same bf16 values; the
# float64 results, rounded to bf16, are stored. Our ops compute each step in float32 and round
# its result to bf16, so intermediate results differ from the exact ones by up to half a bf16 ulp
# each (2^-9 relative) and errors compound over a few steps. fixtures.ts tolFor('bfloat16')
# (atol 1e-2, rtol 1.6e-2, about 2^-6, i.e. 2 to 4 ulps) covers that; cases needing more say so
# in args.tol with a comment.

cases = []


# ---- the op interpreter (mirrors run() in test/core-ops.test.ts) -------------------------------

BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "pow": lambda a, b: a ** b,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
}

UNARY = {
    "neg": torch.neg, "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt,
    "abs": torch.abs, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": F.silu,
    "gelu": lambda x: F.gelu(x), "geluTanh": lambda x: F.gelu(x, approximate="tanh"), "relu": torch.relu,
    "sin": torch.sin, "cos": torch.cos, "square": torch.square, "reciprocal": torch.reciprocal,
    "log1p": torch.log1p, "expm1": torch.expm1,
}


def dims_of(x, dim):
    """Our reductions take null (all dims), one dim or a list."""
    if dim is None:
        return tuple(range(x.ndim))
    return tuple(dim) if isinstance(dim, list) else (dim,)


def apply(a, t):
    op = a["op"]
    x = t.get("x")
    if op in BINARY:
        f = BINARY[op]
        if "scalar" in a:
            return f(a["scalar"], x) if a.get("reverse") else f(x, a["scalar"])
        if "alpha" in a:
            return torch.add(x, t["y"], alpha=a["alpha"]) if op == "add" else torch.sub(x, t["y"], alpha=a["alpha"])
        return f(x, t["y"])
    if op == "unary":
        return UNARY[a["fn"]](x)
    if op == "clamp":
        return torch.clamp(x, a.get("min"), a.get("max"))
    if op == "where":
        xv = a["xScalar"] if "xScalar" in a else x
        yv = a["yScalar"] if "yScalar" in a else t["y"]
        return torch.where(t["cond"], xv, yv)
    if op == "maskedFill":
        return x.masked_fill(t["mask"], a["value"])
    kd = a.get("keepdim", False)
    if op in ("sum", "mean"):
        f = torch.sum if op == "sum" else torch.mean
        return f(x) if a.get("dim") is None and not kd else f(x, dims_of(x, a.get("dim")), keepdim=kd)
    if op == "var":
        return torch.var(x, dims_of(x, a.get("dim")), correction=a.get("correction", 1), keepdim=kd)
    if op in ("amax", "amin"):
        return getattr(torch, op)(x, dims_of(x, a.get("dim")), keepdim=kd)
    if op in ("maxAll", "minAll"):
        return torch.max(x) if op == "maxAll" else torch.min(x)
    if op in ("maxDim", "minDim"):
        r = (torch.max if op == "maxDim" else torch.min)(x, a["dim"], keepdim=kd)
        return {"values": r.values, "indices": r.indices}
    if op in ("argmax", "argmin"):
        return getattr(torch, op)(x, a.get("dim"), keepdim=kd)
    if op == "logsumexp":
        return torch.logsumexp(x, dims_of(x, a["dim"]), keepdim=kd)
    if op == "norm":
        p = float("inf") if a["p"] == "inf" else a["p"]
        dim = None if a.get("dim") is None else dims_of(x, a["dim"])
        return torch.linalg.vector_norm(x, ord=p, dim=dim, keepdim=kd)
    if op == "cumsum":
        return torch.cumsum(x, a["dim"])
    if op == "view":
        return x.view(a["shape"])
    if op == "reshape":
        return x.reshape(a["shape"])
    if op == "transpose":
        return x.transpose(a["dim0"], a["dim1"])
    if op == "permute":
        return x.permute(a["dims"])
    if op == "expand":
        return x.expand(a["shape"])
    if op == "squeeze":
        return x.squeeze() if a.get("dim") is None else x.squeeze(a["dim"])
    if op == "unsqueeze":
        return x.unsqueeze(a["dim"])
    if op == "flatten":
        return x.flatten(a.get("start", 0), a.get("end", -1))
    if op == "narrow":
        return x.narrow(a["dim"], a["start"], a["length"])
    if op == "select":
        return x.select(a["dim"], a["index"])
    if op == "split":
        return list(x.split(a["size"], a.get("dim", 0)))
    if op == "chunk":
        return list(x.chunk(a["chunks"], a.get("dim", 0)))
    if op == "cat":
        return torch.cat([t[n] for n in a["list"]], a.get("dim", 0))
    if op == "stack":
        return torch.stack([t[n] for n in a["list"]], a.get("dim", 0))
    if op == "contiguous":
        return x.contiguous()
    if op == "to":
        return x.to(TORCH_DTYPES[a["dtype"]])
    if op == "matmul":
        return torch.matmul(x, t["y"])
    if op == "bmm":
        return torch.bmm(x, t["y"])
    if op == "linear":
        return F.linear(x, t["w"], t.get("b"))
    raise ValueError(op)


# ---- case construction ------------------------------------------------------------------------

def rnd(shape, dtype=f32, layout="contiguous", kind="normal", scale=1.0):
    """A random input (values drawn in float32, shaped to the op's domain, then cast)."""
    if len(shape) == 0:  # make_input's torch.randn(*shape) needs at least one size
        t = make_input([1], f32, layout, GEN, scale, requires_grad=False).reshape([])
    else:
        t = make_input(list(shape), f32, layout, GEN, scale, requires_grad=False)
    if kind == "positive":  # log, sqrt, rsqrt
        t = t.abs() + 0.2
    elif kind == "base":  # pow bases: x^y with y ~ N(0,1) stays moderate, so that broadcast
        # gradients do not sum huge terms of opposite sign (bf16 cancellation)
        t = t.abs() + 0.5
    elif kind == "nonzero":  # divisors, reciprocal
        t = torch.where(t >= 0, t + 0.3, t - 0.3)
    elif kind == "int":  # integer-valued floats: ties for comparisons and max/min
        t = torch.round(t * 2)
    return (t.to(dtype), layout)


def prepare(inputs, grad, to64=False):
    ts = {}
    for k, (v, _) in inputs.items():
        v = v.detach().clone()
        if to64 and v.dtype == bf16:
            v = v.double()
        if grad and v.dtype.is_floating_point and k not in ("cond", "mask"):
            v.requires_grad_(True)
        ts[k] = v
    return ts


def outputs_of(result):
    """(named outputs, the differentiable ones)."""
    if isinstance(result, dict):
        return result, [result["values"]]
    if isinstance(result, list):
        return {f"out{i}": v for i, v in enumerate(result)}, result
    return {"out": result}, [result]


def add_case(name, args, inputs, grad=True, tol=None):
    """inputs: name -> (tensor, layout). Floating inputs except masks take part in backward."""
    low = any(v.dtype == bf16 for v, _ in inputs.values())
    ts = prepare(inputs, grad)
    named, diff = outputs_of(apply(args, ts))
    enc_inputs = {k: enc(ts[k], lay) for k, (_, lay) in inputs.items()}
    wants = [k for k, v in ts.items() if v.requires_grad]
    backward = bool(wants) and all(d.requires_grad for d in diff)
    gouts = [torch.randn(d.shape, generator=GEN).to(d.dtype) for d in diff] if backward else []
    # the values stored come from `ref`: the same op in float64 for bf16 cases (see above)
    ref_ts = prepare(inputs, grad, to64=True) if low else ts
    ref_named, ref_diff = outputs_of(apply(args, ref_ts)) if low else (named, diff)
    outputs = {k: enc(ref_named[k].to(v.dtype)) for k, v in named.items()}
    grads = {}
    if backward:
        rg = [g.to(d.dtype) for g, d in zip(gouts, ref_diff)]
        if "out0" in named:  # a list of outputs (split, chunk)
            loss = sum((d * g).sum() for d, g in zip(ref_diff, rg))
            loss.backward()
            for i, g in enumerate(gouts):
                enc_inputs[f"gout{i}"] = enc(g)
        else:
            ref_diff[0].backward(rg[0])
            enc_inputs["gout"] = enc(gouts[0])
        for k in wants:
            g = ref_ts[k].grad
            g = g if g is not None else torch.zeros_like(ref_ts[k])
            grads[k] = enc(g.to(ts[k].dtype))
    a = dict(args)
    a["grad"] = list(grads.keys())
    if tol:
        a["tol"] = tol
    cases.append({"name": name, "args": a, "inputs": enc_inputs, "outputs": outputs, "grads": grads})


# binary arithmetic: tensor-tensor (same shape, broadcasting, 0-d, [1], non-contiguous),
# tensor-scalar and scalar-tensor
for op in ["add", "sub", "mul", "div", "pow", "maximum", "minimum"]:
    kx = "base" if op == "pow" else "normal"
    ky = "nonzero" if op == "div" else "normal"
    for dt in [f32, bf16]:
        dn = "f32" if dt == f32 else "bf16"
        add_case(f"{op} [7,13] {dn}", {"op": op}, {"x": rnd([7, 13], dt, kind=kx), "y": rnd([7, 13], dt, kind=ky)})
        # the gradient of the broadcast y of pow sums 24 products g * x^y * log(x) whose three
        # factors are each rounded to bf16 (2^-9 relative apiece); with terms of either sign
        # around 1 the sum (about 0.8 here) can be off by 0.02, beyond 2^-6 relative
        btol = {"atol": 0.04, "rtol": 1.6e-2} if op == "pow" and dt == bf16 else None
        add_case(f"{op} broadcast [4,1,6]x[5,1] {dn}", {"op": op},
                 {"x": rnd([4, 1, 6], dt, kind=kx), "y": rnd([5, 1], dt, kind=ky)}, tol=btol)
    add_case(f"{op} [] x [3,5] f32", {"op": op}, {"x": rnd([], kind=kx), "y": rnd([3, 5], kind=ky)})
    add_case(f"{op} [1] x [] f32", {"op": op}, {"x": rnd([1], kind=kx), "y": rnd([], kind=ky)})
    add_case(f"{op} transposed [5,6] x [6] f32", {"op": op},
             {"x": rnd([5, 6], layout="transposed", kind=kx), "y": rnd([6], kind=ky)})
add_case("add [3,5,33] x [5,1] f32", {"op": "add"}, {"x": rnd([3, 5, 33]), "y": rnd([5, 1])})
add_case("mul [3,5,33] x [33] f32", {"op": "mul"}, {"x": rnd([3, 5, 33]), "y": rnd([33])})
add_case("add alpha=-2.5 broadcast f32", {"op": "add", "alpha": -2.5}, {"x": rnd([4, 5]), "y": rnd([5])})
add_case("sub alpha=3 broadcast bf16", {"op": "sub", "alpha": 3}, {"x": rnd([4, 5], bf16), "y": rnd([4, 1], bf16)})
add_case("sub transposed x transposed f32", {"op": "sub"},
         {"x": rnd([6, 4], layout="transposed"), "y": rnd([6, 4], layout="transposed")})
for op, s in [("add", 1.5), ("sub", -0.75), ("mul", 3.25), ("div", -2.5), ("pow", 3), ("pow", 0.5), ("pow", -1.5),
              ("pow", 2)]:
    kx = "base" if op == "pow" else "normal"
    for dt in [f32, bf16]:
        dn = "f32" if dt == f32 else "bf16"
        add_case(f"{op} tensor-scalar {s} {dn}", {"op": op, "scalar": s}, {"x": rnd([6, 7], dt, kind=kx)})
for op, s in [("add", -1.25), ("sub", 2.0), ("mul", -0.5), ("div", 1.5), ("pow", 1.7), ("pow", 0.6)]:
    kx = "nonzero" if op == "div" else "normal"
    for dt in [f32, bf16]:
        dn = "f32" if dt == f32 else "bf16"
        add_case(f"{op} scalar-tensor {s} {dn}", {"op": op, "scalar": s, "reverse": True}, {"x": rnd([6, 7], dt, kind=kx)})
add_case("mul tensor-scalar transposed f32", {"op": "mul", "scalar": -3.0}, {"x": rnd([5, 9], layout="transposed")})
add_case("sub scalar-tensor transposed f32", {"op": "sub", "scalar": 1.0, "reverse": True},
         {"x": rnd([5, 9], layout="transposed")})
# ties: torch.maximum/minimum split the gradient equally between equal operands
for op in ["maximum", "minimum"]:
    add_case(f"{op} with ties f32", {"op": op}, {"x": rnd([6, 8], kind="int"), "y": rnd([6, 8], kind="int")})
    add_case(f"{op} with ties broadcast bf16", {"op": op}, {"x": rnd([6, 8], bf16, kind="int"), "y": rnd([8], bf16, kind="int")})
# integer arithmetic
ix = (torch.tensor([[7, -8, 9], [10, 3, -1]]), "contiguous")
iy = (torch.tensor([2, 3, -4]), "contiguous")
for op in ["add", "sub", "mul", "div", "maximum", "minimum"]:
    add_case(f"{op} int64", {"op": op}, {"x": ix, "y": iy}, grad=False)
add_case("div int64 by scalar", {"op": "div", "scalar": 4}, {"x": ix}, grad=False)
add_case("div scalar by int64", {"op": "div", "scalar": 5, "reverse": True}, {"x": iy}, grad=False)
add_case("mul int64 by float scalar", {"op": "mul", "scalar": 0.5}, {"x": ix}, grad=False)
add_case("pow int64 by int scalar", {"op": "pow", "scalar": 2}, {"x": ix}, grad=False)
add_case("exp of int64 computes in float32", {"op": "unary", "fn": "exp"}, {"x": iy}, grad=False)
add_case("abs of int64 stays int64", {"op": "unary", "fn": "abs"}, {"x": ix}, grad=False)
add_case("neg of int64", {"op": "unary", "fn": "neg"}, {"x": ix}, grad=False)
add_case("where int64 with a float scalar promotes", {"op": "where", "yScalar": 0.5},
         {"cond": (torch.tensor([[True, False, True], [False, False, True]]), "contiguous"), "x": ix}, grad=False)

# comparisons (forward only): ties from integer-valued floats
for op in ["eq", "ne", "lt", "le", "gt", "ge"]:
    add_case(f"{op} broadcast f32", {"op": op}, {"x": rnd([5, 6], kind="int"), "y": rnd([6], kind="int")}, grad=False)
    add_case(f"{op} scalar bf16", {"op": op, "scalar": 1.0}, {"x": rnd([5, 6], bf16, kind="int")}, grad=False)
    add_case(f"{op} transposed f32", {"op": op}, {"x": rnd([4, 5], layout="transposed", kind="int"),
                                                   "y": rnd([4, 5], kind="int")}, grad=False)
    add_case(f"{op} int64", {"op": op}, {"x": ix, "y": iy}, grad=False)

# unary math and activations
DOMAIN = {"log": "positive", "sqrt": "positive", "rsqrt": "positive", "reciprocal": "nonzero", "log1p": "positive",
          "abs": "nonzero"}
for fn in UNARY:
    k = DOMAIN.get(fn, "normal")
    sc = 2.0 if fn in ("exp", "tanh", "sigmoid", "silu", "gelu", "geluTanh", "sin", "cos", "expm1") else 1.0
    add_case(f"{fn} [7,13] f32", {"op": "unary", "fn": fn}, {"x": rnd([7, 13], kind=k, scale=sc)})
    add_case(f"{fn} [7,13] bf16", {"op": "unary", "fn": fn}, {"x": rnd([7, 13], bf16, kind=k, scale=sc)})
    add_case(f"{fn} transposed [4,6] f32", {"op": "unary", "fn": fn}, {"x": rnd([4, 6], layout="transposed", kind=k)})
    add_case(f"{fn} [] f32", {"op": "unary", "fn": fn}, {"x": rnd([], kind=k)})
add_case("relu [1] f32", {"op": "unary", "fn": "relu"}, {"x": rnd([1])})
add_case("exp [3,5,33] f32", {"op": "unary", "fn": "exp"}, {"x": rnd([3, 5, 33])})
add_case("gelu [3,5,33] bf16", {"op": "unary", "fn": "gelu"}, {"x": rnd([3, 5, 33], bf16, scale=2.0)})

# clamp, where, maskedFill
for dt, dn in [(f32, "f32"), (bf16, "bf16")]:
    add_case(f"clamp min max {dn}", {"op": "clamp", "min": -0.5, "max": 0.75}, {"x": rnd([7, 13], dt)})
    add_case(f"clamp min {dn}", {"op": "clamp", "min": 0.25}, {"x": rnd([7, 13], dt)})
    add_case(f"clamp max {dn}", {"op": "clamp", "max": -0.25}, {"x": rnd([7, 13], dt)})
    cond = (torch.rand(7, 1, generator=GEN) > 0.5, "contiguous")
    add_case(f"where broadcast {dn}", {"op": "where"}, {"cond": cond, "x": rnd([7, 13], dt), "y": rnd([13], dt)})
    cond2 = (torch.rand(5, 6, generator=GEN) > 0.5, "contiguous")
    add_case(f"where scalar other {dn}", {"op": "where", "yScalar": -2.0}, {"cond": cond2, "x": rnd([5, 6], dt)})
    add_case(f"where scalar input {dn}", {"op": "where", "xScalar": 1.5}, {"cond": cond2, "y": rnd([6], dt)})
    mask = (torch.rand(1, 6, generator=GEN) > 0.5, "contiguous")
    add_case(f"maskedFill broadcast {dn}", {"op": "maskedFill", "value": -1.5}, {"x": rnd([4, 6], dt), "mask": mask})
# masked_fill keeps the input dtype (an int64 tensor filled with 2.75 gets 2)
add_case("maskedFill int64 keeps its dtype", {"op": "maskedFill", "value": 2.75},
         {"x": ix, "mask": (torch.tensor([True, False, True]), "contiguous")}, grad=False)
add_case("maskedFill bool", {"op": "maskedFill", "value": 1},
         {"x": (torch.tensor([[True, False, False], [False, False, True]]), "contiguous"),
          "mask": (torch.tensor([[False], [True]]), "contiguous")}, grad=False)
add_case("clamp transposed f32", {"op": "clamp", "min": -0.3, "max": 0.3}, {"x": rnd([5, 6], layout="transposed")})
add_case("where transposed f32", {"op": "where"},
         {"cond": (torch.rand(5, 4, generator=GEN) > 0.5, "contiguous"), "x": rnd([5, 4], layout="transposed"),
          "y": rnd([5, 4])})

# reductions
for dt, dn in [(f32, "f32"), (bf16, "bf16")]:
    for op in ["sum", "mean"]:
        add_case(f"{op} all {dn}", {"op": op}, {"x": rnd([3, 4, 5], dt)})
        add_case(f"{op} dim 1 {dn}", {"op": op, "dim": 1}, {"x": rnd([3, 4, 5], dt)})
        add_case(f"{op} dims [0,2] keepdim {dn}", {"op": op, "dim": [0, 2], "keepdim": True}, {"x": rnd([3, 4, 5], dt)})
        add_case(f"{op} dim -1 keepdim {dn}", {"op": op, "dim": -1, "keepdim": True}, {"x": rnd([7, 13], dt)})
    for corr in [1, 0, 2]:
        add_case(f"var all correction {corr} {dn}", {"op": "var", "correction": corr}, {"x": rnd([4, 6], dt)})
    add_case(f"var dim 1 {dn}", {"op": "var", "dim": 1}, {"x": rnd([3, 4, 5], dt)})
    add_case(f"var dims [0,2] keepdim correction 0 {dn}", {"op": "var", "dim": [0, 2], "keepdim": True, "correction": 0},
             {"x": rnd([3, 4, 5], dt)})
    for op in ["amax", "amin"]:
        add_case(f"{op} all {dn}", {"op": op}, {"x": rnd([4, 6], dt)})
        add_case(f"{op} dim 1 {dn}", {"op": op, "dim": 1}, {"x": rnd([3, 4, 5], dt)})
        add_case(f"{op} dims [0,2] keepdim ties {dn}", {"op": op, "dim": [0, 2], "keepdim": True},
                 {"x": rnd([3, 4, 5], dt, kind="int")})
    for op in ["maxDim", "minDim"]:
        add_case(f"{op} dim 1 {dn}", {"op": op, "dim": 1}, {"x": rnd([3, 4, 5], dt)})
        add_case(f"{op} dim -1 keepdim {dn}", {"op": op, "dim": -1, "keepdim": True}, {"x": rnd([7, 13], dt)})
    add_case(f"maxAll ties {dn}", {"op": "maxAll"}, {"x": rnd([5, 6], dt, kind="int")})
    add_case(f"minAll ties {dn}", {"op": "minAll"}, {"x": rnd([5, 6], dt, kind="int")})
    add_case(f"logsumexp dim 1 {dn}", {"op": "logsumexp", "dim": 1}, {"x": rnd([7, 13], dt, scale=3.0)})
    add_case(f"logsumexp dims [0,2] keepdim {dn}", {"op": "logsumexp", "dim": [0, 2], "keepdim": True},
             {"x": rnd([3, 4, 5], dt)})
    for p in [1, 2, 3, "inf"]:
        add_case(f"norm p={p} all {dn}", {"op": "norm", "p": p}, {"x": rnd([5, 6], dt)})
        add_case(f"norm p={p} dim 1 {dn}", {"op": "norm", "p": p, "dim": 1}, {"x": rnd([3, 4, 5], dt)})
        add_case(f"norm p={p} dims [0,1] keepdim {dn}", {"op": "norm", "p": p, "dim": [0, 1], "keepdim": True},
                 {"x": rnd([3, 4, 5], dt)})
    add_case(f"cumsum dim 0 {dn}", {"op": "cumsum", "dim": 0}, {"x": rnd([7, 13], dt)})
    add_case(f"cumsum dim -1 {dn}", {"op": "cumsum", "dim": -1}, {"x": rnd([3, 4, 13], dt)})
for op in ["argmax", "argmin"]:
    add_case(f"{op} all f32", {"op": op}, {"x": rnd([5, 7])}, grad=False)
    add_case(f"{op} dim 1 keepdim f32", {"op": op, "dim": 1, "keepdim": True}, {"x": rnd([3, 4, 5])}, grad=False)
    add_case(f"{op} dim 0 bf16", {"op": op, "dim": 0}, {"x": rnd([6, 5], bf16)}, grad=False)
    add_case(f"{op} dim -1 transposed f32", {"op": op, "dim": -1}, {"x": rnd([5, 7], layout="transposed")}, grad=False)
add_case("sum [3,5,33] dim 2 f32", {"op": "sum", "dim": 2}, {"x": rnd([3, 5, 33])})
add_case("sum transposed dim 0 f32", {"op": "sum", "dim": 0}, {"x": rnd([7, 13], layout="transposed")})
add_case("mean transposed all f32", {"op": "mean"}, {"x": rnd([7, 13], layout="transposed")})
add_case("var transposed dim 1 f32", {"op": "var", "dim": 1}, {"x": rnd([7, 13], layout="transposed")})
add_case("amax transposed dim 0 f32", {"op": "amax", "dim": 0}, {"x": rnd([5, 6], layout="transposed")})
add_case("norm p=2 transposed dim 1 f32", {"op": "norm", "p": 2, "dim": 1}, {"x": rnd([5, 6], layout="transposed")})
add_case("logsumexp transposed dim 0 f32", {"op": "logsumexp", "dim": 0}, {"x": rnd([5, 6], layout="transposed")})
add_case("cumsum transposed dim 1 f32", {"op": "cumsum", "dim": 1}, {"x": rnd([5, 6], layout="transposed")})
add_case("sum of 0-d f32", {"op": "sum"}, {"x": rnd([])})
add_case("mean of [1] f32", {"op": "mean"}, {"x": rnd([1])})
add_case("sum int64 dim 0", {"op": "sum", "dim": 0}, {"x": ix}, grad=False)
# sums of bool, uint8 and int32 are int64, like torch's
bx = (torch.rand(4, 6, generator=GEN) > 0.5, "contiguous")
add_case("sum bool dim 1", {"op": "sum", "dim": 1}, {"x": bx}, grad=False)
add_case("sum int32 all", {"op": "sum"}, {"x": (ix[0].to(torch.int32), "contiguous")}, grad=False)
add_case("cumsum bool dim 1", {"op": "cumsum", "dim": 1}, {"x": bx}, grad=False)
# an empty dim list reduces every dimension (torch 1.13)
add_case("sum dim [] keepdim", {"op": "sum", "dim": [], "keepdim": True}, {"x": rnd([3, 4])})
add_case("mean dim []", {"op": "mean", "dim": []}, {"x": rnd([3, 4])})
add_case("cumsum int64 dim 1", {"op": "cumsum", "dim": 1}, {"x": ix}, grad=False)

# shapes and views (exact: they only move values)
add_case("view [3,4,5] -> [12,5]", {"op": "view", "shape": [12, 5]}, {"x": rnd([3, 4, 5])})
add_case("view -1", {"op": "view", "shape": [2, -1, 5]}, {"x": rnd([3, 4, 5])})
add_case("reshape transposed (copies)", {"op": "reshape", "shape": [-1]}, {"x": rnd([4, 6], layout="transposed")})
add_case("reshape [] -> [1,1]", {"op": "reshape", "shape": [1, 1]}, {"x": rnd([])})
add_case("transpose 0 2", {"op": "transpose", "dim0": 0, "dim1": 2}, {"x": rnd([2, 3, 4])})
add_case("permute 2 0 1 bf16", {"op": "permute", "dims": [2, 0, 1]}, {"x": rnd([2, 3, 4], bf16)})
add_case("expand [3,1,5] -> [2,3,4,5]", {"op": "expand", "shape": [2, 3, 4, 5]}, {"x": rnd([3, 1, 5])})
add_case("expand -1 keeps", {"op": "expand", "shape": [-1, 6]}, {"x": rnd([4, 1])})
add_case("expand [] -> [3,2]", {"op": "expand", "shape": [3, 2]}, {"x": rnd([])})
add_case("squeeze all", {"op": "squeeze"}, {"x": rnd([1, 3, 1, 4])})
add_case("squeeze dim 2", {"op": "squeeze", "dim": 2}, {"x": rnd([1, 3, 1, 4])})
add_case("squeeze dim of size > 1 is a no-op", {"op": "squeeze", "dim": 1}, {"x": rnd([1, 3, 1, 4])})
add_case("unsqueeze -1", {"op": "unsqueeze", "dim": -1}, {"x": rnd([3, 4])})
add_case("unsqueeze 1 transposed", {"op": "unsqueeze", "dim": 1}, {"x": rnd([3, 4], layout="transposed")})
add_case("flatten 1..2", {"op": "flatten", "start": 1, "end": 2}, {"x": rnd([2, 3, 4, 2])})
add_case("flatten all transposed", {"op": "flatten"}, {"x": rnd([3, 4], layout="transposed")})
add_case("narrow dim 1", {"op": "narrow", "dim": 1, "start": 1, "length": 2}, {"x": rnd([3, 5, 2])})
add_case("narrow negative start", {"op": "narrow", "dim": -1, "start": -3, "length": 2}, {"x": rnd([4, 6])})
add_case("select dim 1 index -1", {"op": "select", "dim": 1, "index": -1}, {"x": rnd([3, 5, 2])})
add_case("select dim 0 transposed", {"op": "select", "dim": 0, "index": 2}, {"x": rnd([4, 3], layout="transposed")})
add_case("split size 2 dim 1", {"op": "split", "size": 2, "dim": 1}, {"x": rnd([3, 5])})
add_case("split sizes [1,3] dim 0", {"op": "split", "size": [1, 3], "dim": 0}, {"x": rnd([4, 3])})
add_case("chunk 3 dim -1", {"op": "chunk", "chunks": 3, "dim": -1}, {"x": rnd([2, 7])})
add_case("chunk 4 of 6", {"op": "chunk", "chunks": 4, "dim": 0}, {"x": rnd([6, 2], bf16)})
add_case("cat dim 1", {"op": "cat", "list": ["x", "y", "z"], "dim": 1},
         {"x": rnd([3, 2]), "y": rnd([3, 4], layout="transposed"), "z": rnd([3, 1])})
add_case("cat promotes bf16 and f32", {"op": "cat", "list": ["x", "y"], "dim": 1},
         {"x": rnd([2, 3], bf16), "y": rnd([2, 2])})
add_case("cat dim 0 bf16", {"op": "cat", "list": ["x", "y"], "dim": 0}, {"x": rnd([2, 3], bf16), "y": rnd([1, 3], bf16)})
add_case("stack dim 1", {"op": "stack", "list": ["x", "y", "z"], "dim": 1},
         {"x": rnd([3, 4]), "y": rnd([3, 4], layout="transposed"), "z": rnd([3, 4])})
add_case("stack dim -1", {"op": "stack", "list": ["x", "y"], "dim": -1}, {"x": rnd([2, 3]), "y": rnd([2, 3])})
add_case("contiguous of transposed", {"op": "contiguous"}, {"x": rnd([3, 5], layout="transposed")})

# matmul family
for dt, dn in [(f32, "f32"), (bf16, "bf16")]:
    add_case(f"matmul 1-D @ 1-D {dn}", {"op": "matmul"}, {"x": rnd([5], dt), "y": rnd([5], dt)})
    add_case(f"matmul 1-D @ 2-D {dn}", {"op": "matmul"}, {"x": rnd([5], dt), "y": rnd([5, 7], dt)})
    add_case(f"matmul 2-D @ 1-D {dn}", {"op": "matmul"}, {"x": rnd([7, 5], dt), "y": rnd([5], dt)})
    add_case(f"matmul 2-D [7,13]@[13,6] {dn}", {"op": "matmul"}, {"x": rnd([7, 13], dt), "y": rnd([13, 6], dt)})
    add_case(f"matmul batched {dn}", {"op": "matmul"}, {"x": rnd([3, 4, 5], dt), "y": rnd([3, 5, 6], dt)})
    add_case(f"matmul broadcast batch {dn}", {"op": "matmul"}, {"x": rnd([2, 1, 4, 5], dt), "y": rnd([3, 5, 6], dt)})
    add_case(f"matmul [B,S,K]@[K,N] {dn}", {"op": "matmul"}, {"x": rnd([2, 3, 5], dt), "y": rnd([5, 4], dt)})
    add_case(f"matmul transposed operands {dn}", {"op": "matmul"},
             {"x": rnd([4, 5], dt, layout="transposed"), "y": rnd([5, 3], dt, layout="transposed")})
    add_case(f"bmm {dn}", {"op": "bmm"}, {"x": rnd([3, 4, 5], dt), "y": rnd([3, 5, 2], dt)})
    add_case(f"linear with bias {dn}", {"op": "linear"}, {"x": rnd([2, 3, 5], dt), "w": rnd([4, 5], dt), "b": rnd([4], dt)})
    add_case(f"linear without bias {dn}", {"op": "linear"}, {"x": rnd([3, 5], dt), "w": rnd([4, 5], dt)})
add_case("matmul 1-D @ 3-D f32", {"op": "matmul"}, {"x": rnd([5]), "y": rnd([2, 5, 3])})
add_case("matmul 3-D @ 1-D f32", {"op": "matmul"}, {"x": rnd([2, 3, 5]), "y": rnd([5])})
add_case("matmul 3-D @ 2-D transposed f32", {"op": "matmul"}, {"x": rnd([2, 3, 5]), "y": rnd([5, 4], layout="transposed")})
add_case("matmul batched transposed f32", {"op": "matmul"},
         {"x": rnd([2, 4, 5], layout="transposed"), "y": rnd([2, 5, 3], layout="transposed")})
add_case("matmul 2-D @ 3-D broadcast f32", {"op": "matmul"}, {"x": rnd([4, 5]), "y": rnd([3, 5, 2])})
add_case("matmul [3,5,33] @ [33,7] f32", {"op": "matmul"}, {"x": rnd([3, 5, 33]), "y": rnd([33, 7])})
add_case("bmm transposed f32", {"op": "bmm"}, {"x": rnd([2, 3, 4]), "y": rnd([2, 4, 3], layout="transposed")})
add_case("linear transposed weight f32", {"op": "linear"},
         {"x": rnd([4, 6]), "w": rnd([5, 6], layout="transposed"), "b": rnd([5])})

# dtype casts: float32 -> bfloat16 must round to nearest even (1 + 2^-8 is a tie that rounds to
# 1, 1 + 3 * 2^-8 one that rounds up)
ties = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), 3.0e38, -2.5e-40, 0.1, 1.0 / 3.0, 65504.0,
                     1.0e-3, -7.75])
add_case("to bfloat16 rounding f32", {"op": "to", "dtype": "bfloat16"}, {"x": (ties, "contiguous")})
add_case("to bfloat16 f32", {"op": "to", "dtype": "bfloat16"}, {"x": rnd([7, 13])})
add_case("to float32 bf16", {"op": "to", "dtype": "float32"}, {"x": rnd([7, 13], bf16)})
add_case("to float64 f32", {"op": "to", "dtype": "float64"}, {"x": rnd([4, 5])})
add_case("to float32 transposed bf16", {"op": "to", "dtype": "float32"}, {"x": rnd([4, 5], bf16, layout="transposed")})
add_case("to int64 truncates f32", {"op": "to", "dtype": "int64"}, {"x": rnd([4, 5], scale=4.0)}, grad=False)
add_case("to bool f32", {"op": "to", "dtype": "bool"}, {"x": rnd([3, 4], kind="int")}, grad=False)
add_case("to float32 int64", {"op": "to", "dtype": "float32"}, {"x": ix}, grad=False)


# ---- size: float data written with the fewest digits that still round-trip -------------------

def shorten(ft):
    dt = ft["dtype"]
    if dt not in ("float32", "bfloat16"):
        return
    vals = ft["data"]
    orig = torch.tensor(vals, dtype=f64)
    assert torch.isfinite(orig).all(), "fixtures must not contain NaN or inf (JSON cannot hold them)"
    target = TORCH_DTYPES[dt]
    out = list(vals)
    todo = list(range(len(vals)))
    for digits in range(1, 18):
        if not todo:
            break
        strs = [f"{vals[i]:.{digits}g}" for i in todo]
        cand = torch.tensor([float(s) for s in strs], dtype=f64)
        # the test parses doubles and converts through float32 (Float32Array), then to bf16
        back = cand.to(f32).to(target).to(f64)
        ok = back == orig[todo]
        left = []
        for j, i in enumerate(todo):
            if ok[j]:
                out[i] = float(strs[j])
            else:
                left.append(i)
        todo = left
    ft["data"] = out


for c in cases:
    for group in ("inputs", "outputs", "grads"):
        for ft in c[group].values():
            shorten(ft)

save("core", cases, "fixtures_core.py")
