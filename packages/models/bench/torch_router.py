# The PyTorch side of bench/router.mjs: a MoE router's forward as Megatron computes it (fp32 router
# GEMM, softmax or sigmoid scores, top-k on the biased scores with group-limited routing, the routing
# weights gathered from the unbiased scores, normalised and scaled, the per-expert counts and the
# pairs sorted by expert with a stable argsort; with a capacity, Megatron's capacity mask and the
# pairs of the transposed map), timed on the same threads.
# Usage: python3 torch_router.py '<json config>' ; prints one JSON object.
import json
import math
import sys
import time

import torch

cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
torch.manual_seed(0)
T, H, ITERS = cfg["tokens"], cfg["hidden"], cfg["iters"]


def route(x, w, bias, r):
    E, k = r["numExperts"], r["routerTopk"]
    logits = x.float() @ w.float().t()
    scores = logits.softmax(-1) if r["scoreFunction"] == "softmax" else logits.sigmoid()
    sel = scores + bias if bias is not None else scores
    G, gk = r.get("numGroups", 1), r.get("groupTopk", 1)
    if G > 1 and gk < G:
        grouped = sel.view(T, G, E // G)
        gs = grouped.topk(2, -1).values.sum(-1) if bias is not None else grouped.max(-1).values
        best = gs.topk(gk, -1).indices
        mask = torch.zeros(T, G, dtype=torch.bool).scatter_(1, best, True)
        sel = grouped.masked_fill(~mask.unsqueeze(-1), float("-inf")).view(T, E)
    idx = sel.topk(k, -1).indices
    probs = scores.gather(1, idx)
    if r.get("normTopkProb") and k > 1:
        probs = probs / (probs.sum(-1, keepdim=True) + (1e-20 if r["scoreFunction"] == "sigmoid" else 0))
    probs = probs * r.get("routedScalingFactor", 1)
    cap = r.get("capacity")
    if cap is not None:
        # Megatron's capacity: the weights scattered to [T, E], each expert's best `capacity` tokens
        # by topk down the tokens; padded, the mask is the map (weight 0 where not routed)
        capacity = min(math.ceil(T * k / E * cap["capacityFactor"]), T)
        routing_probs = torch.zeros(T, E).scatter(1, idx, probs)
        routing_map = torch.zeros(T, E, dtype=torch.bool).scatter(1, idx, True)
        top = routing_probs.topk(capacity, dim=0, sorted=False).indices
        mask = torch.zeros(T, E, dtype=torch.bool).scatter(0, top, True)
        routing_map = mask if cap["padToCapacity"] else routing_map & mask
        tokens_t = torch.arange(T).unsqueeze(0).expand(E, T)
        order = tokens_t.masked_select(routing_map.t().contiguous())  # pairs by expert, then token
        return probs, routing_map.sum(0), order
    flat = idx.reshape(-1)
    counts = torch.bincount(flat, minlength=E)
    order = torch.sort(flat, stable=True).indices  # pairs by expert, then token
    return probs, counts, order


out = {"torch": torch.__version__, "ms": {}}
x = torch.randn(T, H, requires_grad=False)
for r in cfg["rules"]:
    E = r["numExperts"]
    w = (torch.randn(E, H) * 0.02).requires_grad_(True)
    bias = torch.zeros(E) if r.get("expertBias") else None
    times = []
    for i in range(ITERS + 2):
        t0 = time.perf_counter()
        route(x, w, bias, r)
        t1 = time.perf_counter()
        if i >= 2:
            times.append((t1 - t0) * 1000)
    out["ms"][r["name"]] = sorted(times)[len(times) // 2]
print(json.dumps(out))
