# The PyTorch side of bench/sampling.mjs: one next token from one row of logits as Hugging Face's
# sampling does it (temperature, top-k by torch.topk, top-p by a descending sort and a cumulative
# softmax, then torch.multinomial), on the CPU with the same threads.
# Usage: python3 torch_sampling.py '<json config>' ; prints one JSON object.
import json
import sys
import time

import torch

cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
g = torch.Generator().manual_seed(0)


def sample(logits, t, k, p):
    x = logits / t
    if k > 0:
        kth = torch.topk(x, k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p < 1:
        s, idx = torch.sort(x, descending=True)
        cum = s.softmax(-1).cumsum(-1)
        drop = cum - s.softmax(-1) >= p
        x = x.scatter(0, idx, s.masked_fill(drop, float("-inf")))
    return int(torch.multinomial(x.softmax(-1), 1, generator=g))


out = {"torch": torch.__version__, "ms": {}}
for case in cfg["cases"]:
    logits = torch.randn(case["vocab"], generator=g) * 4
    times = []
    for i in range(cfg["iters"] + 2):
        t0 = time.perf_counter()
        sample(logits, case["temperature"], case.get("topK", 0), case.get("topP", 1.0))
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1000)
    out["ms"][case["name"]] = sorted(times)[len(times) // 2]
print(json.dumps(out))
