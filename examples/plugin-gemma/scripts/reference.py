"""Independent PyTorch reference of Gemma 1 (transformers' GemmaForCausalLM) for the plugin's fixture.

Usage: /usr/bin/python3 reference.py <hfDir> <fixtureOut> [--no-check]

<hfDir> is the F32 checkpoint of write-checkpoint.ts. Writes <fixtureOut> (safetensors) with
  input_ids I64 [2, 12], labels I64 [2, 12] (input_ids shifted left, the last column 3),
  logits F32 [2, 12, vocab], loss F32 [] (mean cross-entropy over the 24 tokens),
  grad.<hf name> F32 for a few parameters (gradients of `loss`), grad_row_ids I64 [R].
__metadata__: model, grads (comma-separated HF names), grad_row_subset (the vocab-sized gradients
stored only at the rows grad_row_ids, to keep the file small).
Then it runs the self-checks (skip with --no-check): every checkpoint tensor is read, fp32 agrees
with fp64, and each Gemma-specific choice moves the logits far beyond the tests' tolerance.

Written from transformers' modeling_gemma.py as of the Gemma 1 releases (4.38-4.47), not from the
TypeScript it checks:
  GemmaRMSNorm   x * rsqrt(mean(x^2) + eps) in fp32, times (1 + weight) in fp32, cast back
  embeddings     embed_tokens(ids) * torch.tensor(hidden_size ** 0.5, dtype=activation dtype)
  attention      GQA (repeat_kv), RoPE rotate-half over head_dim, scale head_dim ** -0.5,
                 softmax in fp32, no biases
  GemmaMLP       down(act(gate(x)) * up(x)), act = ACT2FN[hidden_activation or "gelu_pytorch_tanh"]
                 (hidden_act, "gelu" in Gemma 1.0's configs, is ignored, as those versions did)
  head           tied to embed_tokens (tie_word_embeddings), no logit soft-capping (that is Gemma 2)
Needs only torch (1.13, Debian python3-torch) and numpy.
"""
import json
import math
import os
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F

BATCH, SEQ = 2, 12
LAST_LABEL = 3
GRADS = [
    "model.embed_tokens.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.1.input_layernorm.weight",
    "model.norm.weight",
    "model.layers.0.mlp.gate_proj.weight",
    "model.layers.2.mlp.down_proj.weight",
    "model.layers.1.self_attn.k_proj.weight",
]
ROW_SUBSET = ["model.embed_tokens.weight"]

# ---- safetensors (json + numpy) ------------------------------------------------------------------

NP_DTYPES = {"F64": "<f8", "F32": "<f4", "I64": "<i8", "I32": "<i4"}


def read_safetensors(path):
    """name -> torch tensor of an F32/F64/I64/I32 safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        arr = np.frombuffer(data[a:b], dtype=np.dtype(NP_DTYPES[info["dtype"]])).reshape(info["shape"])
        out[name] = torch.from_numpy(arr.copy())
    return out


def write_safetensors(path, tensors, metadata):
    """Writes F32 / I64 tensors, names sorted, the header padded with spaces to 8 bytes."""
    header = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        code = {torch.float32: "F32", torch.int64: "I64"}[t.dtype]
        blob = t.numpy().astype(np.dtype(NP_DTYPES[code])).tobytes()
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)


class Params(dict):
    """The weights, recording which names the forward pass read (every tensor must be used)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.used = set()

    def __getitem__(self, name):
        self.used.add(name)
        return super().__getitem__(name)


# ---- the model -----------------------------------------------------------------------------------

# What Gemma changes relative to Llama; the self-checks turn each off to see that the fixture notices.
GEMMA = {"norm_plus_one": True, "gelu_tanh": True, "embed_scale": True}


def rms_norm(x, w, eps, v):
    """GemmaRMSNorm (fp32 math; fp64 stays fp64 for the precision check)."""
    hp = torch.float64 if x.dtype == torch.float64 else torch.float32
    x32 = x.to(hp)
    out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    scale = 1.0 + w.to(hp) if v["norm_plus_one"] else w.to(hp)
    return (out * scale).to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(cfg, positions, dim, dtype):
    """GemmaRotaryEmbedding: cos, sin [b, s, dim] (frequencies repeated: the rotate-half layout)."""
    hp = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).to(hp) / dim))
    freqs = positions.to(hp)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def attention(cfg, P, i, x, cos, sin):
    p = f"model.layers.{i}.self_attn."
    b, s, _ = x.shape
    H, KV, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    q = F.linear(x, P[p + "q_proj.weight"]).view(b, s, H, D).transpose(1, 2)
    k = F.linear(x, P[p + "k_proj.weight"]).view(b, s, KV, D).transpose(1, 2)
    v = F.linear(x, P[p + "v_proj.weight"]).view(b, s, KV, D).transpose(1, 2)
    c, sn = cos[:, None], sin[:, None]
    q = q * c + rotate_half(q) * sn
    k = k * c + rotate_half(k) * sn
    # repeat_kv: query head h reads kv head h // (H / KV).
    k = k.repeat_interleave(H // KV, dim=1)
    v = v.repeat_interleave(H // KV, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(D)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    hp = torch.float64 if scores.dtype == torch.float64 else torch.float32
    probs = torch.softmax(scores, dim=-1, dtype=hp).to(q.dtype)
    o = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, H * D)
    return F.linear(o, P[p + "o_proj.weight"])


def activation(cfg, v):
    name = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
    if not v["gelu_tanh"]:
        name = "gelu"
    if name == "gelu_pytorch_tanh":
        return lambda t: F.gelu(t, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"activation {name} not implemented")


def mlp(cfg, P, i, x, v):
    p = f"model.layers.{i}.mlp."
    act = activation(cfg, v)
    return F.linear(act(F.linear(x, P[p + "gate_proj.weight"])) * F.linear(x, P[p + "up_proj.weight"]),
                    P[p + "down_proj.weight"])


def forward(cfg, P, ids, v=GEMMA):
    """Logits [b, s, vocab] of GemmaForCausalLM with weights P (fp32 or fp64)."""
    eps = cfg["rms_norm_eps"]
    emb = P["model.embed_tokens.weight"]
    h = F.embedding(ids, emb)
    if v["embed_scale"]:
        h = h * torch.tensor(cfg["hidden_size"] ** 0.5, dtype=h.dtype)
    positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    cos, sin = rope(cfg, positions, cfg["head_dim"], h.dtype)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = h + attention(cfg, P, i, rms_norm(h, P[p + "input_layernorm.weight"], eps, v), cos, sin)
        h = h + mlp(cfg, P, i, rms_norm(h, P[p + "post_attention_layernorm.weight"], eps, v), v)
    h = rms_norm(h, P["model.norm.weight"], eps, v)
    head = emb if cfg.get("tie_word_embeddings", True) else P["lm_head.weight"]
    return F.linear(h, head)


def rel_max(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# ---- main ----------------------------------------------------------------------------------------

def main(argv):
    args = [a for a in argv if not a.startswith("--")]
    if len(args) != 2:
        print(__doc__)
        return 2
    hf_dir, out = args
    check = "--no-check" not in argv
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    weights = read_safetensors(os.path.join(hf_dir, "model.safetensors"))

    rng = np.random.RandomState(0)
    ids = torch.from_numpy(rng.randint(0, cfg["vocab_size"], size=(BATCH, SEQ)).astype(np.int64))
    labels = torch.cat([ids[:, 1:], torch.full((BATCH, 1), LAST_LABEL, dtype=torch.int64)], dim=1)

    P = Params({k: t.float().requires_grad_(True) for k, t in weights.items()})
    logits = forward(cfg, P, ids)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()

    rows = sorted(set(ids.flatten().tolist()) | set(labels.flatten().tolist()) | {0, cfg["vocab_size"] - 1})
    tensors = {"input_ids": ids, "labels": labels, "logits": logits.detach(), "loss": loss.detach(),
               "grad_row_ids": torch.tensor(rows, dtype=torch.int64)}
    for name in GRADS:
        g = dict.__getitem__(P, name).grad
        tensors[f"grad.{name}"] = g[rows] if name in ROW_SUBSET else g
    write_safetensors(out, tensors, {"model": "gemma", "grads": ",".join(GRADS),
                                     "grad_row_subset": ",".join(ROW_SUBSET)})
    print(f"wrote {out} ({os.path.getsize(out)} bytes): loss {loss.item():.6f}, "
          f"max |logit| {logits.abs().max().item():.3f}")
    if not check:
        return 0

    unused = set(weights) - P.used
    assert not unused, f"checkpoint tensors never read: {sorted(unused)}"
    P64 = Params({k: t.double() for k, t in weights.items()})
    with torch.no_grad():
        err = rel_max(logits.detach(), forward(cfg, P64, ids))
        print(f"check fp32 vs fp64 logits: {err:.2e} (max abs diff / max abs)")
        assert err < 1e-5, "fp32 reference is not accurate enough for a 1e-5 test"
        for what in GEMMA:
            variant = dict(GEMMA, **{what: False})
            d = rel_max(forward(cfg, P, ids, variant), logits.detach())
            print(f"check without {what}: logits move {d:.2e}")
            # 10x the tests' 1e-5 tolerance: tanh and exact GELU differ by at most 4.7e-4 anywhere
            assert d > 1e-4, f"the fixture does not notice a model without {what}"
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
