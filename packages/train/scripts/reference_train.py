"""Independent fp32 PyTorch reference of megapatch's pre-training loop (training-parity fixture).

Usage: /usr/bin/python3 reference_train.py <inputsDir> <fixture.json> [--no-check]

<inputsDir> is what scripts/dump-samples.ts wrote: hf/ (an F32 Llama HF folder), samples.json (the
run settings and the train split's first trainIters x globalBatchSize samples in GPTDataset order).
This trains the HF model for trainIters steps with Megatron-LM's semantics and writes the fixture:
  config        the run settings (samples.json's, with the digest of the inputs);
  losses        per step, the 'lm loss' Megatron-LM logs: sum(CE * lossMask) / sum(lossMask) over
                the whole global batch (training.py train_step averages the [loss, num_tokens]
                pairs that pretrain_gpt.py loss_func reports over all micro-batches);
  microMeanLosses  per step, the mean over micro-batches of each micro-batch's token mean: the
                objective whose gradient the step follows (schedules.py forward_step divides each
                micro-batch's loss by its num_tokens and by num_microbatches unless
                --calculate-per-token-loss), which is also what Megatron logged before loss_func
                returned token counts;
  gradNorms     per step, the global L2 norm of the gradients before clipping;
  appliedLrs    per step, the learning rate the update used;
  lrs           per step, the learning rate Megatron logs: read from the optimizer after
                opt_param_scheduler.step, i.e. the next step's.
Then it runs the sensitivity self-checks (skip with --no-check): each semantic the fixture pins,
changed on its own, must move the losses by far more than the test's 1e-4.

Megatron semantics, from Megatron-LM megatron/training/training.py (train_step, train),
megatron/core/pipeline_parallel/schedules.py (forward_step), megatron/core/optimizer/
(_get_param_groups, clip_grads.py) and megatron/core/optimizer_param_scheduler.py:
- step i (from 0) takes samples [i*GBS, (i+1)*GBS) (MegatronPretrainingSampler, one DP rank) in
  micro-batches of MBS consecutive samples; gradients accumulate over the micro-batches;
- AdamW (decoupled weight decay) with two groups: weight decay on parameters of ndim >= 2 that
  are not biases, none on biases and 1-D parameters (norm weights);
- OptimizerParamScheduler counts samples: the constructor applies step(0), train_step calls
  step(increment=GBS) after optimizer.step, so step i updates with get_lr(i * GBS) (0 at the first
  step with warm-up) and logs get_lr((i + 1) * GBS);
- clip_grad_norm_fp32: total L2 norm of all gradients, scaled by max_norm / (norm + 1e-6) when
  that is below 1.
The Llama forward pass is packages/models/scripts/reference.py's (written from transformers'
modeling_llama, independent of the TypeScript). Needs only torch (1.13, Debian python3-torch) and
numpy.
"""
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "models", "scripts"))
from reference import Model, Params, load_hf  # noqa: E402


def get_lr(c, num_steps):
    """OptimizerParamScheduler.get_lr with init_lr 0, counted in samples."""
    gbs = c["globalBatchSize"]
    max_lr, min_lr = c["lr"], c["minLr"]
    warmup = c["lrWarmupIters"] * gbs
    decay = c["trainIters"] * gbs
    if warmup > 0 and num_steps <= warmup:
        return max_lr * float(num_steps) / float(warmup)
    if num_steps > decay:
        return min_lr
    assert c["lrDecayStyle"] == "cosine"
    ratio = float(num_steps - warmup) / float(decay - warmup)
    return min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (max_lr - min_lr)


def micro_batches(c, samples, step):
    """The micro-batches of step `step`: (tokens, labels, loss mask) [MBS, seq] each."""
    gbs, mbs = c["globalBatchSize"], c["microBatchSize"]
    batch = samples[step * gbs:(step + 1) * gbs]
    out = []
    for m in range(0, gbs, mbs):
        rows = batch[m:m + mbs]
        out.append((torch.tensor([r["tokens"] for r in rows], dtype=torch.long),
                    torch.tensor([r["labels"] for r in rows], dtype=torch.long),
                    torch.tensor([r["lossMask"] for r in rows], dtype=torch.float32)))
    return out


def train(cfg, weights, c, samples, variant=None):
    """Runs the steps; `variant` changes one semantic (sensitivity checks). Returns the records."""
    P = Params({k: v.detach().clone().requires_grad_(True) for k, v in weights.items()})
    names = sorted(P)
    params = [dict.__getitem__(P, n) for n in names]
    no_wd = [p.ndim == 1 or n.endswith(".bias") for n, p in zip(names, params)]
    if variant == "decay-on-norms":
        no_wd = [False] * len(params)
    opt = torch.optim.AdamW(
        [{"params": [p for p, x in zip(params, no_wd) if not x], "weight_decay": c["weightDecay"]},
         {"params": [p for p, x in zip(params, no_wd) if x], "weight_decay": 0.0}],
        lr=0.0, betas=(c["adamBeta1"], c["adamBeta2"]), eps=c["adamEps"])
    gbs = c["globalBatchSize"]
    num_micro = gbs // c["microBatchSize"]
    num_steps = 0  # the constructor's step(0)
    rec = {"losses": [], "microMeanLosses": [], "gradNorms": [], "appliedLrs": [], "lrs": []}
    for step in range(c["trainIters"]):
        lr = get_lr(c, num_steps + (gbs if variant == "lr-one-step-late" else 0))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        micro = micro_batches(c, samples, step)
        sums, counts = [], []
        global_tokens = sum(float(m[2].sum()) for m in micro)
        for tokens, labels, mask in micro:
            logits = Model(cfg, P).forward(tokens)["logits"]
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
            loss = (ce * mask.reshape(-1)).sum()
            n = mask.sum()
            if variant == "per-token-objective":
                (loss / global_tokens).backward()
            else:
                (loss / n / num_micro).backward()
            sums.append(loss.item())
            counts.append(n.item())
        unused = set(names) - P.used
        assert not unused, f"parameters the forward pass never read: {sorted(unused)}"
        grads = [p.grad for p in params]
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        coeff = c["clipGrad"] / (norm + 1e-6)
        if c["clipGrad"] > 0 and coeff < 1.0 and variant != "no-clip":
            for g in grads:
                g.mul_(coeff)
        opt.step()
        num_steps += gbs
        rec["losses"].append(sum(sums) / sum(counts))
        rec["microMeanLosses"].append(sum(s / n for s, n in zip(sums, counts)) / num_micro)
        rec["gradNorms"].append(norm)
        rec["appliedLrs"].append(lr)
        rec["lrs"].append(get_lr(c, num_steps))
    return rec


def max_rel(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def sensitivity(cfg, weights, c, samples, base):
    """Each pinned semantic changed alone must move the losses and the gradient norms by more than
    5x the test's 1e-4 (the TypeScript loop agrees with this one to about 1e-6)."""
    ok = True
    for variant in ("decay-on-norms", "per-token-objective", "lr-one-step-late", "no-clip"):
        r = train(cfg, weights, c, samples, variant)
        dl = max_rel(r["microMeanLosses"], base["microMeanLosses"])
        dg = max_rel(r["gradNorms"], base["gradNorms"])
        good = min(dl, dg) > 5e-4
        ok &= good
        print(f"  {variant:20s} moves the losses by {dl:.2e}, the grad norms by {dg:.2e}"
              f" (max relative) {'ok' if good else 'TOO LITTLE'}")
    d = max_rel(base["microMeanLosses"], base["losses"])
    good = d > 5e-4
    ok &= good
    print(f"  {'micro-batch mean':20s} differs from the token mean by {d:.2e} {'ok' if good else 'TOO LITTLE'}")
    return ok


def main(argv):
    args = [a for a in argv if not a.startswith("--")]
    if len(args) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    inputs, out = args
    with open(os.path.join(inputs, "samples.json")) as f:
        dump = json.load(f)
    c, samples = dump["config"], dump["samples"]
    cfg, weights = load_hf(os.path.join(inputs, dump["hf"]))
    assert all(v.dtype == torch.float32 for v in weights.values())
    torch.set_num_threads(1)  # a fixed summation order from run to run
    rec = train(cfg, weights, c, samples)
    fixture = {"config": c, **rec}
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(fixture, f, indent=2)
        f.write("\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    for i in range(c["trainIters"]):
        print(f"  step {i + 1}: lm loss {rec['losses'][i]:.6f} (micro mean {rec['microMeanLosses'][i]:.6f})"
              f" | grad norm {rec['gradNorms'][i]:.4f} | lr {rec['appliedLrs'][i]:.3e} -> {rec['lrs'][i]:.3e}")
    if "--no-check" not in argv:
        print("sensitivity:")
        if not sensitivity(cfg, weights, c, samples, rec):
            print("a semantic the fixture pins barely changes the losses: choose other settings", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
