# One rank of the reference all-reduce benchmark: torch.distributed with the gloo backend (Debian's
# python3-torch 1.13 links the same system libgloo). Same output as allreduce-worker.mjs.
import json, os, sys, time

import torch
import torch.distributed as dist

sizes = [int(s) for s in sys.argv[1].split(",")] if sys.argv[1] else []
latency_iters = int(sys.argv[2])
torch.set_num_threads(1)
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group(
    "gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", rank=rank, world_size=world
)
out = {"sizes": {}, "latencyUs": None}
for nbytes in sizes:
    t = torch.zeros(nbytes // 4)
    iters = max(3, min(20, round((256 << 20) / nbytes)))
    dist.all_reduce(t)
    times = []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        times.append(time.perf_counter() - t0)
    out["sizes"][str(nbytes)] = sorted(times)[len(times) // 2]
if latency_iters > 0:
    t = torch.zeros(1)
    for _ in range(50):
        dist.all_reduce(t)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(latency_iters):
        dist.all_reduce(t)
    out["latencyUs"] = (time.perf_counter() - t0) * 1e6 / latency_iters
if rank == 0:
    print(json.dumps(out))
dist.destroy_process_group()
