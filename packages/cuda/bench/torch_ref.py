#!/usr/bin/env python3
"""The PyTorch side of the GPU bench (gpu-bench.sh runs it beside ours.mts): the same cases.

  gemm   torch.matmul on bf16 operands (transposed views where cases.json says so)
  grouped  MoE experts' GEMMs, bf16, uneven rows per expert (forward, and forward + backward): a
         loop of torch.matmul into each expert's rows of one output (Megatron's SequentialMLP), and torch._grouped_mm where this
         torch has it (one kernel; a failure is reported)
  attn   F.scaled_dot_product_attention, causal, bf16, forced to the flash backend
         (torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION)); GQA through
         enable_gqa=True where the flash backend takes it, else K/V repeated to Hq heads before
         the timed region (the line says which)
  stream a bf16 copy (memory speed, the reference of ours.mts's stream part), torch's RMSNorm and
         SwiGLU forward at the 1B step's shapes
  train  the Llama-style model of cases.json in plain PyTorch (RMSNorm, RoPE, fused QKV, GQA
         attention through SDPA with torch's own backend choice, fused gate/up SwiGLU, tied
         embeddings), AMP: fp32 master
         weights, bf16 autocast, fused AdamW with Megatron's groups (no decay on norms) and
         gradient clipping at 1.0, as megapatch's bf16 (Megatron --bf16) does; eager and
         torch.compile (each transformer block compiled, as torchtitan does; compile time kept
         out of the timing; a failure is reported and the run goes on)
  moe-train  the same for cases.json's trainMoe, a Mixtral-style model: each block's MLP is a
         softmax router, the top-2 experts renormalised, and SwiGLU experts run in a loop over the
         experts on their tokens (Hugging Face's Mixtral block, eager), no auxiliary loss
  generate  Hugging Face's LlamaForCausalLM.generate (transformers) on train's model: new
         tokens/s, greedy and top-p (host clock around the call, after a sync)

Timing: CUDA events around a batch of back-to-back calls (a step for train), warm-up first, the
median of many; random inputs. On a CPU or an old torch (the rehearsal: Debian's torch 1.13)
it degrades: host clock, math attention, no compile. One JSON line per case on stdout.

usage: python3 torch_ref.py [gemm] [grouped] [attn] [stream] [train] [moe-train] [generate] [--tiny] [--device cpu|cuda]
env: MEGAPATCH_BENCH_TINY=1, MEGAPATCH_BENCH_MBS, MEGAPATCH_BENCH_CASE_BUDGET_S (default 4),
     MEGAPATCH_BENCH_TORCH_MODES (default "eager,compile"; also "eager-bf16": pure bf16 params)
"""

import contextlib
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ARGS = [a for a in sys.argv[1:] if not a.startswith("--")]
TINY = "--tiny" in sys.argv or os.environ.get("MEGAPATCH_BENCH_TINY") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if "--device" in sys.argv:
    DEVICE = sys.argv[sys.argv.index("--device") + 1]
    ARGS = [a for a in ARGS if a != DEVICE]
CUDA = DEVICE.startswith("cuda")
BUDGET_MS = float(os.environ.get("MEGAPATCH_BENCH_CASE_BUDGET_S", "4")) * 1000
with open(os.path.join(HERE, "cases.json")) as f:
    ALL = json.load(f)
CASES = ALL["tiny" if TINY else "full"]
PEAK = ALL["peakTflops"]
TV = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2] if x.isdigit())


def want(part):
    return not ARGS or part in ARGS


def log(s):
    print(f"[torch {DEVICE}] {s}", file=sys.stderr, flush=True)


def emit(**o):
    print(json.dumps({"side": "torch", "device": DEVICE, "tiny": TINY, **o}), flush=True)


def r4(x):
    return float(f"{x:.4g}")


def sync():
    if CUDA:
        torch.cuda.synchronize()


class Clock:
    """CUDA events on a GPU, the host clock (after nothing to wait for) on the CPU."""

    def __init__(self):
        if CUDA:
            self.e = torch.cuda.Event(enable_timing=True)
        else:
            self.t = None

    def record(self):
        if CUDA:
            self.e.record()
        else:
            self.t = time.perf_counter()
        return self

    def ms_to(self, later):
        if CUDA:
            return self.e.elapsed_time(later.e)
        return (later.t - self.t) * 1000


def time_it(fn, warm=3, min_samples=3, max_samples=25, min_sample_ms=2.0, budget_ms=BUDGET_MS):
    """Median ms per call of fn: samples of `reps` back-to-back calls between two events."""
    for _ in range(warm):
        fn()
    sync()
    a, b = Clock().record(), None
    fn()
    b = Clock().record()
    sync()
    once = a.ms_to(b)
    reps = max(1, min(50, math.ceil(min_sample_ms / max(once, 1e-3))))
    samples = []
    start = time.perf_counter()
    while len(samples) < max_samples:
        if len(samples) >= min_samples and (time.perf_counter() - start) * 1000 > budget_ms:
            break
        a = Clock().record()
        for _ in range(reps):
            fn()
        b = Clock().record()
        sync()
        samples.append(a.ms_to(b) / reps)
    return {
        "ms": statistics.median(samples),
        "minMs": min(samples),
        "maxMs": max(samples),
        "samples": len(samples),
        "reps": reps,
    }


def err_line(e):
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:400]


def env_info():
    info = {"kind": "env", "torch": torch.__version__, "python": sys.version.split()[0]}
    if CUDA:
        p = torch.cuda.get_device_properties(0)
        info.update(
            gpu=p.name,
            sms=p.multi_processor_count,
            memGiB=r4(p.total_memory / 2**30),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    emit(**info)


# -------------------------------------------------------------------------------------------------
def bench_gemm():
    torch.manual_seed(1)
    dt = torch.bfloat16
    for c in CASES["gemm"]:
        M, N, K, ta, tb = c["M"], c["N"], c["K"], c["ta"], c["tb"]
        try:
            As = torch.randn((K, M) if ta else (M, K), device=DEVICE, dtype=dt)
            Bs = torch.randn((N, K) if tb else (K, N), device=DEVICE, dtype=dt)
            A = As.t() if ta else As
            B = Bs.t() if tb else Bs
            rel = None
            if TINY or c["case"] == "square-4096":
                rows = M if TINY else 4
                got = torch.matmul(A, B)[:rows].double().cpu()
                ref = A[:rows].double().cpu() @ B.double().cpu()
                rel = r4(((got - ref).norm() / ref.norm()).item())
            r = time_it(lambda: torch.matmul(A, B), max_samples=30)
            emit(
                kind="gemm",
                case=c["case"],
                M=M,
                N=N,
                K=K,
                layout=("T" if ta else "N") + ("T" if tb else "N"),
                ms=r4(r["ms"]),
                tflops=r4(2 * M * N * K / (r["ms"] / 1000) / 1e12),
                minMs=r4(r["minMs"]),
                maxMs=r4(r["maxMs"]),
                samples=r["samples"],
                reps=r["reps"],
                relErr=rel,
            )
            del A, B, As, Bs
        except Exception as e:  # noqa: BLE001 — one failed case must not stop the bench
            emit(kind="gemm", case=c["case"], error=err_line(e))
        log(f"gemm {c['case']} done")


# -------------------------------------------------------------------------------------------------
def group_sizes(E, N):
    """Rows per expert of a grouped case (cases.json's _comment; ours.mts computes the same)."""
    w = [1 + (37 * e) % 11 for e in range(E)]
    sizes = [N * x // sum(w) for x in w]
    sizes[-1] += N - sum(sizes)
    return sizes


def bench_grouped():
    torch.manual_seed(3)
    dt = torch.bfloat16 if CUDA else torch.float32
    for c in CASES.get("grouped", []):
        E, N, K, Fo = c["E"], c["N"], c["K"], c["F"]
        flops = 2 * N * K * Fo
        sizes = group_sizes(E, N)
        x = torch.randn(N, K, device=DEVICE, dtype=dt)
        w = torch.randn(E, Fo, K, device=DEVICE, dtype=dt)
        out = torch.empty(N, Fo, device=DEVICE, dtype=dt)
        starts = [sum(sizes[:e]) for e in range(E)]

        def loop():
            for e in range(E):
                if sizes[e]:
                    s = starts[e]
                    torch.matmul(x[s : s + sizes[e]], w[e].t(), out=out[s : s + sizes[e]])

        # forward + backward (dx and every dW, as ours.mts times groupedLinear's): autograd through
        # the loop of matmuls, and through _grouped_mm where it has a backward
        xg = x.detach().requires_grad_()
        wg = w.detach().requires_grad_()
        gy = torch.randn(N, Fo, device=DEVICE, dtype=dt)

        def loop_train():
            parts = [xg[s : s + n] @ wg[e].t() for e, (s, n) in enumerate(zip(starts, sizes)) if n]
            torch.cat(parts).backward(gy)
            xg.grad = None
            wg.grad = None

        modes = [("loop", loop, loop_train)]
        if hasattr(torch, "_grouped_mm"):
            offs = torch.tensor([starts[e] + sizes[e] for e in range(E)], device=DEVICE, dtype=torch.int32)
            wt = w.transpose(-2, -1)

            def grouped_train():
                torch._grouped_mm(xg, wg.transpose(-2, -1), offs=offs).backward(gy)
                xg.grad = None
                wg.grad = None

            modes.append(("grouped_mm", lambda: torch._grouped_mm(x, wt, offs=offs), grouped_train))
        for mode, fn, train in modes:
            try:
                r = time_it(fn, max_samples=30)
                extra = {}
                try:
                    rt = time_it(train, max_samples=30)
                    extra = dict(trainMs=r4(rt["ms"]), trainTflops=r4(3 * flops / (rt["ms"] / 1000) / 1e12))
                except Exception as e:  # noqa: BLE001 — the forward's figure stands without it
                    extra = dict(trainError=err_line(e))
                emit(kind="grouped", case=c["case"], mode=mode, E=E, N=N, K=K, F=Fo, ms=r4(r["ms"]),
                     tflops=r4(flops / (r["ms"] / 1000) / 1e12), minMs=r4(r["minMs"]), maxMs=r4(r["maxMs"]),
                     samples=r["samples"], reps=r["reps"], **extra)
            except Exception as e:  # noqa: BLE001 — one failed mode must not stop the bench
                emit(kind="grouped", case=c["case"], mode=mode, error=err_line(e))
        log(f"grouped {c['case']} done")
        del x, w, out, xg, wg, gy


# -------------------------------------------------------------------------------------------------
def flash_context():
    """The flash-attention backend forced, where this torch can (else a null context)."""
    if not CUDA:
        return contextlib.nullcontext(), "math (CPU)"
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.FLASH_ATTENTION), "flash (sdpa_kernel)"
    except ImportError:
        return (
            torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=False, enable_mem_efficient=False),
            "flash (sdp_kernel)",
        )


HAS_SDPA = hasattr(F, "scaled_dot_product_attention")


def math_attention(q, k, v, causal=True):
    """softmax(q kᵀ / sqrt(D)) v with a causal mask, fp32 math (for a torch without SDPA)."""
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        S = q.shape[2]
        s = s.masked_fill(torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (s.softmax(-1) @ v.float()).to(q.dtype)


def sdpa(q, k, v, gqa):
    if not HAS_SDPA:
        return math_attention(q, k, v)
    if gqa:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def gqa_mode(q, k, v):
    """How this torch runs GQA on the flash backend: 'enable_gqa' or 'repeat_kv'."""
    if not HAS_SDPA:
        return "repeat_kv"
    ctx, _ = flash_context()
    try:
        with ctx:
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return "enable_gqa"
    except (TypeError, RuntimeError) as e:
        log(f"enable_gqa on the flash backend: {err_line(e)}; repeating K/V instead")
        return "repeat_kv"


def bench_attn():
    torch.manual_seed(2)
    dt = torch.bfloat16
    for c in CASES["attn"]:
        B, Hq, Hkv, S, D = c["B"], c["Hq"], c["Hkv"], c["S"], c["D"]
        Dv = c.get("Dv", D)
        # QK^T and PV, causal: half of 2·B·Hq·S²·(D + Dv)
        fwd_flops = 2 * B * Hq * S * S * (D + Dv) / 2
        try:
            q = torch.randn(B, Hq, S, D, device=DEVICE, dtype=dt)
            k = torch.randn(B, Hkv, S, D, device=DEVICE, dtype=dt)
            v = torch.randn(B, Hkv, S, Dv, device=DEVICE, dtype=dt)
            dout = torch.randn(B, Hq, S, Dv, device=DEVICE, dtype=dt)
            gqa = "none (Hkv = Hq)" if Hkv == Hq else gqa_mode(q, k, v)
            if gqa == "repeat_kv" and HAS_SDPA:
                # the copy is outside the timed region; dK, dV then come per query head
                k = k.repeat_interleave(Hq // Hkv, 1).contiguous()
                v = v.repeat_interleave(Hq // Hkv, 1).contiguous()
            use_gqa = gqa == "enable_gqa"
            if Dv == D:
                ctx, backend = flash_context()
            else:
                # torch's flash kernel wants one head dim for q, k and v: its own choice instead
                ctx, backend = contextlib.nullcontext(), "torch default (flash needs D = Dv)"

            with ctx:
                fwd = time_it(lambda: sdpa(q, k, v, use_gqa), warm=3, max_samples=20)
                q.requires_grad_(True)
                k.requires_grad_(True)
                v.requires_grad_(True)

                def step():
                    out = sdpa(q, k, v, use_gqa)
                    torch.autograd.grad(out, (q, k, v), dout)

                fb = time_it(step, warm=2, max_samples=20)
            emit(
                kind="attn",
                case=c["case"],
                B=B,
                Hq=Hq,
                Hkv=Hkv,
                S=S,
                D=D,
                Dv=Dv,
                causal=True,
                modelLayer=c.get("modelLayer", False),
                backend=backend if HAS_SDPA else "math (no SDPA in this torch)",
                gqa=gqa,
                fwdMs=r4(fwd["ms"]),
                fwdTflops=r4(fwd_flops / (fwd["ms"] / 1000) / 1e12),
                fwdBwdMs=r4(fb["ms"]),
                fwdBwdTflops=r4(3.5 * fwd_flops / (fb["ms"] / 1000) / 1e12),
                samples=[fwd["samples"], fb["samples"]],
                spreadMs=[r4(fb["minMs"]), r4(fb["maxMs"])],
            )
            del q, k, v, dout
        except Exception as e:  # noqa: BLE001
            emit(kind="attn", case=c["case"], error=err_line(e))
        log(f"attn {c['case']} done")


# -------------------------------------------------------------------------------------------------
def bench_stream():
    """Memory speed on this GPU at the sizes of ours.mts's `stream` part: a bf16 copy of
    [s, b, 2 ffn] (the reference for its GB/s), and torch's own RMSNorm forward and SwiGLU forward
    (silu(gate) * up, eager) at the 1B step's shapes, with the bytes they must move."""
    s, b, h, f = (64, 2, 256, 512) if TINY else (2048, 4, 2048, 8192)
    dt = torch.bfloat16
    cases = []
    big = torch.randn(s, b, 2 * f, device=DEVICE, dtype=dt)
    big2 = torch.empty_like(big)
    cases.append(("copy", 2 * big.numel() * 2, lambda: big2.copy_(big)))
    x = torch.randn(s, b, h, device=DEVICE, dtype=dt)
    w = torch.randn(h, device=DEVICE, dtype=dt)
    cases.append(("rmsnorm forward", 2 * x.numel() * 2, lambda: rms_norm(x, w, 1e-5)))
    gate, up = big.chunk(2, dim=-1)
    cases.append(("swiglu forward", 3 * s * b * f * 2, lambda: F.silu(gate) * up))
    for name, nbytes, fn in cases:
        try:
            t = time_it(fn, warm=2, max_samples=10, budget_ms=min(BUDGET_MS, 1000))
            emit(kind="stream", case=name, bytes=nbytes, ms=r4(t["ms"]), gbs=r4(nbytes / 1e6 / t["ms"]),
                 samples=t["samples"])
        except Exception as e:  # noqa: BLE001
            emit(kind="stream", case=name, error=err_line(e))
    del big, big2, x, w
    log("stream done")


# -------------------------------------------------------------------------------------------------
def rms_norm(x, w, eps):
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


class RMSNorm(nn.Module):
    def __init__(self, h, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(h))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rope(x, cos, sin):
    """Rotate-half RoPE (Hugging Face Llama's) on [B, H, S, D] with cos/sin [S, D]."""
    d = x.shape[-1] // 2
    rot = torch.cat((-x[..., d:], x[..., :d]), -1)
    return x * cos.to(x.dtype) + rot * sin.to(x.dtype)


class MoeMlp(nn.Module):
    """Mixtral's sparse block: softmax router, top-k renormalised, a loop over the experts."""

    def __init__(self, h, ffn, experts, topk):
        super().__init__()
        self.topk = topk
        self.router = nn.Linear(h, experts, bias=False)
        self.w13 = nn.ParameterList(nn.Parameter(torch.empty(2 * ffn, h)) for _ in range(experts))
        self.w2 = nn.ParameterList(nn.Parameter(torch.empty(h, ffn)) for _ in range(experts))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.router(x).float().softmax(-1)
        weight, chosen = probs.topk(self.topk, -1)
        weight = weight / weight.sum(-1, keepdim=True)
        flat = chosen.reshape(-1)
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=len(self.w13)).tolist()  # the host reads them, as HF's loop does
        token = order // self.topk
        rows = x[token]
        outs, at = [], 0
        for e, c in enumerate(counts):
            if c:
                g, u = F.linear(rows[at : at + c], self.w13[e]).chunk(2, dim=-1)
                outs.append(F.linear(F.silu(g) * u, self.w2[e]))
            at += c
        y = torch.cat(outs) * weight.reshape(-1)[order].unsqueeze(-1).to(outs[0].dtype)
        out = torch.zeros(x.shape, dtype=y.dtype, device=x.device).index_add_(0, token, y)
        return out.reshape(shape)


class Block(nn.Module):
    def __init__(self, h, heads, kv_heads, ffn, eps, gqa, moe=None):
        super().__init__()
        self.heads, self.kv, self.hd, self.gqa = heads, kv_heads, h // heads, gqa
        self.attn_norm = RMSNorm(h, eps)
        self.wqkv = nn.Linear(h, (heads + 2 * kv_heads) * self.hd, bias=False)
        self.wo = nn.Linear(heads * self.hd, h, bias=False)
        self.mlp_norm = RMSNorm(h, eps)
        self.moe = MoeMlp(h, ffn, *moe) if moe else None
        if not moe:
            self.w13 = nn.Linear(h, 2 * ffn, bias=False)  # gate and up, fused (Megatron's linear_fc1)
            self.w2 = nn.Linear(ffn, h, bias=False)

    def forward(self, x, cos, sin):
        B, S, _ = x.shape
        H, KV, hd = self.heads, self.kv, self.hd
        qkv = self.wqkv(self.attn_norm(x))
        q, k, v = qkv.split([H * hd, KV * hd, KV * hd], dim=-1)
        q = rope(q.view(B, S, H, hd).transpose(1, 2), cos, sin)
        k = rope(k.view(B, S, KV, hd).transpose(1, 2), cos, sin)
        v = v.view(B, S, KV, hd).transpose(1, 2)
        if self.gqa == "repeat_kv" and KV != H:
            k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        o = sdpa(q, k, v, self.gqa == "enable_gqa" and KV != H)
        x = x + self.wo(o.transpose(1, 2).reshape(B, S, H * hd))
        if self.moe is not None:
            return x + self.moe(self.mlp_norm(x))
        g, u = self.w13(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.w2(F.silu(g) * u)


class Llama(nn.Module):
    def __init__(self, cfg, gqa):
        super().__init__()
        h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        self.embed = nn.Embedding(cfg["vocab_size"], h)
        moe = (cfg["num_local_experts"], cfg["num_experts_per_tok"]) if cfg.get("num_local_experts") else None
        self.blocks = nn.ModuleList(
            Block(h, heads, cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["rms_norm_eps"], gqa, moe)
            for _ in range(cfg["num_hidden_layers"])
        )
        self.norm = RMSNorm(h, cfg["rms_norm_eps"])
        assert cfg.get("tie_word_embeddings", True), "the bench model ties the output layer to the embedding"
        hd = h // heads
        inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
        t = torch.arange(cfg["max_position_embeddings"]).float()
        f = torch.outer(t, inv)
        emb = torch.cat((f, f), -1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        for n, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens, labels):
        S = tokens.shape[1]
        x = self.embed(tokens)
        cos, sin = self.cos[:S], self.sin[:S]
        for b in self.blocks:
            x = b(x, cos, sin)
        logits = F.linear(self.norm(x), self.embed.weight)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1))


def megatron_flops(cfg, seq, gbs):
    """Megatron's num_floating_point_operations for this Llama, dense or with routed experts (as
    packages/train/src/flops.ts: the top-k experts' products count, the router does not)."""
    h, L, ffn = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    ffn *= cfg.get("num_experts_per_tok", 1) if cfg.get("num_local_experts") else 1
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = h // heads
    query, key_value = hd * heads, hd * kv
    vocab = math.ceil(cfg["vocab_size"] / 128) * 128
    per_token = 6 * h * ffn * 3 * L + 6 * (h * (query + 2 * key_value) + query * h) * L + 6 * h * vocab
    scores = (6 * query / 2) * 2 * L
    return gbs * seq * per_token + gbs * seq * seq * scores


def bench_train(key="train"):
    tc = CASES[key]
    cfg = tc["hf"]
    mbs = int(os.environ.get("MEGAPATCH_BENCH_MBS", tc["microBatchSize"]))
    gbs = max(tc["globalBatchSize"], mbs)
    n_micro = gbs // mbs
    seq = tc["seqLength"]
    warm, timed = tc["warmupIters"], tc["timedIters"]
    flops = megatron_flops(cfg, seq, gbs)
    modes = os.environ.get("MEGAPATCH_BENCH_TORCH_MODES", "eager,compile").split(",")
    probe = torch.randn(1, cfg["num_attention_heads"], 128, cfg["hidden_size"] // cfg["num_attention_heads"],
                        device=DEVICE, dtype=torch.bfloat16)
    kvp = probe[:, : cfg["num_key_value_heads"]].contiguous()
    gqa = gqa_mode(probe, kvp, kvp) if cfg["num_key_value_heads"] != cfg["num_attention_heads"] else "none"
    del probe, kvp
    for mode in [m.strip() for m in modes if m.strip()]:
        base = dict(kind="train", case=tc["case"], mode=f"torch-{mode}", microBatchSize=mbs, globalBatchSize=gbs,
                    seqLength=seq)
        if mode == "compile" and not hasattr(torch, "compile"):
            emit(**base, error=f"torch.compile is not in torch {torch.__version__}")
            continue
        try:
            emit(**base, **train_mode(mode, cfg, gqa, mbs, n_micro, seq, warm, timed, flops))
        except Exception as e:  # noqa: BLE001 — report (a failed compile, say) and go on
            emit(**base, error=err_line(e))
        # the mode's model, optimizer and graphs went with train_mode's frame
        if CUDA:
            torch.cuda.empty_cache()
        if hasattr(torch, "_dynamo"):
            with contextlib.suppress(Exception):
                torch._dynamo.reset()
        log(f"train {mode} done")


def train_mode(mode, cfg, gqa, mbs, n_micro, seq, warm, timed, flops):
    """warm + timed steps of one mode; the figures of its timed steps."""
    gbs = mbs * n_micro
    torch.manual_seed(3)
    pure = mode == "eager-bf16"
    model = Llama(cfg, gqa).to(DEVICE)
    if pure:
        model = model.to(torch.bfloat16)
    if mode == "compile":
        for i, b in enumerate(model.blocks):
            model.blocks[i] = torch.compile(b)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, fused=CUDA)
    except (TypeError, RuntimeError):
        opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
    params = decay + no_decay
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    data = torch.randint(3, cfg["vocab_size"], (warm + timed, n_micro, mbs, seq + 1), device=DEVICE, generator=gen)

    def amp():
        if pure:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda" if CUDA else "cpu", dtype=torch.bfloat16)

    steps, fwd_ms, bwd_ms, opt_ms, losses = [], [], [], [], []
    t_warm = None
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    t_start = time.perf_counter()
    for it in range(warm + timed):
        c0 = Clock().record()
        loss_sum = None
        marks = []
        for m in range(n_micro):
            tok = data[it, m]
            a0 = Clock().record()
            with amp():
                loss = model(tok[:, :-1], tok[:, 1:]) / n_micro
            a1 = Clock().record()
            loss.backward()
            a2 = Clock().record()
            marks.append((a0, a1, a2))
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        o0 = Clock().record()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        c1 = Clock().record()
        sync()
        if it == warm - 1:
            t_warm = time.perf_counter() - t_start
        losses.append(r4(loss_sum.item()))
        if it >= warm:
            steps.append(c0.ms_to(c1))
            fwd_ms.append(sum(a0.ms_to(a1) for a0, a1, _ in marks))
            bwd_ms.append(sum(a1.ms_to(a2) for _, a1, a2 in marks))
            opt_ms.append(o0.ms_to(c1))
    step = statistics.median(steps)
    return dict(
        precision="bf16 params and AdamW state" if pure else "AMP: fp32 master weights, bf16 autocast",
        attention=f"{'SDPA, torch default backend choice' if HAS_SDPA else 'math'}, gqa {gqa}",
        compiled="each transformer block (torch.compile)" if mode == "compile" else None,
        warmupS=r4(t_warm) if t_warm is not None else None,
        timedIterations=len(steps),
        stepMs=r4(step),
        stepMsAll=[r4(s) for s in steps],
        tokensPerSecond=r4(gbs * seq / (step / 1000)),
        flopsPerStep=int(flops),
        achievedTflops=r4(flops / (step / 1000) / 1e12),
        mfu=r4(flops / (step / 1000) / (PEAK * 1e12)),
        peakTflops=PEAK,
        breakdownMs={
            "forward": r4(statistics.median(fwd_ms)),
            "backward": r4(statistics.median(bwd_ms)),
            "optimizer": r4(statistics.median(opt_ms)),
        },
        losses=losses,
        peakMemoryGiB=r4(torch.cuda.max_memory_allocated() / 2**30) if CUDA else None,
        params=sum(p.numel() for p in params),
    )

def bench_generate():
    """Hugging Face's LlamaForCausalLM.generate on train's model (random weights, bf16): the
    batches of random prompts greedy and with temperature 0.8 + top-p 0.9 (top_k=0), exactly
    newTokens each (min_new_tokens), new tokens per second over the call."""
    gc = CASES["generate"]
    hf = CASES[gc["model"]]["hf"]
    n = gc["newTokens"]
    base = dict(kind="generate", case=gc["case"])
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except Exception as e:  # noqa: BLE001 — no transformers here: say so
        emit(**base, error=err_line(e))
        return
    torch.manual_seed(0)
    # built on the device where torch can (2.0+): the host's init of a 1B model takes long
    where = torch.device(DEVICE) if TV >= (2, 0) else contextlib.nullcontext()
    with where:
        model = LlamaForCausalLM(LlamaConfig(**hf, hidden_act="silu"))
    model = model.to(device=DEVICE, dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(12345)
    for b in gc["batches"]:
        ids = torch.randint(3, hf["vocab_size"], (b, gc["promptLength"]), generator=g).to(DEVICE)
        for sampling in gc["sampling"]:
            kw = dict(do_sample=False) if sampling == "greedy" else dict(do_sample=True, temperature=0.8, top_p=0.9, top_k=0)
            kw.update(attention_mask=torch.ones_like(ids), pad_token_id=0)
            row = dict(**base, batch=b, sampling=sampling, promptLength=gc["promptLength"], newTokens=n)
            try:
                with torch.no_grad():
                    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
                    sync()
                    t0 = time.perf_counter()
                    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
                    sync()
                    dt = time.perf_counter() - t0
                made = (out.shape[1] - ids.shape[1]) * b
                emit(**row, tokensPerSecond=r4(made / dt), msPerStep=r4(dt * 1000 / n))
            except Exception as e:  # noqa: BLE001 — report and go on
                emit(**row, error=err_line(e))
            log(f"generate b{b} {sampling} done")
    del model
    if CUDA:
        torch.cuda.empty_cache()


if __name__ == "__main__":
    env_info()
    if want("gemm"):
        bench_gemm()
    if want("grouped"):
        bench_grouped()
    if want("attn"):
        bench_attn()
    if want("stream"):
        bench_stream()
    if want("train"):
        bench_train()
    if want("moe-train"):
        bench_train("trainMoe")
    if want("generate"):
        bench_generate()
