"""Checks the converter on checkpoints written by transformers itself (run on the GPU machine).

For each architecture: a randomly initialised model from a tiny config, saved with
save_pretrained; our converter takes it HF -> megapatch (TP2 PP2 EP2 where it applies) ->
megapatch (1,1,1) -> HF; every tensor must come back bit-identical, and the exported folder,
loaded with from_pretrained, must give exactly the original logits. Also: torch's FP8 decode
tables against ours, and a DeepSeek-V3 folder block-quantized to float8_e4m3fn with torch,
whose BF16 export must equal torch's own dequantization.

Usage (device call): python3 gpu_transformers_check.py <node> <roundtrip.mjs> <outDir>
"""
import json
import math
import os
import shutil
import subprocess
import sys
import traceback

import torch
import transformers
from safetensors.torch import load_file, save_file

NODE, SCRIPT, OUT = sys.argv[1], sys.argv[2], sys.argv[3]
WORK = "/tmp/mp-gpu-check"
shutil.rmtree(WORK, ignore_errors=True)
os.makedirs(WORK)
dev = "cuda" if torch.cuda.is_available() else "cpu"

small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256)
ds = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
          num_attention_heads=4, num_key_value_heads=4, vocab_size=1000, max_position_embeddings=256,
          kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
          n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, attention_dropout=0.0)

CASES = [
    ("llama", "LlamaConfig", dict(small, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_position_embeddings=64)), (2, 2, 1, 2)),
    ("llama-tied", "LlamaConfig", dict(small, tie_word_embeddings=True, num_key_value_heads=8), (2, 2, 1, 2)),
    ("mistral", "MistralConfig", dict(small), (2, 2, 1, 2)),
    ("qwen2", "Qwen2Config", dict(small, tie_word_embeddings=True), (2, 2, 1, 2)),
    ("qwen3", "Qwen3Config", dict(small, head_dim=32), (2, 2, 1, 2)),
    ("mixtral", "MixtralConfig", dict(small, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0), (2, 2, 2, 2)),
    ("qwen2-moe", "Qwen2MoeConfig", dict(small, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=64, mlp_only_layers=[0]), (2, 2, 2, 2)),
    ("qwen3-moe", "Qwen3MoeConfig", dict(small, head_dim=32, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32), (2, 2, 2, 1)),
    ("deepseek-v2", "DeepseekV2Config", dict(ds, q_lora_rank=None, n_routed_experts=4, topk_method="greedy"), (2, 2, 2, 2)),
    ("deepseek-v3", "DeepseekV3Config", dict(ds, q_lora_rank=32, n_routed_experts=8, n_group=2, topk_group=1,
                                             num_nextn_predict_layers=1), (2, 2, 2, 2)),
    ("moonlight", "DeepseekV3Config", dict(ds, q_lora_rank=None, n_routed_experts=8, n_group=1, topk_group=1), (2, 2, 2, 2)),
    ("phi3", "Phi3Config", dict(small, rope_theta=250000.0, sliding_window=2047), (2, 2, 1, 2)),
    ("phi3-longrope", "Phi3Config", dict(small, num_key_value_heads=8, original_max_position_embeddings=64,
                                         rope_scaling=dict(type="longrope", short_factor=[1.0, 1.1, 1.3, 1.7],
                                                           long_factor=[1.5, 3.0, 7.0, 12.0])), (2, 2, 1, 2)),
    ("phi4-mini", "Phi3Config", dict(small, tie_word_embeddings=True, original_max_position_embeddings=64,
                                     partial_rotary_factor=0.75,
                                     rope_scaling=dict(type="longrope", short_factor=[1.0, 1.2, 1.5],
                                                       long_factor=[2.0, 5.0, 9.0])), (2, 2, 1, 2)),
]


def bits(t):
    return t.contiguous().view(torch.uint8) if t.dtype != torch.bool else t


def load_dir(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


def roundtrip(hf_dir, work, layout):
    os.makedirs(work, exist_ok=True)
    r = subprocess.run([NODE, SCRIPT, hf_dir, work, *map(str, layout)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip()[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


results = {"torch": torch.__version__, "transformers": transformers.__version__, "device": dev, "cases": []}
for name, cls, kw, layout in CASES:
    res = {"case": name, "layout": layout}
    try:
        torch.manual_seed(0)
        cfg = getattr(transformers, cls)(**kw)
        model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
        # Norms start at 1 and biases at 0: randomise every parameter so nothing is trivially equal.
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        hf_dir = os.path.join(WORK, name, "hf")
        model.save_pretrained(hf_dir, safe_serialization=True)
        with open(os.path.join(hf_dir, "config.json")) as f:
            results.setdefault("saved_configs", {})[name] = f.read()
        rt = roundtrip(hf_dir, os.path.join(WORK, name), layout)
        a, b = load_dir(hf_dir), load_dir(os.path.join(WORK, name, "hf-back"))
        assert sorted(a) == sorted(b), f"tensor names differ: {sorted(set(a) ^ set(b))[:5]}"
        bad = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(bits(a[k]), bits(b[k]))]
        assert not bad, f"tensors differ: {bad[:5]}"
        model = model.to(dev).eval()
        back = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(WORK, name, "hf-back"),
                                                                torch_dtype=torch.bfloat16).to(dev).eval()
        ids = torch.randint(0, cfg.vocab_size, (2, 16), device=dev)
        with torch.no_grad():
            l0, l1 = model(ids).logits, back(ids).logits
        res.update(ok=True, tensors=len(a), bytes=rt["toMegapatch"]["bytes"], logits_equal=bool(torch.equal(l0, l1)),
                   max_abs_logit_diff=float((l0.float() - l1.float()).abs().max()),
                   megatron_tensors=rt["toMegapatch"]["tensors"], files=rt["toMegapatch"]["files"])
    except Exception as e:  # noqa: BLE001 - report every case
        res.update(ok=False, error=f"{type(e).__name__}: {e}"[-1500:], trace=traceback.format_exc()[-1500:])
    results["cases"].append(res)
    print(json.dumps({k: v for k, v in res.items() if k != "trace"}), flush=True)

def enc(v):
    """JSON-safe value: NaN, infinities and -0 as strings (as gpu-roundtrip.mjs writes them)."""
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0 and math.copysign(1, v) < 0:
        return "-0"
    return v


# FP8 decode tables: torch's float8 types against ours.
try:
    ours = json.loads(subprocess.run([NODE, SCRIPT, "--fp8-table"], capture_output=True, text=True, check=True).stdout)
    fp8 = {}
    for key, dt in (("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2)):
        vals = torch.arange(256, dtype=torch.uint8).view(dt).to(torch.float64).tolist()
        torch_tab = [enc(v) for v in vals]
        fp8[key] = torch_tab
        mism = [i for i in range(256) if torch_tab[i] != ours[key][i]]
        results[f"fp8_table_{key}_mismatches"] = mism
    with open(os.path.join(OUT, "fp8_torch.json"), "w") as f:
        json.dump({"source": f"torch {torch.__version__}: torch.arange(256, dtype=uint8).view(float8).to(float64)", **fp8}, f)
except Exception as e:  # noqa: BLE001
    results["fp8_table_error"] = f"{type(e).__name__}: {e}"

# DeepSeek-V3 block-quantized with torch (as the published checkpoints are), dequantized by us.
try:
    src = os.path.join(WORK, "deepseek-v3", "hf")
    q_dir = os.path.join(WORK, "ds-fp8", "hf")
    os.makedirs(q_dir, exist_ok=True)
    tensors = load_dir(src)
    block = (32, 16)
    quant, expected = {}, {}
    for k, t in tensors.items():
        router = k.endswith("mlp.gate.weight")
        if t.dim() == 2 and k.startswith("model.layers.") and k.endswith(".weight") and not router and "embed" not in k and "head" not in k:
            R, C = t.shape
            br, bc = math.ceil(R / block[0]), math.ceil(C / block[1])
            w = t.float()
            pad = torch.zeros(br * block[0], bc * block[1])
            pad[:R, :C] = w
            amax = pad.view(br, block[0], bc, block[1]).abs().amax(dim=(1, 3))
            s = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax)).float()
            se = s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:R, :C]
            q = (w / se).to(torch.float8_e4m3fn)
            quant[k] = q
            quant[k + "_scale_inv"] = s.contiguous()
            expected[k] = (q.to(torch.float32) * se).to(torch.bfloat16)
        else:
            quant[k] = t
            expected[k] = t
    save_file(quant, os.path.join(q_dir, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    json.dump(cfg, open(os.path.join(q_dir, "config.json"), "w"))
    roundtrip(q_dir, os.path.join(WORK, "ds-fp8"), (2, 2, 2, 2))
    got = load_dir(os.path.join(WORK, "ds-fp8", "hf-back"))
    bad = [k for k in expected if not torch.equal(bits(got[k]), bits(expected[k]))]
    back_cfg = json.load(open(os.path.join(WORK, "ds-fp8", "hf-back", "config.json")))
    results["fp8_dequant"] = {"tensors": len(expected), "quantized": sum(1 for k in quant if k.endswith("_scale_inv")),
                              "mismatched": bad[:10], "quantization_config_dropped": "quantization_config" not in back_cfg}
except Exception as e:  # noqa: BLE001
    results["fp8_dequant"] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}

with open(os.path.join(OUT, "transformers_check.json"), "w") as f:
    json.dump(results, f, indent=1)
print(json.dumps({k: v for k, v in results.items() if k != "cases"}, indent=1))
