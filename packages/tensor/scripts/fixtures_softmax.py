"""PyTorch reference cases for the softmax family: softmax, log_softmax, cross_entropy, nll_loss.

Writes test/fixtures/softmax.json (see fixture_util.py for the format). Every case stores the
random upstream gradient as the input "gout" and the gradients of the differentiable inputs.
bfloat16 references are computed in float32 from the bfloat16 values and rounded once at the
end, which is what the fused kernels do; the gradients are rounded the same way.
Run: /usr/bin/python3 scripts/fixtures_softmax.py
"""
import torch
import torch.nn.functional as F

from fixture_util import compact, enc, make_input, save

gen = torch.Generator().manual_seed(20240611)
cases = []


def upcast(t):
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def softmax_case(name, op, shape, dim, dtype=torch.float32, layout="contiguous", scale=2.0):
    x = make_input(shape, dtype, layout, gen, scale=scale)
    fn = F.softmax if op == "softmax" else F.log_softmax
    y = fn(upcast(x), dim).to(dtype)
    gout = torch.randn(tuple(y.shape), generator=gen).to(dtype)
    y.backward(gout)
    cases.append({
        "name": name,
        "args": {"op": op, "dim": dim},
        "inputs": {"x": enc(x, layout), "gout": enc(gout)},
        "outputs": {"y": enc(y)},
        "grads": {"x": enc(x.grad)},
    })


def targets(shape, classes, ignore=None, n_ignored=0):
    t = torch.randint(0, classes, shape, generator=gen)
    if ignore is not None and n_ignored > 0:
        flat = t.view(-1)
        idx = torch.randperm(flat.numel(), generator=gen)[:n_ignored]
        flat[idx] = ignore
    return t


def loss_case(name, op, shape, dtype=torch.float32, layout="contiguous", reduction="mean", ignore_index=-100,
              n_ignored=0, label_smoothing=0.0, target_int32=False):
    classes = shape[1] if len(shape) > 1 else shape[0]
    tshape = [shape[0]] + list(shape[2:]) if len(shape) > 1 else []
    t = targets(tshape, classes, ignore_index, n_ignored)
    if op == "crossEntropy":
        x = make_input(shape, dtype, layout, gen, scale=2.0)
        y = F.cross_entropy(upcast(x), t, ignore_index=ignore_index, reduction=reduction,
                            label_smoothing=label_smoothing).to(dtype)
    else:
        # log-probabilities as the leaf, as a model's log_softmax output would be
        base = F.log_softmax(torch.randn(*shape, generator=gen) * 2.0, 1 if len(shape) > 1 else 0)
        if layout == "transposed":
            x = base.transpose(-1, -2).contiguous().to(dtype).transpose(-1, -2).requires_grad_(True)
        else:
            x = base.to(dtype).requires_grad_(True)
        y = F.nll_loss(upcast(x), t, ignore_index=ignore_index, reduction=reduction).to(dtype)
    gout = torch.randn(tuple(y.shape), generator=gen).to(dtype)
    y.backward(gout)
    args = {"op": op, "reduction": reduction, "ignoreIndex": ignore_index}
    if op == "crossEntropy":
        args["labelSmoothing"] = label_smoothing
    if target_int32:
        args["targetDtype"] = "int32"
    cases.append({
        "name": name,
        "args": args,
        "inputs": {"x": enc(x, layout), "target": enc(t), "gout": enc(gout)},
        "outputs": {"y": enc(y)},
        "grads": {"x": enc(x.grad)},
    })


for op in ("softmax", "logSoftmax"):
    softmax_case(f"{op} f32 [7,13] dim -1", op, [7, 13], -1)
    softmax_case(f"{op} f32 [3,5,33] dim 1", op, [3, 5, 33], 1)
    softmax_case(f"{op} f32 [3,5,33] dim 0", op, [3, 5, 33], 0)
    softmax_case(f"{op} f32 [4,1] dim -1 (rows of length 1)", op, [4, 1], -1)
    softmax_case(f"{op} f32 [6,9] transposed dim -1", op, [6, 9], -1, layout="transposed")
    softmax_case(f"{op} f32 [2,6,9] transposed dim 1", op, [2, 6, 9], 1, layout="transposed")
    softmax_case(f"{op} f32 [3,130] large logits", op, [3, 130], -1, scale=30.0)
    softmax_case(f"{op} f32 [11] 1-d", op, [11], 0)
    softmax_case(f"{op} bf16 [7,13] dim -1", op, [7, 13], -1, torch.bfloat16)
    softmax_case(f"{op} bf16 [3,5,33] dim 1", op, [3, 5, 33], 1, torch.bfloat16)
    softmax_case(f"{op} bf16 [6,9] transposed dim -1", op, [6, 9], -1, torch.bfloat16, layout="transposed")

ce = "crossEntropy"
loss_case("ce f32 [8,11] mean", ce, [8, 11])
loss_case("ce f32 [8,11] sum", ce, [8, 11], reduction="sum")
loss_case("ce f32 [8,11] none", ce, [8, 11], reduction="none")
loss_case("ce f32 [10,7] mean ignore -100", ce, [10, 7], n_ignored=3)
loss_case("ce f32 [10,7] none ignore 3", ce, [10, 7], reduction="none", ignore_index=3, n_ignored=2)
loss_case("ce f32 [10,7] mean smoothing 0.1", ce, [10, 7], label_smoothing=0.1)
loss_case("ce f32 [10,7] mean smoothing 0.2 ignore", ce, [10, 7], label_smoothing=0.2, n_ignored=4)
loss_case("ce f32 [10,7] sum smoothing 0.3 ignore", ce, [10, 7], reduction="sum", label_smoothing=0.3, n_ignored=2)
loss_case("ce f32 [10,7] none smoothing 0.15 ignore", ce, [10, 7], reduction="none", label_smoothing=0.15,
          n_ignored=3)
loss_case("ce f32 [13] scalar target", ce, [13])
loss_case("ce f32 [13] scalar target none", ce, [13], reduction="none")
loss_case("ce f32 [4,5,3,2] spatial mean ignore", ce, [4, 5, 3, 2], n_ignored=5)
loss_case("ce f32 [4,5,6] spatial none smoothing", ce, [4, 5, 6], reduction="none", label_smoothing=0.1)
loss_case("ce f32 [9,7] transposed mean", ce, [9, 7], layout="transposed")
loss_case("ce f32 [6,1] one class", ce, [6, 1])
loss_case("ce f32 [8,11] int32 target", ce, [8, 11], target_int32=True, n_ignored=2)
loss_case("ce f32 [4,129] mean smoothing", ce, [4, 129], label_smoothing=0.05)
loss_case("ce bf16 [6,17] mean", ce, [6, 17], torch.bfloat16)
loss_case("ce bf16 [6,17] none smoothing ignore", ce, [6, 17], torch.bfloat16, reduction="none",
          label_smoothing=0.1, n_ignored=2)

nll = "nllLoss"
loss_case("nll f32 [8,11] mean", nll, [8, 11])
loss_case("nll f32 [8,11] sum ignore", nll, [8, 11], reduction="sum", n_ignored=3)
loss_case("nll f32 [8,11] none ignore 2", nll, [8, 11], reduction="none", ignore_index=2, n_ignored=2)
loss_case("nll f32 [13] scalar target", nll, [13])
loss_case("nll f32 [3,4,5] spatial mean", nll, [3, 4, 5], n_ignored=2)
loss_case("nll f32 [7,6] transposed none", nll, [7, 6], layout="transposed", reduction="none")
loss_case("nll bf16 [6,9] mean", nll, [6, 9], torch.bfloat16, n_ignored=1)

compact(cases)
save("softmax", cases, "fixtures_softmax.py")
