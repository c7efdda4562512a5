"""Fixtures for the optimizers: torch.optim.AdamW and SGD trajectories, clip_grad_norm_.

Writes test/fixtures/optim.json. Run with /usr/bin/python3 (Debian python3-torch).

Optimizer cases: two parameters ([4, 3] and [5]) stepped 5 times, each step with fresh random
gradients; inputs hold the initial parameters p{i} and the gradients g{i}_{step}, outputs the
parameters after every step p{i}_{step} and the final state tensors. args.lrs, when present, is
the learning rate set on the group before each step.
Clip cases: three gradients; outputs the total norm and the clipped gradients.
"""
import math

import torch

from fixture_util import enc, save

SHAPES = [(4, 3), (5,)]
STEPS = 5


def trajectory(name, opt_cls, kwargs, seed, lrs=None):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(*s, generator=gen).requires_grad_(True) for s in SHAPES]
    inputs = {f"p{i}": enc(p) for i, p in enumerate(params)}
    outputs = {}
    opt = opt_cls(params, **kwargs)
    for step in range(STEPS):
        if lrs is not None:
            opt.param_groups[0]["lr"] = lrs[step]
        for i, p in enumerate(params):
            g = torch.randn(*p.shape, generator=gen)
            p.grad = g.clone()
            inputs[f"g{i}_{step}"] = enc(g)
        opt.step()
        for i, p in enumerate(params):
            outputs[f"p{i}_{step}"] = enc(p)
    for i, p in enumerate(params):
        for key, value in opt.state[p].items():
            if torch.is_tensor(value) and value.shape == p.shape:
                outputs[f"state{i}_{key}"] = enc(value)
    args = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    args["optimizer"] = opt_cls.__name__
    args["steps"] = STEPS
    if lrs is not None:
        args["lrs"] = lrs
    return {"name": name, "args": args, "inputs": inputs, "outputs": outputs, "grads": {}}


def clip_case(name, max_norm, norm_type, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in [(3, 4), (6,), (2, 2, 2)]:
        p = torch.zeros(*s, requires_grad=True)
        p.grad = torch.randn(*s, generator=gen) * scale
        params.append(p)
    inputs = {f"g{i}": enc(p.grad) for i, p in enumerate(params)}
    total = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
    outputs = {"total": enc(total)}
    for i, p in enumerate(params):
        outputs[f"g{i}"] = enc(p.grad)
    nt = "inf" if math.isinf(norm_type) else norm_type
    return {"name": name, "args": {"maxNorm": max_norm, "normType": nt}, "inputs": inputs, "outputs": outputs,
            "grads": {}}


def main():
    cases = [
        trajectory("adamw_wd", torch.optim.AdamW, dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1), 1),
        trajectory("adamw_no_wd", torch.optim.AdamW, dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0), 2),
        trajectory("adamw_lr_schedule", torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.01), 3,
                   lrs=[1e-3, 2e-3, 3e-3, 2e-3, 5e-4]),
        trajectory("sgd_plain", torch.optim.SGD, dict(lr=0.1), 4),
        trajectory("sgd_momentum", torch.optim.SGD, dict(lr=0.05, momentum=0.9), 5),
        trajectory("sgd_dampening_wd", torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01), 6),
        trajectory("sgd_nesterov_wd", torch.optim.SGD, dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.05), 7),
        clip_case("clip_norm2", 1.0, 2.0, 10),
        clip_case("clip_norm1", 2.0, 1.0, 11),
        clip_case("clip_norm_inf", 0.5, math.inf, 12),
        clip_case("clip_norm3", 0.7, 3.0, 13),
        clip_case("clip_no_clip", 100.0, 2.0, 14),
        clip_case("clip_large_values", 1.0, 2.0, 15, scale=1e4),
    ]
    save("optim", cases, "fixtures_optim.py")


if __name__ == "__main__":
    main()
