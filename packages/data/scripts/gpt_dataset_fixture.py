#!/usr/bin/env python3
"""Generates the JSON fixtures under test/fixtures/gpt/ that pin @megapatch/data to numpy and to
Megatron-LM's GPTDataset / BlendedDataset index building.

The Megatron part is an independent numpy re-statement of the documented algorithm (numpy's own
RandomState supplies the randomness, so the fixture is authoritative for the RNG stream):
  * document index: mgrid[0:epochs, 0:len(docs)][1] filled with the split's ids, flattened, int32,
    shuffled; with a separate final epoch the first epochs-1 and the last epoch are built (and
    shuffled) separately, in that order, with the same RandomState;
  * sample index: the helpers.cpp walk, samples overlap by one token;
  * shuffle index: arange(num_samples) shuffled, with a separate final epoch the tail range is
    shuffled on its own afterwards;
  * blending: the deterministic greedy error rule of helpers.cpp::build_blending_indices.

Run with /usr/bin/python3 (numpy installed):  python3 scripts/gpt_dataset_fixture.py
"""

import json
import math
import os
import re

import numpy as np

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test", "fixtures", "gpt")
ADD_EXTRA_TOKEN = 1


def dump(name, obj):
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, name), "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.write("\n")


# ---------------------------------------------------------------- numpy RandomState fixtures


def numpy_random_fixture():
    seeds = [0, 1, 42, 1234, 2**32 - 1]
    uint32 = {}
    samples = {}
    for seed in seeds:
        rs = np.random.RandomState(seed)
        uint32[str(seed)] = [int(x) for x in rs.randint(0, 2**32, size=20, dtype=np.uint64)]
        rs = np.random.RandomState(seed)
        samples[str(seed)] = [float(x) for x in rs.random_sample(10)]
    # Bounded integers: randint(0, max+1) with int64 dtype follows the same masked rejection as
    # random_interval(max) (32-bit draws up to 0xffffffff, 64-bit draws above).
    bounded = []
    for seed, mx in [(7, 1), (7, 5), (7, 100), (3, 65536), (3, 2**31 + 5), (3, 2**32 - 1), (11, 2**32), (11, 2**40 + 3), (13, 2**52 + 12345)]:
        rs = np.random.RandomState(seed)
        bounded.append({"seed": seed, "max": mx, "values": [int(x) for x in rs.randint(0, mx + 1, size=12, dtype=np.int64)]})
    shuffles = []
    for seed, n in [(0, 1), (0, 2), (1, 10), (42, 100), (1234, 1000), (5, 70000)]:
        rs = np.random.RandomState(seed)
        a = np.arange(n, dtype=np.int32)
        rs.shuffle(a)
        if n <= 10000:
            shuffles.append({"seed": seed, "n": n, "result": [int(x) for x in a]})
        else:
            # Large n (exercises masks above 2^16): head, tail and an exact position-weighted sum
            # (< 2^53) keep the fixture small while still pinning every element.
            weighted = int(np.sum(np.arange(n, dtype=np.int64) * a.astype(np.int64)))
            shuffles.append({"seed": seed, "n": n, "head": [int(x) for x in a[:1000]], "tail": [int(x) for x in a[-1000:]], "weightedSum": weighted})
    # Two consecutive shuffles on one state (Megatron's order: document index, then shuffle index).
    rs = np.random.RandomState(99)
    a = np.arange(50, dtype=np.int32)
    b = np.arange(77, dtype=np.uint32)
    rs.shuffle(a)
    rs.shuffle(b)
    chained = {"seed": 99, "first": [int(x) for x in a], "second": [int(x) for x in b]}
    dump("numpy-random.json", {"uint32": uint32, "randomSample": samples, "bounded": bounded, "shuffles": shuffles, "chained": chained})


# ---------------------------------------------------------------- Megatron GPTDataset reference


def parse_split(split):
    vec = [float(x) for x in re.findall(r"[.0-9]+", split)]
    vec = vec + [0.0] * (3 - len(vec))
    arr = np.array(vec, dtype=np.float64)
    vec = (arr / np.sum(arr)).tolist()
    bookends = [0.0]
    for v in vec:
        bookends.append(bookends[-1] + v)
    return [(bookends[i], bookends[i + 1]) for i in range(3)]


def split_range(matrix, which, n):
    beg, end = matrix[which]
    # Python's round: half to even.
    return int(round(beg * float(n))), int(round(end * float(n)))


def build_document_index(docs, num_epochs, rs, separate_final_epoch):
    if not separate_final_epoch or num_epochs == 1:
        di = np.mgrid[0:num_epochs, 0 : len(docs)][1]
        di[:] = docs
        di = di.reshape(-1).astype(np.int32)
        rs.shuffle(di)
        return di
    first = build_document_index(docs, num_epochs - 1, rs, False)
    last = build_document_index(docs, 1, rs, False)
    return np.concatenate((first, last))


def build_sample_index(sizes, document_index, seq_len, num_epochs, tokens_per_epoch):
    num_samples = (num_epochs * tokens_per_epoch - ADD_EXTRA_TOKEN) // seq_len
    out = np.zeros((num_samples + 1, 2), dtype=np.int64)
    di_pos = 0
    offset = 0
    row = 1
    while row <= num_samples:
        remaining = seq_len + ADD_EXTRA_TOKEN
        while remaining != 0:
            doc = document_index[di_pos]
            doc_len = int(sizes[doc]) - offset
            remaining -= doc_len
            if remaining <= 0:
                offset += remaining + doc_len - ADD_EXTRA_TOKEN
                remaining = 0
            else:
                if di_pos == len(document_index) - 1:
                    assert row == num_samples
                    offset = int(sizes[document_index[di_pos]]) - ADD_EXTRA_TOKEN
                    break
                di_pos += 1
                offset = 0
        out[row] = (di_pos, offset)
        row += 1
    return out


def build_shuffle_index(num_samples, total, rs):
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(0, num_samples, dtype=dtype)
    rs.shuffle(first)
    if num_samples == total:
        return first
    last = np.arange(num_samples, total, dtype=dtype)
    rs.shuffle(last)
    return np.concatenate((first, last))


def gpt_indices(sizes, split, which, seq_len, num_samples, seed):
    matrix = parse_split(split)
    beg, end = split_range(matrix, which, len(sizes))
    docs = np.arange(beg, end, dtype=np.int32)
    tokens_per_epoch = int(np.sum(sizes[docs]))
    num_epochs = 1
    total = tokens_per_epoch
    while total < num_samples * seq_len + ADD_EXTRA_TOKEN:
        num_epochs += 1
        total += tokens_per_epoch
    if num_epochs == 1:
        separate = False
        sans_final = None
    else:
        sans_final = ((num_epochs - 1) * tokens_per_epoch - ADD_EXTRA_TOKEN) // seq_len
        from_final = num_samples - sans_final
        per_epoch = (tokens_per_epoch - ADD_EXTRA_TOKEN) // seq_len
        assert 0 <= from_final <= per_epoch + 1
        separate = from_final < int(0.80 * per_epoch)
    rs = np.random.RandomState(seed)
    di = build_document_index(docs, num_epochs, rs, separate)
    si = build_sample_index(sizes, di, seq_len, num_epochs, tokens_per_epoch)
    n = si.shape[0] - 1
    shuf = build_shuffle_index(sans_final if separate else n, n, rs)
    return {
        "range": [beg, end],
        "tokensPerEpoch": tokens_per_epoch,
        "numEpochs": num_epochs,
        "separateFinalEpoch": bool(separate),
        "documentIndex": di,
        "sampleIndex": si,
        "shuffleIndex": shuf,
    }


def get_sample(tokens_of, idx, i, seq_len):
    di, si, shuf = idx["documentIndex"], idx["sampleIndex"], idx["shuffleIndex"]
    j = int(shuf[i])
    b, bo = int(si[j][0]), int(si[j][1])
    e, eo = int(si[j + 1][0]), int(si[j + 1][1])
    parts = []
    if b == e:
        parts.append(tokens_of(int(di[b]))[bo : eo + ADD_EXTRA_TOKEN])
    else:
        for k in range(b, e + 1):
            t = tokens_of(int(di[k]))
            start = bo if k == b else 0
            stop = eo + ADD_EXTRA_TOKEN if k == e else len(t)
            parts.append(t[start:stop])
    text = [int(x) for p in parts for x in p]
    assert len(text) == seq_len + ADD_EXTRA_TOKEN, (len(text), i)
    return text


def gpt_fixture():
    rs = np.random.RandomState(20240601)
    sizes = rs.randint(1, 41, size=37).astype(np.int32)

    def tokens_of(doc):
        return [doc * 1000 + p for p in range(int(sizes[doc]))]

    configs = [
        {"name": "one-epoch-seq8", "split": "969,30,1", "which": 0, "seqLen": 8, "numSamples": 40, "seed": 1234},
        {"name": "one-epoch-seq33-valid", "split": "50,50,0", "which": 1, "seqLen": 33, "numSamples": 5, "seed": 7},
        {"name": "multi-epoch-joint-seq33", "split": "969,30,1", "which": 0, "seqLen": 33, "numSamples": None, "seed": 99},
        {"name": "multi-epoch-separate-seq8", "split": "969,30,1", "which": 0, "seqLen": 8, "numSamples": None, "seed": 5},
        {"name": "multi-epoch-separate-seq33", "split": "1", "which": 0, "seqLen": 33, "numSamples": None, "seed": 31337},
    ]
    out = {"sequenceLengths": [int(x) for x in sizes], "configs": []}
    for cfg in configs:
        beg, end = split_range(parse_split(cfg["split"]), cfg["which"], len(sizes))
        tpe = int(np.sum(sizes[beg:end]))
        per_epoch = (tpe - 1) // cfg["seqLen"]
        if cfg["name"] == "multi-epoch-joint-seq33":
            # Final (4th) epoch almost complete: no separate final epoch.
            cfg["numSamples"] = ((3 * tpe - 1) // cfg["seqLen"]) + int(0.95 * per_epoch)
        elif cfg["name"] == "multi-epoch-separate-seq8":
            # Final (3rd) epoch barely touched: separate final epoch.
            cfg["numSamples"] = ((2 * tpe - 1) // cfg["seqLen"]) + 3
        elif cfg["name"] == "multi-epoch-separate-seq33":
            cfg["numSamples"] = ((4 * tpe - 1) // cfg["seqLen"]) + int(0.5 * per_epoch)
        idx = gpt_indices(sizes, cfg["split"], cfg["which"], cfg["seqLen"], cfg["numSamples"], cfg["seed"])
        n = idx["sampleIndex"].shape[0] - 1
        samples = [get_sample(tokens_of, idx, i, cfg["seqLen"]) for i in range(min(50, n))]
        out["configs"].append(
            {
                **cfg,
                "splitName": ["train", "valid", "test"][cfg["which"]],
                "range": idx["range"],
                "tokensPerEpoch": idx["tokensPerEpoch"],
                "numEpochs": idx["numEpochs"],
                "separateFinalEpoch": idx["separateFinalEpoch"],
                "documentIndex": [int(x) for x in idx["documentIndex"]],
                "sampleIndex": [int(x) for x in idx["sampleIndex"].reshape(-1)],
                "shuffleIndex": [int(x) for x in idx["shuffleIndex"]],
                "samples": samples,
            }
        )
    flags = [(c["name"], c["numEpochs"], c["separateFinalEpoch"]) for c in out["configs"]]
    print("gpt configs:", flags)
    splits = {s: parse_split(s) for s in ["969,30,1", "1", "50,50,0", "98,2", "0.7 0.2 0.1", "1,1,1"]}
    out["splits"] = [
        {"split": s, "matrix": m, "ranges": {str(n): [list(split_range(m, w, n)) for w in range(3)] for n in [1, 3, 10, 37, 1001, 12345]}}
        for s, m in splits.items()
    ]
    dump("gpt-dataset.json", out)


# ---------------------------------------------------------------- blending reference


def blending_indices(weights, size):
    w = np.array(weights, dtype=np.float64)
    w = (w / np.sum(w)).tolist()
    counts = [0] * len(w)
    ds_index = []
    ds_sample = []
    for s in range(size):
        sd = max(float(s), 1.0)
        best = 0
        best_err = w[0] * sd - counts[0]
        for d in range(1, len(w)):
            err = w[d] * sd - counts[d]
            if err > best_err:
                best_err = err
                best = d
        ds_index.append(best)
        ds_sample.append(counts[best])
        counts[best] += 1
    return ds_index, ds_sample


def blended_fixture():
    cases = []
    for weights, size in [([1.0], 10), ([0.5, 0.5], 21), ([0.3, 0.7], 100), ([1, 2, 3], 200), ([0.1, 0.25, 0.05, 0.6], 1000), ([2.0, 2.0, 1.0], 57)]:
        di, ds = blending_indices(weights, size)
        surplus = [int(math.ceil(math.ceil(size * w) * (1 + 0.005))) for w in (np.array(weights) / np.sum(weights)).tolist()]
        cases.append({"weights": weights, "size": size, "datasetIndex": di, "datasetSampleIndex": ds, "perDataset": surplus})
    dump("blended.json", {"cases": cases})


if __name__ == "__main__":
    numpy_random_fixture()
    gpt_fixture()
    blended_fixture()
