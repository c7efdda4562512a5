"""The logits-parity fixtures against transformers itself (run where transformers is installed).

reference.py is this project's own reading of each architecture's Hugging Face modeling code; this
script checks that reading against the library: every fixture model's F32 checkpoint (the folders
scripts/write-fixture-checkpoints.ts writes) loaded with AutoModelForCausalLM.from_pretrained
(float32, eager attention), its logits, loss and the stored gradients compared with
test/fixtures/<id>.safetensors, and the packed samples run one at a time against packed_logits.

Usage: python3 transformers_parity.py <hfRoot> <fixturesDir> <out.json> [--engine=reference]
  --engine=reference runs reference.py's Model instead of transformers: the harness checked on a
  machine without transformers (every difference is then 0 or rounding).
Prints one JSON line per model and writes them all to <out.json>.
"""
import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import reference  # noqa: E402  (the fixture constants and the safetensors reader)

# relative to the largest |logit| or |grad| of the fixture
TOLERANCE = 1e-4


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def transformers_engine(folder):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    params = dict(model.named_parameters())

    def logits(ids):
        return model(input_ids=ids, use_cache=False).logits

    def param(name):
        if name in params:
            return params[name]
        # a tied lm_head is the embedding's parameter
        if name == "lm_head.weight":
            return model.get_output_embeddings().weight
        raise KeyError(f"transformers' model has no parameter {name}")

    return logits, param, f"transformers {transformers.__version__}"


def reference_engine(folder):
    cfg, W = reference.load_hf(folder)
    P = reference.Params({k: (v.clone().requires_grad_(True) if v.is_floating_point() else v) for k, v in W.items()})
    model = reference.Model(cfg, P)

    def logits(ids):
        return model.forward(ids)["logits"]

    return logits, lambda name: dict.__getitem__(P, name), "reference.py (harness check)"


def check(fid, folder, fixture, engine):
    T = reference.read_safetensors(fixture)
    logits_of, param, what = engine(folder)
    ids, labels = T["input_ids"].long(), T["labels"].long()
    out = {"model": fid, "engine": what}
    logits = logits_of(ids)
    vocab = T["logits"].shape[-1]
    out["logits"] = rel(logits[..., :vocab], T["logits"])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    out["loss"] = abs(float(loss) - float(T["loss"])) / abs(float(T["loss"]))
    grads = {}
    names = [k[len("grad."):] for k in T if k.startswith("grad.") and k != "grad_row_ids"]
    ps = [param(n) for n in names]
    for p in ps:
        p.requires_grad_(True)
    gs = torch.autograd.grad(loss, ps)
    rows = T["grad_row_ids"].long()
    for n, g in zip(names, gs):
        want = T["grad." + n]
        got = g[rows] if want.shape[0] != g.shape[0] else g
        grads[n] = rel(got, want)
    out["grads"] = grads
    a, b = reference.PACK
    with torch.no_grad():
        packed = torch.cat([logits_of(ids[0:1, :a]), logits_of(ids[1:2, :b])], dim=1)
    out["packed_logits"] = rel(packed[..., :vocab], T["packed_logits"])
    worst = max([out["logits"], out["loss"], out["packed_logits"], *grads.values()])
    out["worst"] = worst
    out["ok"] = worst <= TOLERANCE
    return out


def main(argv):
    args = [a for a in argv if not a.startswith("--")]
    if len(args) != 3:
        print(__doc__)
        return 2
    hf_root, fixtures, out_path = args
    engine = reference_engine if "--engine=reference" in argv else transformers_engine
    torch.manual_seed(0)
    with open(os.path.join(HERE, "fixture-models.json")) as f:
        ids = [m["id"] for m in json.load(f)]
    results = []
    for fid in ids:
        try:
            r = check(fid, os.path.join(hf_root, fid), os.path.join(fixtures, fid + ".safetensors"), engine)
        except Exception as e:  # noqa: BLE001 - report every model
            r = {"model": fid, "ok": False, "error": f"{type(e).__name__}: {e}"[-1500:],
                 "trace": traceback.format_exc()[-1500:]}
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "trace"}), flush=True)
    with open(out_path, "w") as f:
        json.dump({"tolerance": TOLERANCE, "models": results}, f, indent=1)
    bad = [r["model"] for r in results if not r["ok"]]
    print(f"{len(results) - len(bad)}/{len(results)} within {TOLERANCE:g}" + (f"; not: {', '.join(bad)}" if bad else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
