"""Independent fp32 PyTorch reference of every fixture architecture (logits-parity fixtures).

Usage: /usr/bin/python3 reference.py <hfRoot> <fixturesOutDir> [--ids a,b] [--no-check]

<hfRoot>/<id>/ are the F32 checkpoints of write-fixture-checkpoints.ts (one per entry of
fixture-models.json). For each model this writes <fixturesOutDir>/<id>.safetensors with
  input_ids I64 [2, 12], labels I64 [2, 12], logits [2, 12, vocab], loss [] (mean CE over 24),
  grad.<hf name> for a few parameters (grads of `loss`; see __metadata__), grad_row_ids I64 [R],
  packed_input_ids I64 [1, 12], packed_position_ids I64 [1, 12], packed_cu_seqlens I32 [3],
  packed_logits [1, 12, vocab] (each packed sample run on its own), and for deepseek-v3
  mtp_loss_1 [] (Megatron-Core MTP semantics, see mtp_losses).
__metadata__: model, grads (comma-separated HF names), grad_row_subset (the vocab-sized grads that
are stored only at the rows grad_row_ids, to keep files small), mtp (the h_0 convention).
Then it runs the self-checks (skip with --no-check) and prints their results.

Written from the Hugging Face modeling code of each architecture (transformers' llama, mistral,
qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe, deepseek_v2/v3, phi3 and DeepSeek's remote code), not from
the TypeScript implementation it checks. Needs only torch (1.13, Debian python3-torch) and numpy.
"""
import json
import math
import os
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH, SEQ = 2, 12
LAST_LABEL = 3  # labels[:, -1]: the fixed id after the last input token
PACK = (5, 7)  # packed sample lengths: row 0[:5] then row 1[:7]

# ---- safetensors (json + numpy) ------------------------------------------------------------------

ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
             "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path):
    """name -> torch tensor (floats as float32; BF16 widened through uint16 << 16)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw = data[a:b]
        if info["dtype"] == "BF16":
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=np.dtype(ST_DTYPES[info["dtype"]]).newbyteorder("<"))
        arr = arr.reshape(info["shape"])
        t = torch.from_numpy(arr.copy())
        out[name] = t.float() if t.is_floating_point() else t
    return out


def write_safetensors(path, tensors, metadata):
    """Writes float32 / int64 / int32 tensors, keys sorted, header padded to 8 bytes."""
    names = sorted(tensors)
    header = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name in names:
        t = tensors[name].detach().contiguous()
        code = {torch.float32: "F32", torch.int64: "I64", torch.int32: "I32"}[t.dtype]
        blob = t.numpy().astype(np.dtype(ST_DTYPES[code]).newbyteorder("<")).tobytes()
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


def load_hf(folder):
    """(config dict, weights) of an HF folder: model.safetensors or a sharded index."""
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    weights = {}
    for name in files:
        weights.update(read_safetensors(os.path.join(folder, name)))
    return cfg, weights


class Params(dict):
    """The weights, recording which names the forward pass read (every tensor must be used)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.used = set()

    def __getitem__(self, name):
        self.used.add(name)
        return super().__getitem__(name)

    def cast(self, dtype):
        return Params({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in self.items()})


# ---- building blocks -----------------------------------------------------------------------------

def rms_norm(x, w, eps):
    """HF LlamaRMSNorm: x * rsqrt(mean(x^2) + eps) computed in fp32, then times the weight."""
    x32 = x.float() if x.dtype != torch.float64 else x
    var = x32.pow(2).mean(-1, keepdim=True)
    return w * (x32 * torch.rsqrt(var + eps)).to(x.dtype)


def linear(x, w, b=None):
    return F.linear(x, w, b)


def swiglu(x, gate_w, up_w, down_w):
    """down(silu(gate(x)) * up(x)) (LlamaMLP; Mixtral's w1 = gate, w3 = up, w2 = down)."""
    return linear(F.silu(linear(x, gate_w)) * linear(x, up_w), down_w)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def yarn_get_mscale(scale, mscale):
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(cfg, dim, seq_len=None):
    """(inv_freq [dim/2] float64, attention scaling of cos/sin) as HF's rope init functions;
    seq_len (the largest position + 1 of a forward) picks longrope's short or long factors."""
    base = float(cfg.get("rope_theta", 10000.0))
    exps = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    inv = 1.0 / base ** exps
    rs = cfg.get("rope_scaling") or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return inv, 1.0
    if cfg.get("model_type") == "phi3" and kind in ("longrope", "su", "yarn"):
        # _compute_longrope_parameters (Phi3Config reads "su" and "yarn" as longrope): the original
        # context from the config's top level, the factor max / original, each frequency divided
        # by the long factor once the forward's positions pass the original context, else the short
        orig = cfg.get("original_max_position_embeddings") or cfg["max_position_embeddings"]
        factor = cfg["max_position_embeddings"] / orig
        att = rs.get("attention_factor")
        if att is None:
            att = math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1 else 1.0
        ext = rs["long_factor"] if seq_len is not None and seq_len > orig else rs["short_factor"]
        return inv / torch.tensor(ext, dtype=torch.float64), att
    if kind == "linear":
        # _compute_linear_scaling_rope_parameters: inv_freq / factor, i.e. positions / factor.
        return inv / rs["factor"], 1.0
    if kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        # Long wavelengths (low frequencies) are divided by factor, short ones kept, and the band
        # between high_wavelen and low_wavelen interpolates smoothly between the two.
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        # DeepSeek's YarnRotaryEmbedding (= transformers' _compute_yarn_parameters, truncate=True).
        factor = rs["factor"]
        orig = rs["original_max_position_embeddings"]
        beta_fast, beta_slow = rs.get("beta_fast", 32), rs.get("beta_slow", 1)

        def correction_dim(rot):
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp  # 1: keep the original frequency, 0: interpolate (/ factor)
        inv = (inv / factor) * (1 - extrapolation) + inv * extrapolation
        mscale, mscale_all = rs.get("mscale", 1), rs.get("mscale_all_dim", 0)
        att = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all)
        return inv, att
    raise ValueError(f"rope type {kind} not implemented")


def rope_tables(cfg, positions, dim):
    """cos, sin [batch, seq, dim] in the rotate-half layout (freqs repeated), times the yarn mscale."""
    inv, att = rope_inv_freq(cfg, dim, int(positions.max()) + 1)
    freqs = positions.double()[..., None] * inv  # [b, s, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * att).float(), (emb.sin() * att).float()


def apply_rope(x, cos, sin):
    """x [b, heads, s, d]; cos/sin [b, s, r] with r <= d: the first r channels rotate, the rest pass
    through (transformers' Phi-3 with partial_rotary_factor < 1: q_rot, q_pass)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    r = cos.shape[-1]
    rot, keep = x[..., :r], x[..., r:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, keep), dim=-1)


def deinterleave(x):
    """DeepSeek's view(d/2, 2).transpose: [x0, x1, x2, x3, ...] -> [x0, x2, ..., x1, x3, ...]."""
    *lead, d = x.shape
    return x.reshape(*lead, d // 2, 2).transpose(-1, -2).reshape(*lead, d)


def attention_mask(seq, window):
    """allowed[i, j]: causal, and with a sliding window W key j is visible from query i iff
    0 <= i - j < W (the query sees itself and the W - 1 keys before it). This is transformers'
    sliding_window_overlay (kv_idx > q_idx - sliding_window) on top of the causal mask."""
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    allowed = j <= i
    if window:
        allowed = allowed & (i - j < window)
    return allowed


def sdpa(q, k, v, allowed, scale):
    """Eager attention: softmax(q k^T * scale, masked) v with the softmax in fp32 (as HF)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float() if scores.dtype != torch.float64 else scores, dim=-1)
    return torch.matmul(probs.to(q.dtype), v)


# ---- the model -----------------------------------------------------------------------------------

class Model:
    """One HF causal LM as a function of its weights P (fp32 or fp64)."""

    def __init__(self, cfg, P):
        self.cfg = cfg
        self.P = P
        self.type = cfg["model_type"]
        self.deepseek = self.type in ("deepseek_v2", "deepseek_v3")
        self.eps = cfg["rms_norm_eps"]
        self.layers = cfg["num_hidden_layers"]
        self.tied = cfg.get("tie_word_embeddings", False)
        self.record = None  # list to collect routing decisions (self-checks)
        self.mla_rope = "interleaved"  # the sensitivity probe sets "plain"

    # -- layer kinds
    def is_moe(self, i):
        c = self.cfg
        if self.type == "mixtral":
            return True
        if self.type in ("qwen2_moe", "qwen3_moe"):
            return (i not in c.get("mlp_only_layers", [])) and c.get("num_experts", 0) > 0 and \
                (i + 1) % c.get("decoder_sparse_step", 1) == 0
        if self.deepseek:
            return c.get("n_routed_experts") is not None and i >= c.get("first_k_dense_replace", 0) and \
                i % c.get("moe_layer_freq", 1) == 0
        return False

    def window(self):
        c = self.cfg
        if self.type == "mistral":
            return c.get("sliding_window", 4096)  # MistralConfig default when the key is absent
        if self.type == "phi3":
            return c.get("sliding_window")  # Phi3Config: no window unless set
        if self.type in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe") and c.get("use_sliding_window"):
            raise NotImplementedError("Qwen sliding window (per max_window_layers) is not in the fixtures")
        return None

    # -- attention
    def dense_attention(self, i, x, cos, sin, allowed):
        """Llama / Mistral / Qwen2 (q/k/v bias) / Qwen3 (per-head q_norm/k_norm before RoPE), GQA."""
        c, P = self.cfg, self.P
        p = f"model.layers.{i}.self_attn."
        b, s, _ = x.shape
        H, KV = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
        D = c.get("head_dim") or c["hidden_size"] // H
        bias = self.type in ("qwen2", "qwen2_moe") or c.get("attention_bias", False)
        if self.type == "phi3":
            # Phi3Attention: one qkv_proj, its output columns [q (H heads) | k (KV) | v (KV)]
            qkv = linear(x, P[p + "qkv_proj.weight"])
            q, k, v = qkv.split([H * D, KV * D, KV * D], dim=-1)
        else:
            q = linear(x, P[p + "q_proj.weight"], P[p + "q_proj.bias"] if bias else None)
            k = linear(x, P[p + "k_proj.weight"], P[p + "k_proj.bias"] if bias else None)
            v = linear(x, P[p + "v_proj.weight"], P[p + "v_proj.bias"] if bias else None)
        q = q.view(b, s, H, D)
        k = k.view(b, s, KV, D)
        v = v.view(b, s, KV, D).transpose(1, 2)
        if self.type in ("qwen3", "qwen3_moe"):
            q = rms_norm(q, P[p + "q_norm.weight"], self.eps)
            k = rms_norm(k, P[p + "k_norm.weight"], self.eps)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        # repeat_kv: query head h reads kv head h // (H / KV).
        k = k.repeat_interleave(H // KV, dim=1)
        v = v.repeat_interleave(H // KV, dim=1)
        o = sdpa(q, k, v, allowed, D ** -0.5)
        o = o.transpose(1, 2).reshape(b, s, H * D)
        return linear(o, P[p + "o_proj.weight"], P[p + "o_proj.bias"] if c.get("attention_bias") else None)

    def mla_softmax_scale(self):
        c = self.cfg
        scale = (c["qk_nope_head_dim"] + c["qk_rope_head_dim"]) ** -0.5
        rs = c.get("rope_scaling")
        if rs and rs.get("mscale_all_dim"):
            m = yarn_get_mscale(rs["factor"], rs["mscale_all_dim"])
            scale = scale * m * m
        return scale

    def mla_attention(self, i, x, cos, sin, allowed):
        """DeepSeek MLA: q (plain or LoRA with q_a_layernorm), latent kv with a shared rope key."""
        c, P = self.cfg, self.P
        p = f"model.layers.{i}.self_attn."
        b, s, _ = x.shape
        H = c["num_attention_heads"]
        nope, rope, vd, r = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
        # q_a_layernorm / kv_a_layernorm are built without eps in HF, i.e. with RMSNorm's 1e-6.
        lora_eps = 1e-6
        if c.get("q_lora_rank") is None:
            q = linear(x, P[p + "q_proj.weight"])
        else:
            q = linear(rms_norm(linear(x, P[p + "q_a_proj.weight"]), P[p + "q_a_layernorm.weight"], lora_eps),
                       P[p + "q_b_proj.weight"])
        q = q.view(b, s, H, nope + rope).transpose(1, 2)
        q_nope, q_pe = q.split([nope, rope], dim=-1)
        ckv = linear(x, P[p + "kv_a_proj_with_mqa.weight"])
        latent, k_pe = ckv.split([r, rope], dim=-1)
        kv = linear(rms_norm(latent, P[p + "kv_a_layernorm.weight"], lora_eps), P[p + "kv_b_proj.weight"])
        kv = kv.view(b, s, H, nope + vd).transpose(1, 2)
        k_nope, v = kv.split([nope, vd], dim=-1)
        k_pe = k_pe.view(b, 1, s, rope)
        if self.mla_rope == "interleaved":
            q_pe, k_pe = deinterleave(q_pe), deinterleave(k_pe)
        q_pe, k_pe = apply_rope(q_pe, cos, sin), apply_rope(k_pe, cos, sin)
        qs = torch.cat((q_nope, q_pe), dim=-1)
        ks = torch.cat((k_nope, k_pe.expand(b, H, s, rope)), dim=-1)
        o = sdpa(qs, ks, v, allowed, self.mla_softmax_scale())
        return linear(o.transpose(1, 2).reshape(b, s, H * vd), P[p + "o_proj.weight"])

    # -- MLPs
    def dense_mlp(self, i, x):
        p = f"model.layers.{i}.mlp."
        if self.type == "phi3":
            # Phi3MLP: gate_up_proj's output chunked in two, SiLU on the first half
            gate, up = linear(x, self.P[p + "gate_up_proj.weight"]).chunk(2, dim=-1)
            return linear(up * F.silu(gate), self.P[p + "down_proj.weight"])
        return swiglu(x, self.P[p + "gate_proj.weight"], self.P[p + "up_proj.weight"], self.P[p + "down_proj.weight"])

    def experts_out(self, x, names, weights):
        """sum_e weights[..., e] * expert_e(x); weights [tokens, E] are zero off the top-k."""
        out = 0
        for e, (g, u, d) in enumerate(names):
            out = out + weights[:, e:e + 1].to(x.dtype) * swiglu(x, self.P[g], self.P[u], self.P[d])
        return out

    def route(self, i, logits):
        """Top-k routing: (dense weights [T, E], top-k ids [T, k]) of HF's router of this arch."""
        c = self.cfg
        T, E = logits.shape
        if self.type == "mixtral":
            # MixtralSparseMoeBlock: softmax over all experts, top-k, renormalise.
            probs = torch.softmax(logits, dim=-1)
            w, idx = probs.topk(c["num_experts_per_tok"], dim=-1)
            w = w / w.sum(-1, keepdim=True)
            raw = w
        elif self.type in ("qwen2_moe", "qwen3_moe"):
            # Softmax over all experts, top-k, renormalised only with norm_topk_prob.
            probs = torch.softmax(logits, dim=-1)
            w, idx = probs.topk(c["num_experts_per_tok"], dim=-1)
            if c.get("norm_topk_prob", False):
                w = w / w.sum(-1, keepdim=True)
            raw = w
        else:
            k = c["num_experts_per_tok"]
            scoring = c.get("scoring_func", "softmax")
            if scoring == "softmax":
                scores = torch.softmax(logits, dim=-1)
                if c.get("topk_method", "greedy") not in ("greedy", "gready"):
                    raise NotImplementedError("group_limited_greedy is not in the fixtures")
                w, idx = scores.topk(k, dim=-1)
            else:
                # noaux_tc: the bias only picks experts; the weights are the unbiased sigmoid scores.
                scores = torch.sigmoid(logits)
                bias = self.P[f"model.layers.{i}.mlp.gate.e_score_correction_bias"].to(scores.dtype)
                choice = scores.detach() + bias
                G, kg = c["n_group"], c["topk_group"]
                group_scores = choice.view(T, G, E // G).topk(2, dim=-1).values.sum(-1)
                groups = group_scores.topk(kg, dim=-1).indices
                keep = torch.zeros(T, G, dtype=torch.bool)
                keep[torch.arange(T)[:, None], groups] = True
                keep = keep[:, :, None].expand(T, G, E // G).reshape(T, E)
                # HF fills the experts of dropped groups with 0.0 (not -inf); with sigmoid scores
                # near 0.5 no dropped expert can win, so the two agree here.
                masked = choice.masked_fill(~keep, 0.0)
                idx = masked.topk(k, dim=-1).indices
                w = scores.gather(1, idx)
            if c.get("norm_topk_prob", False) and k > 1:
                w = w / (w.sum(-1, keepdim=True) + 1e-20)
            raw = w
            # Megatron-Core's rule: the final top-k weights are always multiplied by
            # routed_scaling_factor. DeepSeek-V2's HF remote code multiplies only when it does NOT
            # renormalise (norm_topk_prob false), and transformers' native DeepseekV2 never
            # renormalises; the fixture's V2 has norm_topk_prob false and factor 1.0, so all agree.
            w = w * c.get("routed_scaling_factor", 1.0)
        dense = torch.zeros(T, E, dtype=w.dtype).scatter(1, idx, w)
        if self.record is not None:
            self.record.append({"layer": i, "idx": idx.detach(), "raw": raw.detach(),
                                "weights": w.detach(), "logits": logits.detach()})
        return dense, idx

    def moe_mlp(self, i, x):
        c, P = self.cfg, self.P
        b, s, h = x.shape
        t = x.reshape(b * s, h)
        if self.type == "mixtral":
            p = f"model.layers.{i}.block_sparse_moe."
            E = c["num_local_experts"]
            names = [(p + f"experts.{e}.w1.weight", p + f"experts.{e}.w3.weight", p + f"experts.{e}.w2.weight")
                     for e in range(E)]
        else:
            p = f"model.layers.{i}.mlp."
            E = c["num_experts"] if not self.deepseek else c["n_routed_experts"]
            names = [(p + f"experts.{e}.gate_proj.weight", p + f"experts.{e}.up_proj.weight",
                      p + f"experts.{e}.down_proj.weight") for e in range(E)]
        # Router logits in fp32 (HF casts the gate input and weight to float32).
        logits = linear(t, P[p + "gate.weight"])
        weights, _ = self.route(i, logits)
        out = self.experts_out(t, names, weights)
        if self.type == "qwen2_moe":
            shared = swiglu(t, P[p + "shared_expert.gate_proj.weight"], P[p + "shared_expert.up_proj.weight"],
                            P[p + "shared_expert.down_proj.weight"])
            out = out + torch.sigmoid(linear(t, P[p + "shared_expert_gate.weight"])) * shared
        if self.deepseek and c.get("n_shared_experts"):
            out = out + swiglu(t, P[p + "shared_experts.gate_proj.weight"], P[p + "shared_experts.up_proj.weight"],
                               P[p + "shared_experts.down_proj.weight"])
        return out.view(b, s, h)

    # -- whole model
    def decoder_layer(self, i, x, cos, sin, allowed):
        P = self.P
        p = f"model.layers.{i}."
        a = rms_norm(x, P[p + "input_layernorm.weight"], self.eps)
        attn = self.mla_attention if self.deepseek else self.dense_attention
        x = x + attn(i, a, cos, sin, allowed)
        m = rms_norm(x, P[p + "post_attention_layernorm.weight"], self.eps)
        return x + (self.moe_mlp(i, m) if self.is_moe(i) else self.dense_mlp(i, m))

    def rope(self, positions):
        c = self.cfg
        if self.deepseek:
            return rope_tables(c, positions, c["qk_rope_head_dim"])
        D = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        # Phi-4-mini: int(head_dim * partial_rotary_factor) channels rotate (the default rope init
        # and _compute_longrope_parameters both take that dim)
        partial = c.get("partial_rotary_factor", 1.0) if self.type == "phi3" else 1.0
        return rope_tables(c, positions, int(D * partial))

    def head_weight(self):
        return self.P["model.embed_tokens.weight"] if self.tied else self.P["lm_head.weight"]

    def forward(self, ids, positions=None):
        """ids [b, s] (one sample per row) -> logits [b, s, V], pre-norm and final-normed hidden."""
        b, s = ids.shape
        if positions is None:
            positions = torch.arange(s)[None].expand(b, s)
        cos, sin = self.rope(positions)
        allowed = attention_mask(s, self.window())
        x = self.P["model.embed_tokens.weight"][ids]
        for i in range(self.layers):
            x = self.decoder_layer(i, x, cos, sin, allowed)
        hn = rms_norm(x, self.P["model.norm.weight"], self.eps)
        return {"logits": linear(hn, self.head_weight()), "hidden": x, "hidden_normed": hn,
                "rope": (cos, sin), "allowed": allowed}

    def mtp_losses(self, ids, labels, h0, rope, allowed):
        """DeepSeek-V3 multi-token prediction with Megatron-Core's semantics (the HF model has none).

        Facts relied on, read in Megatron-LM megatron/core/transformer/multi_token_prediction.py
        (and gpt_model.py / transformer_block.py) at commit d98e8a64:
        - roll_tensor(shifts=-1) is torch.roll left by one with the vacated last position set to 0;
          each MTP depth rolls input_ids (in _get_embeddings), labels and loss_mask (in
          process_mtp_loss) once more, so depth k sees ids/labels rolled k times and a mask with
          its last k positions 0 (loss_mask starts as ones when the caller gives none);
        - _concat_embeddings: eh_proj(cat([enorm(embedding(ids_k)), hnorm(h_{k-1})], -1)), the
          embedding first; the embedding and output layer are the main model's (HF stores copies
          in model.layers.{L+k-1}.embed_tokens / shared_head.head);
        - the block's decoder layer runs with the main model's rotary embedding and attention mask
          (rolling position_ids does not change RoPE, computed from the sequence length);
        - _postprocess applies the MTP final_layernorm (HF shared_head.norm) and that normed output
          is both the input of the output layer and h_k for the next depth;
        - h_0 is the decoder output, and with MTP the decoder's final_layernorm is applied inside
          the TransformerBlock (has_final_layernorm_in_this_stage), so h_0 is AFTER model.norm:
          the same hidden state that produces the main logits;
        - loss_k = sum(CE_k * mask_k) / sum(mask_k) (num_tokens of the rolled mask).
        The caller passes h0; fixtures use the final-normed hidden state as explained above.
        """
        c, P = self.cfg, self.P
        h = h0
        ids_k, labels_k = ids, labels
        mask = torch.ones_like(labels, dtype=h0.dtype)
        losses = []

        def roll(t):
            r = torch.roll(t, -1, dims=-1).clone()
            r[..., -1] = 0
            return r

        cos, sin = rope
        for k in range(1, c.get("num_nextn_predict_layers", 0) + 1):
            L = self.layers + k - 1
            p = f"model.layers.{L}."
            ids_k, labels_k, mask = roll(ids_k), roll(labels_k), roll(mask)
            e = rms_norm(P["model.embed_tokens.weight"][ids_k], P[p + "enorm.weight"], self.eps)
            x = linear(torch.cat([e, rms_norm(h, P[p + "hnorm.weight"], self.eps)], dim=-1), P[p + "eh_proj.weight"])
            x = self.decoder_layer(L, x, cos, sin, allowed)
            h = rms_norm(x, P[p + "shared_head.norm.weight"], self.eps)
            logits = linear(h, self.head_weight())
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels_k.reshape(-1), reduction="none")
            losses.append((ce * mask.reshape(-1)).sum() / mask.sum())
        return losses

    def mark_mtp_copies_used(self):
        """The MTP blocks' embedding/head copies must equal the main ones (Megatron shares them)."""
        P = self.P
        for k in range(self.cfg.get("num_nextn_predict_layers", 0)):
            p = f"model.layers.{self.layers + k}."
            assert torch.equal(P[p + "embed_tokens.weight"], P["model.embed_tokens.weight"])
            assert torch.equal(P[p + "shared_head.head.weight"], self.head_weight())


# ---- fixture content -----------------------------------------------------------------------------

def make_inputs(vocab):
    b = torch.arange(BATCH)[:, None]
    i = torch.arange(SEQ)[None, :]
    ids = (i * 37 + b * 101 + 7) % vocab
    labels = torch.cat([ids[:, 1:], torch.full((BATCH, 1), LAST_LABEL)], dim=1)
    return ids.long(), labels.long()


def grad_names(model, ids):
    """Parameters whose loss gradients the fixture stores (embedding, final norm, a layer-0
    attention weight, the last layer's MLP/expert down and router, lm_head, arch extras)."""
    c, t = model.cfg, model.type
    last = model.layers - 1
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if t == "deepseek_v2":
        names.append("model.layers.0.self_attn.kv_b_proj.weight")
    elif t == "deepseek_v3":
        if c.get("q_lora_rank") is not None:
            names.append("model.layers.0.self_attn.q_b_proj.weight")
        names.append("model.layers.0.self_attn.kv_a_proj_with_mqa.weight")
    elif t == "phi3":
        names.append("model.layers.0.self_attn.qkv_proj.weight")
    else:
        names.append("model.layers.0.self_attn.q_proj.weight")
        if t in ("llama", "mistral"):
            names.append("model.layers.0.self_attn.k_proj.weight")
        if t == "qwen2":
            names.append("model.layers.0.self_attn.k_proj.bias")
        if t == "qwen3":
            names.append("model.layers.0.self_attn.q_norm.weight")
    if model.is_moe(last):
        # The routed expert of the last layer that receives the most tokens.
        model.record = []
        with torch.no_grad():
            model.forward(ids)
        rec = [r for r in model.record if r["layer"] == last][0]
        model.record = None
        counts = torch.bincount(rec["idx"].reshape(-1), minlength=rec["logits"].shape[1])
        e = int(counts.argmax())
        if t == "mixtral":
            p = f"model.layers.{last}.block_sparse_moe."
            names += [p + f"experts.{e}.w2.weight", p + "gate.weight"]
        else:
            p = f"model.layers.{last}.mlp."
            names += [p + f"experts.{e}.down_proj.weight", p + "gate.weight"]
            if t == "qwen2_moe":
                names.append(p + "shared_expert_gate.weight")
    else:
        names.append(f"model.layers.{last}.mlp.down_proj.weight")
        if t == "phi3":
            names.append(f"model.layers.{last}.mlp.gate_up_proj.weight")
    if not model.tied:
        names.append("lm_head.weight")
    return names


def loss_and_grads(cfg, P, ids, labels, names):
    """(model, forward outputs, loss, {name: grad}) of a fresh forward with `names` requiring grad."""
    P = Params({k: (v.detach().clone().requires_grad_(k in names) if v.is_floating_point() else v)
                for k, v in P.items()})
    model = Model(cfg, P)
    out = model.forward(ids)
    logits = out["logits"]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    grads = torch.autograd.grad(loss, [P[n] for n in names])
    return model, out, loss, dict(zip(names, grads))


def build_fixture(fid, cfg, P):
    vocab = cfg["vocab_size"]
    ids, labels = make_inputs(vocab)
    model0 = Model(cfg, Params(P))
    names = grad_names(model0, ids)
    model, out, loss, grads = loss_and_grads(cfg, P, ids, labels, names)
    model.mark_mtp_copies_used()
    tensors = {"input_ids": ids, "labels": labels, "logits": out["logits"].detach(), "loss": loss.detach()}
    row_ids = torch.unique(torch.cat([ids.reshape(-1), labels.reshape(-1), torch.tensor([0, vocab - 1])]))
    row_subset = []
    for n, g in grads.items():
        if g.shape[0] == vocab:
            row_subset.append(n)
            tensors["grad." + n] = g[row_ids].contiguous()
        else:
            tensors["grad." + n] = g
    tensors["grad_row_ids"] = row_ids.long()

    # Packed: the samples run one at a time (positions from 0), their logits concatenated.
    a, b = PACK
    with torch.no_grad():
        la = model.forward(ids[0:1, :a])["logits"]
        lb = model.forward(ids[1:2, :b])["logits"]
    tensors["packed_input_ids"] = torch.cat([ids[0, :a], ids[1, :b]])[None]
    tensors["packed_position_ids"] = torch.cat([torch.arange(a), torch.arange(b)])[None].long()
    tensors["packed_cu_seqlens"] = torch.tensor([0, a, a + b], dtype=torch.int32)
    tensors["packed_logits"] = torch.cat([la, lb], dim=1)

    meta = {"model": fid, "grads": ",".join(names), "grad_row_subset": ",".join(row_subset),
            "generator": "scripts/reference.py", "torch": torch.__version__}
    extra = {}
    if cfg.get("num_nextn_predict_layers", 0) > 0:
        with torch.no_grad():
            losses = model.mtp_losses(ids, labels, out["hidden_normed"], out["rope"], out["allowed"])
            pre = model.mtp_losses(ids, labels, out["hidden"], out["rope"], out["allowed"])
        for k, l in enumerate(losses, 1):
            tensors[f"mtp_loss_{k}"] = l.reshape(())
        meta["mtp"] = "h0 = final-normed decoder output (Megatron-Core); mask_k zeroes the last k positions"
        extra["mtp_prenorm"] = [float(l) for l in pre]
    unused = set(P) - model.P.used
    assert not unused, f"{fid}: weights never read: {sorted(unused)[:8]}"
    return tensors, meta, extra


# ---- self-checks ---------------------------------------------------------------------------------

def maxdiff(a, b):
    return float((a.double() - b.double()).abs().max())


class Report:
    def __init__(self):
        self.lines = []
        self.failed = 0

    def check(self, name, ok, detail):
        self.lines.append(f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}")
        if not ok:
            self.failed += 1

    def note(self, text):
        self.lines.append(f"  [info] {text}")


def naive_dense_attention(model, i, x, positions):
    """Loops over heads, queries and keys; GQA by index; complex-number RoPE on (j, j + R/2) pairs."""
    c, P = model.cfg, model.P
    p = f"model.layers.{i}.self_attn."
    H, KV = c["num_attention_heads"], c["num_key_value_heads"]
    D = c.get("head_dim") or c["hidden_size"] // H
    bias = model.type in ("qwen2", "qwen2_moe")
    W = model.window()
    # channels (j, j + R/2) for j < R/2 rotate; channels from R on pass through (Phi-4-mini)
    R = int(D * c.get("partial_rotary_factor", 1.0)) if model.type == "phi3" else D
    inv, att = rope_inv_freq(c, R, int(positions.max()) + 1)
    b, s, _ = x.shape
    out = torch.zeros(b, s, H * D, dtype=torch.float64)
    for bi in range(b):
        xb = x[bi].double()

        def proj(name, n):
            if model.type == "phi3":  # rows of qkv_proj: [q (H heads); k (KV); v (KV)]
                start = {"q_proj": 0, "k_proj": H * D, "v_proj": (H + KV) * D}[name]
                w = P[p + "qkv_proj.weight"].double()[start:start + n * D]
                return (xb @ w.T).view(s, n, D)
            w = P[p + name + ".weight"].double()
            y = xb @ w.T
            if bias:
                y = y + P[p + name + ".bias"].double()
            return y.view(s, n, D)

        q, k, v = proj("q_proj", H), proj("k_proj", KV), proj("v_proj", KV)
        if model.type in ("qwen3", "qwen3_moe"):
            q = rms_norm(q, P[p + "q_norm.weight"].double(), model.eps)
            k = rms_norm(k, P[p + "k_norm.weight"].double(), model.eps)

        def rot(t, pos):
            z = torch.complex(t[..., : R // 2], t[..., R // 2:R])
            z = z * torch.polar(torch.full_like(inv, att), pos * inv)
            return torch.cat([z.real, z.imag, t[..., R:]], dim=-1)

        for h in range(H):
            g = h // (H // KV)
            for qi in range(s):
                qv = rot(q[qi, h], float(positions[bi, qi]))
                scores, vals = [], []
                for kj in range(qi + 1):
                    if W and qi - kj >= W:
                        continue
                    scores.append(float(qv @ rot(k[kj, g], float(positions[bi, kj]))) / math.sqrt(D))
                    vals.append(v[kj, g])
                wts = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)
                out[bi, qi, h * D:(h + 1) * D] = sum(w * vv for w, vv in zip(wts, vals))
    return out @ P[p + "o_proj.weight"].double().T


def naive_mla(model, i, x, positions):
    """Per-head MLA written the DeepSeek-inference way: complex RoPE on interleaved (2j, 2j+1)
    pairs, the shared rope key, explicit loops over heads and keys, float64."""
    c, P = model.cfg, model.P
    p = f"model.layers.{i}.self_attn."
    H = c["num_attention_heads"]
    nope, rope, vd, r = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    inv, att = rope_inv_freq(c, rope)
    scale = model.mla_softmax_scale()
    b, s, _ = x.shape
    W = {n: P[n].double() for n in P if n.startswith(p)}

    def norm(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    out = torch.zeros(b, s, H * vd, dtype=torch.float64)
    for bi in range(b):
        xb = x[bi].double()
        if c.get("q_lora_rank") is None:
            q = xb @ W[p + "q_proj.weight"].T
        else:
            q = norm(xb @ W[p + "q_a_proj.weight"].T, W[p + "q_a_layernorm.weight"]) @ W[p + "q_b_proj.weight"].T
        ckv = xb @ W[p + "kv_a_proj_with_mqa.weight"].T
        lat = norm(ckv[:, :r], W[p + "kv_a_layernorm.weight"])
        kpe = ckv[:, r:]
        kvb = W[p + "kv_b_proj.weight"].view(H, nope + vd, r)

        def rot(t, pos):
            z = torch.complex(t[0::2], t[1::2]) * torch.polar(torch.full_like(inv, att), pos * inv)
            return torch.stack([z.real, z.imag], dim=-1).reshape(-1)

        for h in range(H):
            qh = q[:, h * (nope + rope):(h + 1) * (nope + rope)]
            kn = lat @ kvb[h, :nope].T
            vv = lat @ kvb[h, nope:].T
            for qi in range(s):
                qpe = rot(qh[qi, nope:], float(positions[bi, qi]))
                sc = []
                for kj in range(qi + 1):
                    kr = rot(kpe[kj], float(positions[bi, kj]))
                    sc.append(float(qh[qi, :nope] @ kn[kj] + qpe @ kr) * scale)
                wts = torch.softmax(torch.tensor(sc, dtype=torch.float64), 0)
                out[bi, qi, h * vd:(h + 1) * vd] = (wts[:, None] * vv[: qi + 1]).sum(0)
    return out @ W[p + "o_proj.weight"].T


def naive_v3_route(scores, bias, n_group, topk_group, k):
    """Per-token loops: group score = sum of the top-2 biased scores; keep topk_group groups;
    top-k biased scores among their experts; weights = unbiased scores."""
    T, E = scores.shape
    per = E // n_group
    idx_all = []
    for t in range(T):
        biased = [float(scores[t, e] + bias[e]) for e in range(E)]
        gs = [sum(sorted(biased[g * per:(g + 1) * per], reverse=True)[:2]) for g in range(n_group)]
        keep = sorted(range(n_group), key=lambda g: -gs[g])[:topk_group]
        cand = [e for g in keep for e in range(g * per, (g + 1) * per)]
        idx_all.append(sorted(sorted(cand, key=lambda e: -biased[e])[:k]))
    return idx_all


def fd_check(report, fid, cfg, P, ids, labels, name, elems, eps=1e-5):
    """Autograd vs central differences in float64 for a few elements of one parameter; the loss
    (~7) carries ~1e-15 rounding, so differences of size eps have ~1e-10 absolute noise."""
    P64 = P.cast(torch.float64)

    def loss_of(Pd):
        m = Model(cfg, Pd)
        lg = m.forward(ids)["logits"]
        return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels.reshape(-1))

    _, _, _, grads = loss_and_grads(cfg, P64, ids, labels, [name])
    g = grads[name].reshape(-1)
    worst, worst_abs, ok = 0.0, 0.0, True
    for e in elems:
        base = P64[name]
        plus, minus = Params(P64), Params(P64)
        dp = base.clone().reshape(-1)
        dp[e] += eps
        plus[name] = dp.view_as(base)
        dm = base.clone().reshape(-1)
        dm[e] -= eps
        minus[name] = dm.view_as(base)
        fd = (float(loss_of(plus)) - float(loss_of(minus))) / (2 * eps)
        err = abs(fd - float(g[e]))
        ok = ok and err <= 1e-9 + 1e-5 * abs(fd)
        worst, worst_abs = max(worst, err / max(abs(fd), 1e-30)), max(worst_abs, err)
    report.check(f"{fid}: d loss / d {name} (float64 autograd vs central differences, {len(elems)} elems)",
                 ok, f"worst relative error {worst:.1e}, absolute {worst_abs:.1e} (|grad| ~{float(g.abs().max()):.1e})")


def self_checks(models, report):
    """models: {id: (cfg, P, fixture tensors, extra values)}."""
    torch.manual_seed(0)
    for fid, (cfg, P, T, _) in models.items():
        ids = T["input_ids"]
        # Packed samples vs the same positions of the unpacked batch (causal, window and routing
        # are all prefix-independent, so every packed row must match).
        a, b = PACK
        d = max(maxdiff(T["packed_logits"][0, :a], T["logits"][0, :a]),
                maxdiff(T["packed_logits"][0, a:], T["logits"][1, :b]))
        rs = cfg.get("rope_scaling") or {}
        if cfg.get("model_type") == "phi3" and rs.get("type", rs.get("rope_type")) == "longrope":
            # longrope is not prefix-independent: the 12-token rows pass the original context (long
            # factors), the packed samples of 5 and 7 tokens do not (short factors)
            report.check(f"{fid}: packed logits != unpacked rows (short vs long factors)", d > 1e-4,
                         f"max |diff| {d:.2e}")
            with torch.no_grad():
                m = Model(cfg, P)
                short = m.forward(ids[:, :b])["logits"]
            d = max(maxdiff(T["packed_logits"][0, :a], short[0, :a]),
                    maxdiff(T["packed_logits"][0, a:], short[1, :b]))
            report.check(f"{fid}: packed logits == the rows cut to 7 tokens (short factors there too)", d < 1e-5,
                         f"max |diff| {d:.2e}")
            continue
        report.check(f"{fid}: packed logits == unpacked rows (row0[:5], row1[:7])", d < 1e-5, f"max |diff| {d:.2e}")

    # Tied vs untied: llama-tied with an explicit lm_head copy of the embedding.
    cfg, P, T, _ = models["llama-tied"]
    ids, labels = T["input_ids"], T["labels"]
    cfg_u = dict(cfg, tie_word_embeddings=False)
    P_u = Params(P)
    P_u["lm_head.weight"] = P["model.embed_tokens.weight"].clone()
    _, out_u, loss_u, g_u = loss_and_grads(cfg_u, P_u, ids, labels, ["model.embed_tokens.weight", "lm_head.weight"])
    _, out_t, loss_t, g_t = loss_and_grads(cfg, P, ids, labels, ["model.embed_tokens.weight"])
    d1 = maxdiff(out_u["logits"], out_t["logits"])
    d2 = maxdiff(g_u["model.embed_tokens.weight"] + g_u["lm_head.weight"], g_t["model.embed_tokens.weight"])
    report.check("llama-tied: untied copy gives the same logits", d1 == 0.0, f"max |diff| {d1:.2e}")
    report.check("llama-tied: tied grad == embedding grad + lm_head grad of the untied copy", d2 < 1e-7,
                 f"max |diff| {d2:.2e}")

    # Routing: renormalised weights sum to 1 (times routed_scaling_factor), qwen2-moe's do not,
    # V3 group-limited selection against a per-token loop.
    for fid, (cfg, P, T, _) in models.items():
        m = Model(cfg, Params(P))
        if not any(m.is_moe(i) for i in range(m.layers)):
            continue
        m.record = []
        with torch.no_grad():
            out = m.forward(T["input_ids"])
            if cfg.get("num_nextn_predict_layers"):
                m.mtp_losses(T["input_ids"], T["labels"], out["hidden_normed"], out["rope"], out["allowed"])
        sums = torch.cat([r["raw"].sum(-1) for r in m.record])
        wsum = torch.cat([r["weights"].sum(-1) for r in m.record])
        renorm = cfg.get("norm_topk_prob", False) or m.type == "mixtral"
        rsf = cfg.get("routed_scaling_factor", 1.0)
        if renorm:
            d = float((sums - 1).abs().max())
            d2 = float((wsum - rsf).abs().max())
            report.check(f"{fid}: top-k weights sum to 1 (x routed_scaling_factor {rsf} -> {rsf})",
                         d < 1e-6 and d2 < 1e-5, f"max |sum - 1| {d:.1e}, max |wsum - rsf| {d2:.1e}")
        else:
            report.check(f"{fid}: top-k weights are not renormalised (norm_topk_prob false)",
                         float(sums.max()) < 1.0, f"sums in [{float(sums.min()):.3f}, {float(sums.max()):.3f}]")
        counts = torch.bincount(torch.cat([r["idx"].reshape(-1) for r in m.record]))
        report.note(f"{fid}: expert load over all MoE layers {counts.tolist()}")
        if cfg.get("scoring_func") == "sigmoid":
            bad = 0
            for r in m.record:
                bias = P[f"model.layers.{r['layer']}.mlp.gate.e_score_correction_bias"]
                naive = naive_v3_route(torch.sigmoid(r["logits"]), bias, cfg["n_group"], cfg["topk_group"],
                                       cfg["num_experts_per_tok"])
                mine = [sorted(x) for x in r["idx"].tolist()]
                bad += sum(1 for x, y in zip(naive, mine) if x != y)
                wn = torch.sigmoid(r["logits"]).gather(1, r["idx"])
                wn = wn / wn.sum(-1, keepdim=True) * rsf
                assert maxdiff(wn, r["weights"]) < 1e-6
            biased_changes = 0
            for r in m.record:
                plain = torch.sigmoid(r["logits"]).topk(cfg["num_experts_per_tok"], -1).indices
                biased_changes += sum(1 for x, y in zip(plain.tolist(), r["idx"].tolist()) if sorted(x) != sorted(y))
            report.check(f"{fid}: group-limited biased top-k == per-token loop", bad == 0,
                         f"{bad} mismatching tokens; the bias/group rule changes the choice of "
                         f"{biased_changes}/{sum(len(r['idx']) for r in m.record)} tokens vs plain top-k")

    # Attention against loop implementations (layer 0 input = normed embeddings).
    for fid, (cfg, P, T, _) in models.items():
        m = Model(cfg, Params(P))
        ids = T["input_ids"]
        pos = torch.arange(SEQ)[None].expand(BATCH, SEQ)
        x = rms_norm(P["model.embed_tokens.weight"][ids], P["model.layers.0.input_layernorm.weight"], m.eps)
        cos, sin = m.rope(pos)
        allowed = attention_mask(SEQ, m.window())
        with torch.no_grad():
            if m.deepseek:
                fast = m.mla_attention(0, x, cos, sin, allowed)
                slow = naive_mla(m, 0, x, pos)
                label = "MLA == naive per-head MLA (complex RoPE on interleaved pairs, float64)"
            else:
                fast = m.dense_attention(0, x, cos, sin, allowed)
                slow = naive_dense_attention(m, 0, x, pos)
                label = "attention == naive loops (GQA by index, complex RoPE, window by loop, float64)"
        d = maxdiff(fast, slow)
        rel = d / float(slow.abs().max())
        report.check(f"{fid}: layer-0 {label}", rel < 1e-5, f"max |diff| {d:.2e} (relative {rel:.1e})")

    # Finite differences in float64 (small parameters, elements spread over the tensor).
    for fid, name, elems in [
        ("llama", "model.norm.weight", [0, 17, 63]),
        ("llama", "model.layers.0.self_attn.k_proj.weight", [5, 300, 1000]),
        ("mistral", "model.layers.3.input_layernorm.weight", [1, 40]),
        ("qwen3", "model.layers.0.self_attn.q_norm.weight", [0, 9, 15]),
        ("mixtral", "model.layers.3.block_sparse_moe.gate.weight", [0, 77, 200]),
        ("qwen2-moe", "model.layers.3.mlp.shared_expert_gate.weight", [0, 31, 63]),
        ("qwen2-moe", "model.layers.3.mlp.gate.weight", [3, 150]),
        ("deepseek-v2", "model.layers.0.self_attn.kv_a_layernorm.weight", [0, 31]),
        ("deepseek-v3", "model.layers.3.mlp.gate.weight", [0, 100, 333]),
        ("deepseek-v3", "model.layers.0.self_attn.q_a_layernorm.weight", [0, 23]),
        ("moonlight", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight", [64 * 32 + 3, 64 * 39 + 60]),
        ("phi3", "model.layers.0.self_attn.qkv_proj.weight", [5, 64 * 64 + 7, 64 * 80 + 63]),
        ("phi3", "model.layers.3.mlp.gate_up_proj.weight", [3, 64 * 96 + 10]),
        # query channel 7 and key channel 7 pass through, key channel 2 rotates (6 of 8 rotate)
        ("phi4-mini", "model.layers.0.self_attn.qkv_proj.weight", [7 * 64 + 3, 66 * 64 + 10, 71 * 64 + 5]),
    ]:
        cfg, P, T, _ = models[fid]
        fd_check(report, fid, cfg, P, T["input_ids"], T["labels"], name, elems)

    # MTP: the mask and the hidden-state convention.
    if "deepseek-v3" in models:
        cfg, P, T, _ = models["deepseek-v3"]
        report.note(f"deepseek-v3: main loss {float(T['loss']):.6f}, mtp_loss_1 (h0 after model.norm, "
                    f"Megatron) {float(T['mtp_loss_1']):.6f}, with h0 before model.norm it would be "
                    f"{models['deepseek-v3'][3]['mtp_prenorm'][0]:.6f} (22 of 24 positions counted)")
        # Brute force: depth-1 MTP position i predicts labels[i + 1] from ids[i + 1] and h0[i].
        m = Model(cfg, Params(P))
        with torch.no_grad():
            out = m.forward(T["input_ids"])
            ids, labels = T["input_ids"], T["labels"]
            p = f"model.layers.{m.layers}."
            e = rms_norm(P["model.embed_tokens.weight"][ids[:, 1:]], P[p + "enorm.weight"], m.eps)
            hh = rms_norm(out["hidden_normed"][:, :-1], P[p + "hnorm.weight"], m.eps)
            x = linear(torch.cat([e, hh], -1), P[p + "eh_proj.weight"])
            cos, sin = m.rope(torch.arange(SEQ - 1)[None].expand(BATCH, SEQ - 1))
            x = m.decoder_layer(m.layers, x, cos, sin, attention_mask(SEQ - 1, None))
            lg = linear(rms_norm(x, P[p + "shared_head.norm.weight"], m.eps), P["lm_head.weight"])
            brute = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels[:, 1:].reshape(-1))
        d = abs(float(brute) - float(T["mtp_loss_1"]))
        report.check("deepseek-v3: mtp_loss_1 == MTP on the 11-token truncation (no rolled/zero token)",
                     d < 1e-5, f"|diff| {d:.1e}")


def sensitivity(models, report):
    """How far the logits move under plausible mistakes: the tolerance a parity test can afford."""
    probes = []

    def run(fid, change):
        cfg, P, T, _ = models[fid]
        cfg2, P2 = json.loads(json.dumps(cfg)), Params(P)
        m = change(cfg2, P2)
        if m is None:
            m = Model(cfg2, P2)
        with torch.no_grad():
            return maxdiff(m.forward(T["input_ids"])["logits"], T["logits"])

    def set_cfg(**kw):
        def f(cfg, P):
            cfg.update(kw)
        return f

    def mla_plain(cfg, P):
        m = Model(cfg, P)
        m.mla_rope = "plain"
        return m

    def v2_native_scale(cfg, P):
        m = Model(cfg, P)
        m.mla_softmax_scale = lambda: (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]) ** -0.5
        return m

    def half_rotary(cfg, P):
        cfg["partial_rotary_factor"] = 0.5
        cfg["rope_scaling"].update(short_factor=[1.0, 1.2], long_factor=[2.0, 5.0])

    def zero_bias(cfg, P):
        for n in list(P):
            if n.endswith("e_score_correction_bias"):
                P[n] = torch.zeros_like(P[n])

    probes += [
        ("llama", "rope_scaling removed (no llama3 rule)", set_cfg(rope_scaling=None)),
        ("llama", "llama3 without the smooth band (original_max 64)",
         set_cfg(rope_scaling={"rope_type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
                               "original_max_position_embeddings": 64})),
        ("llama-tied", "linear rope factor ignored", set_cfg(rope_scaling=None)),
        ("mistral", "sliding window off", set_cfg(sliding_window=None)),
        ("mistral", "window W + 1 (i - j <= W)", set_cfg(sliding_window=6)),
        ("qwen3", "rope_theta 10000 instead of 1e6", set_cfg(rope_theta=10000)),
        ("qwen2-moe", "norm_topk_prob true", set_cfg(norm_topk_prob=True)),
        ("deepseek-v2", "MLA rope without de-interleave", mla_plain),
        ("deepseek-v2", "yarn mscale on cos/sin ignored (mscale = mscale_all_dim)",
         set_cfg(rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 128,
                               "beta_fast": 32, "beta_slow": 1, "mscale": 0.75, "mscale_all_dim": 0.75})),
        ("deepseek-v2", "softmax scale without yarn_mscale(factor, mscale_all_dim)^2 (native transformers V2)",
         v2_native_scale),
        ("deepseek-v3", "routed_scaling_factor 1", set_cfg(routed_scaling_factor=1.0)),
        ("deepseek-v3", "no group limit (topk_group = n_group)", set_cfg(topk_group=4)),
        ("deepseek-v3", "MLA rope without de-interleave", mla_plain),
        ("moonlight", "e_score_correction_bias ignored", zero_bias),
        ("phi3-longrope", "short factors past the original context (no switch)",
         set_cfg(original_max_position_embeddings=256)),
        ("phi3-longrope", "no attention factor on cos/sin",
         lambda cfg, P: cfg["rope_scaling"].update(attention_factor=1.0)),
        ("phi4-mini", "half of each head rotating instead of 3/4 (the first two factors)", half_rotary),
    ]
    for fid, what, change in probes:
        if fid in models:
            report.note(f"sensitivity {fid}: {what}: logits move by max {run(fid, change):.2e}")
    for fid, (cfg, P, T, _) in models.items():
        report.note(f"{fid}: logits std {float(T['logits'].std()):.3f}, max |logit| "
                    f"{float(T['logits'].abs().max()):.3f}, loss {float(T['loss']):.6f}")


def main(argv):
    args = [a for a in argv if not a.startswith("--")]
    if len(args) != 2:
        print(__doc__)
        return 2
    hf_root, out_dir = args
    check = "--no-check" not in argv
    with open(os.path.join(HERE, "fixture-models.json")) as f:
        ids = [m["id"] for m in json.load(f)]
    only = [a.split("=", 1)[1] for a in argv if a.startswith("--ids=")]
    if only:
        ids = [i for i in ids if i in only[0].split(",")]
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    models = {}
    for fid in ids:
        cfg, W = load_hf(os.path.join(hf_root, fid))
        P = Params(W)
        tensors, meta, extra = build_fixture(fid, cfg, P)
        path = os.path.join(out_dir, fid + ".safetensors")
        write_safetensors(path, tensors, meta)
        print(f"wrote {path} ({os.path.getsize(path)} bytes): loss {float(tensors['loss']):.6f}, "
              f"grads {meta['grads']}" + (f", mtp_loss_1 {float(tensors['mtp_loss_1']):.6f}"
                                          if "mtp_loss_1" in tensors else ""))
        models[fid] = (cfg, P, tensors, extra)
    if check and set(ids) == set(models) and len(models) == 14:
        report = Report()
        self_checks(models, report)
        sensitivity(models, report)
        print("self-checks:")
        print("\n".join(report.lines))
        if report.failed:
            print(f"{report.failed} self-check(s) FAILED")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
