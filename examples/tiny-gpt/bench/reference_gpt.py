"""The tiny-gpt model written in PyTorch 1.13, timed per optimizer step (the gpt-train-step
reference of bench/run.mjs). Same architecture: RMSNorm, causal attention with rotate-half RoPE,
SwiGLU MLP with fused gate/up, tied output layer; AdamW and grad-norm clipping; fp32.

usage: reference_gpt.py LAYERS HIDDEN HEADS SEQ BATCH VOCAB THREADS STEPS
prints {"value": seconds_per_step, "unit": "s", "name": ...}. Run with /usr/bin/python3.
"""
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Layer(nn.Module):
    def __init__(self, h, heads, ffn):
        super().__init__()
        self.heads = heads
        self.ln1 = RMSNorm(h)
        self.qkv = nn.Linear(h, 3 * h, bias=False)
        self.proj = nn.Linear(h, h, bias=False)
        self.ln2 = RMSNorm(h)
        self.fc1 = nn.Linear(h, 2 * ffn, bias=False)
        self.fc2 = nn.Linear(ffn, h, bias=False)
        self.ffn = ffn

    def forward(self, x, cos, sin, mask):
        b, s, h = x.shape
        hd = h // self.heads
        qkv = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        att = (q @ k.transpose(-1, -2)) * (hd ** -0.5) + mask
        o = torch.softmax(att, dim=-1) @ v
        x = x + self.proj(o.transpose(1, 2).reshape(b, s, h))
        gate, up = self.fc1(self.ln2(x)).split(self.ffn, dim=-1)
        return x + self.fc2(F.silu(gate) * up)


class GPT(nn.Module):
    def __init__(self, vocab, layers, h, heads, seq):
        super().__init__()
        ffn = math.ceil(h * 8 / 3 / 8) * 8
        self.emb = nn.Embedding(vocab, h)
        self.layers = nn.ModuleList([Layer(h, heads, ffn) for _ in range(layers)])
        self.norm = RMSNorm(h)
        hd = h // heads
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        f = torch.outer(torch.arange(seq).float(), inv)
        e = torch.cat((f, f), dim=-1)
        self.register_buffer("cos", e.cos())
        self.register_buffer("sin", e.sin())
        self.register_buffer("mask", torch.full((seq, seq), float("-inf")).triu(1))

    def forward(self, idx, labels):
        x = self.emb(idx)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin, self.mask)
        logits = self.norm(x) @ self.emb.weight.t()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


def main():
    layers, h, heads, seq, batch, vocab, threads, steps = map(int, sys.argv[1:9])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT(vocab, layers, h, heads, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    idx = torch.randint(0, vocab, (batch, seq))
    labels = torch.randint(0, vocab, (batch, seq))

    def step():
        loss = model(idx, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    print(json.dumps({"value": times[len(times) // 2], "unit": "s", "name": "PyTorch 1.13 CPU (same model)"}))


if __name__ == "__main__":
    main()
