"""Reference timings for bench/run.mjs, measured in the same run on the same threads.

usage: reference.py matmul N THREADS        -> GFLOP/s of numpy (OpenBLAS) float32 N x N matmul
       reference.py gemm-bf16 OP:MxKxN THREADS -> GFLOP/s of PyTorch bfloat16 linear or matmul
       reference.py attention MODE THREADS  -> ms per forward+backward of PyTorch attention
OP is linear (x [M, K] @ W^T, W [N, K]) or matmul ([M, K] @ [K, N]).
MODE is causal (B=1, H=8, S=1024, D=64) or varlen (the same tokens as 4 packed sequences).
Run with /usr/bin/python3 (Debian python3-numpy and python3-torch).
"""
import json
import sys
import time


def best_of(fn, reps):
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul(n, threads):
    import numpy as np
    try:
        from threadpoolctl import threadpool_limits  # optional
        threadpool_limits(threads)
    except ImportError:
        pass
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    reps = 20 if n <= 512 else 8 if n <= 1024 else 3
    t = best_of(lambda: a @ b, reps)
    return {"value": 2 * n ** 3 / t / 1e9, "unit": "GFLOP/s", "name": "numpy (OpenBLAS)"}


def gemm_bf16(spec, threads):
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    op, shape = spec.split(":")
    m, k, n = (int(v) for v in shape.split("x"))
    x = torch.randn(m, k).bfloat16()
    if op == "linear":
        w = torch.randn(n, k).bfloat16()
        fn = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
    else:
        w = torch.randn(k, n).bfloat16()
        fn = lambda: torch.matmul(x, w)  # noqa: E731
    t = best_of(fn, 10 if m * k * n <= 2 ** 31 else 5)
    return {"value": 2 * m * k * n / t / 1e9, "unit": "GFLOP/s", "name": f"PyTorch 1.13 bf16 {op}"}


def attention(mode, threads):
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    B, H, S, D = 1, 8, 1024, 64
    q = torch.randn(B, H, S, D, requires_grad=True)
    k = torch.randn(B, H, S, D, requires_grad=True)
    v = torch.randn(B, H, S, D, requires_grad=True)
    g = torch.randn(B, H, S, D)
    if mode == "causal":
        mask = torch.ones(S, S, dtype=torch.bool).tril()
    else:
        # 4 packed sequences: causal attention inside each block only
        lens = [400, 300, 200, 124]
        mask = torch.zeros(S, S, dtype=torch.bool)
        s = 0
        for n in lens:
            mask[s:s + n, s:s + n] = torch.ones(n, n, dtype=torch.bool).tril()
            s += n
    bias = torch.zeros(S, S).masked_fill(~mask, float("-inf"))
    scale = D ** -0.5

    def step():
        # torch 1.13 has no fused scaled_dot_product_attention: this is its math path
        p = torch.softmax(q @ k.transpose(-1, -2) * scale + bias, dim=-1)
        o = p @ v
        o.backward(g)
        q.grad = k.grad = v.grad = None

    t = best_of(step, 5)
    return {"value": t * 1000, "unit": "ms", "name": "PyTorch 1.13 attention (math)"}


if __name__ == "__main__":
    kind, arg, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if kind == "matmul":
        out = matmul(int(arg), threads)
    elif kind == "gemm-bf16":
        out = gemm_bf16(arg, threads)
    else:
        out = attention(arg, threads)
    print(json.dumps(out))
