# The PyTorch side of `pnpm bench` for @megapatch/models: a Qwen3-architecture model (as transformers
# defines it: GQA, per-head q/k RMSNorm, RoPE, SwiGLU, tied embeddings) timed on the same threads as
# the megapatch run: one training step (forward, backward, AdamW) and KV-cache decoding.
# Usage: python3 torch_qwen3.py '<json config>' ; prints one JSON object.
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
torch.manual_seed(0)
H, FFN, L = cfg["hidden"], cfg["ffn"], cfg["layers"]
NH, NKV, D, V = cfg["heads"], cfg["kvHeads"], cfg["headDim"], cfg["vocab"]
EPS, THETA = 1e-6, 1e6


def rms(x, w):
    v = x.float().pow(2).mean(-1, keepdim=True)
    return w * (x.float() * torch.rsqrt(v + EPS)).to(x.dtype)


def rope(pos):
    inv = 1.0 / (THETA ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    f = pos[:, None].float() * inv[None]
    e = torch.cat([f, f], -1)
    return e.cos(), e.sin()


def rot(x, cos, sin):
    h = x.shape[-1] // 2
    r = torch.cat([-x[..., h:], x[..., :h]], -1)
    return (x * cos + r * sin).to(x.dtype)


class Layer(torch.nn.Module):
    def __init__(s):
        super().__init__()
        s.ln1 = torch.nn.Parameter(torch.ones(H))
        s.ln2 = torch.nn.Parameter(torch.ones(H))
        s.q = torch.nn.Linear(H, NH * D, bias=False)
        s.k = torch.nn.Linear(H, NKV * D, bias=False)
        s.v = torch.nn.Linear(H, NKV * D, bias=False)
        s.o = torch.nn.Linear(NH * D, H, bias=False)
        s.qn = torch.nn.Parameter(torch.ones(D))
        s.kn = torch.nn.Parameter(torch.ones(D))
        s.gate = torch.nn.Linear(H, FFN, bias=False)
        s.up = torch.nn.Linear(H, FFN, bias=False)
        s.down = torch.nn.Linear(FFN, H, bias=False)

    def forward(s, x, cos, sin, cache=None):
        b, n, _ = x.shape
        h = rms(x, s.ln1)
        q = rms(s.q(h).view(b, n, NH, D), s.qn).transpose(1, 2)
        k = rms(s.k(h).view(b, n, NKV, D), s.kn).transpose(1, 2)
        v = s.v(h).view(b, n, NKV, D).transpose(1, 2)
        q, k = rot(q, cos, sin), rot(k, cos, sin)
        causal = True
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], 2)
                v = torch.cat([cache["v"], v], 2)
                causal = False  # one new token sees everything cached
            cache["k"], cache["v"] = k, v
        k = k.repeat_interleave(NH // NKV, 1)
        v = v.repeat_interleave(NH // NKV, 1)
        # torch 1.13 has no scaled_dot_product_attention: the eager softmax(q kᵀ/√d) v
        sc = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        if causal and n > 1:
            sc = sc.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        a = torch.softmax(sc.float(), -1).to(q.dtype) @ v
        x = x + s.o(a.transpose(1, 2).reshape(b, n, NH * D))
        h = rms(x, s.ln2)
        return x + s.down(F.silu(s.gate(h)) * s.up(h))


class Model(torch.nn.Module):
    def __init__(s):
        super().__init__()
        s.emb = torch.nn.Embedding(V, H)
        s.layers = torch.nn.ModuleList([Layer() for _ in range(L)])
        s.norm = torch.nn.Parameter(torch.ones(H))

    def forward(s, ids, start=0, caches=None):
        pos = torch.arange(start, start + ids.shape[1])
        cos, sin = rope(pos)
        x = s.emb(ids)
        for i, l in enumerate(s.layers):
            x = l(x, cos, sin, None if caches is None else caches[i])
        return F.linear(rms(x, s.norm), s.emb.weight)


def train_step_seconds(dtype):
    m = Model().to(dtype)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    ids = torch.randint(0, V, (1, cfg["seq"]))
    labels = torch.randint(0, V, (1, cfg["seq"]))
    times = []
    for i in range(cfg["steps"] + 1):
        t0 = time.perf_counter()
        loss = F.cross_entropy(m(ids).float().view(-1, V), labels.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i > 0:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def decode_tokens_per_second(dtype):
    m = Model().to(dtype)
    prompt = torch.randint(0, V, (1, cfg["prompt"]))
    with torch.no_grad():
        for rep in range(2):
            caches = [{} for _ in range(L)]
            t0 = time.perf_counter()
            logits = m(prompt, 0, caches)
            tok = logits[:, -1].argmax(-1, keepdim=True)
            for j in range(cfg["newTokens"] - 1):
                logits = m(tok, cfg["prompt"] + j, caches)
                tok = logits[:, -1].argmax(-1, keepdim=True)
            dt = time.perf_counter() - t0
    return cfg["newTokens"] / dt


out = {
    "torch": torch.__version__,
    "trainFp32": train_step_seconds(torch.float32),
    "trainBf16": train_step_seconds(torch.bfloat16),
    "decodeFp32": decode_tokens_per_second(torch.float32),
}
print(json.dumps(out))
