#!/usr/bin/python3
"""Writes safetensors fixtures for the TypeScript tests with an independent, hand-written
implementation of the published format (the `safetensors` package is not available here).

Usage: /usr/bin/python3 scripts/safetensors_fixture.py test/fixtures/safetensors
"""
import json
import os
import struct
import sys

import numpy as np
import torch


def write_safetensors(path, tensors, metadata=None):
    """tensors: list of (name, dtype string, shape, raw little-endian bytes), laid out in order."""
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, _, _, raw in tensors:
            f.write(raw)


def build():
    g = torch.Generator().manual_seed(0)
    f32 = torch.randn(2, 3, generator=g)
    bf16 = torch.tensor([1.0, -2.5, 3.140625, 1e-3, float("inf")], dtype=torch.bfloat16)
    f16 = torch.tensor([[0.5, -1.0], [65504.0, 1e-4]], dtype=torch.float16)
    t = []  # (name, dtype, shape, raw bytes, expected values for JSON)

    def add(name, dtype, arr, values):
        t.append((name, dtype, tuple(arr.shape), arr.tobytes(), values))

    add("model.layers.0.w", "F32", f32.numpy(), f32.flatten().tolist())
    add("emb.bf16", "BF16", bf16.view(torch.int16).numpy(), [int(v) & 0xFFFF for v in bf16.view(torch.int16).tolist()])
    add("f16", "F16", f16.view(torch.int16).numpy(), [int(v) & 0xFFFF for v in f16.view(torch.int16).flatten().tolist()])
    add("f64", "F64", np.array([1.5, -1e300], dtype="<f8"), [1.5, -1e300])
    add("i64", "I64", np.array([-(2**40), 7, 2**62], dtype="<i8"), [str(-(2**40)), "7", str(2**62)])
    add("u64", "U64", np.array([2**64 - 1], dtype="<u8"), [str(2**64 - 1)])
    add("i32", "I32", np.array([[-1, 2], [3, -4]], dtype="<i4"), [-1, 2, 3, -4])
    add("u32", "U32", np.array([4000000000], dtype="<u4"), [4000000000])
    add("i16", "I16", np.array([-300, 300], dtype="<i2"), [-300, 300])
    add("u16", "U16", np.array([65535], dtype="<u2"), [65535])
    add("i8", "I8", np.array([-128, 127], dtype="i1"), [-128, 127])
    add("u8", "U8", np.array([0, 255, 1], dtype="u1"), [0, 255, 1])
    add("mask", "BOOL", np.array([True, False, True]), [1, 0, 1])
    # torch 1.13 has no float8: store raw bytes (0x38 = 1.0 in E4M3, 0x3c = 1.0 in E5M2).
    add("fp8.e4m3", "F8_E4M3", np.array([0x38, 0xB8, 0x7E], dtype="u1"), [0x38, 0xB8, 0x7E])
    add("fp8.e5m2", "F8_E5M2", np.array([0x3C, 0x7B], dtype="u1"), [0x3C, 0x7B])
    add("scalar", "F32", np.array(2.5, dtype="<f4"), [2.5])
    add("empty", "F32", np.zeros((0, 3), dtype="<f4"), [])
    add("rows", "F32", np.arange(40, dtype="<f4").reshape(10, 4), list(range(40)))
    return t


def main(out):
    os.makedirs(out, exist_ok=True)
    tensors = build()
    metadata = {"format": "pt", "note": "héllo"}
    write_safetensors(os.path.join(out, "mixed.safetensors"), [x[:4] for x in tensors], metadata)
    expected = {
        "metadata": metadata,
        "order": [x[0] for x in tensors],
        "tensors": {n: {"dtype": d, "shape": list(s), "values": v} for n, d, s, _, v in tensors},
    }
    with open(os.path.join(out, "mixed.expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    # A two-shard checkpoint in the Hugging Face layout.
    shard_dir = os.path.join(out, "sharded")
    os.makedirs(shard_dir, exist_ok=True)
    halves = [tensors[:9], tensors[9:]]
    weight_map = {}
    for k, part in enumerate(halves, 1):
        name = "model-%05d-of-%05d.safetensors" % (k, len(halves))
        write_safetensors(os.path.join(shard_dir, name), [x[:4] for x in part], {"format": "pt"})
        weight_map.update({x[0]: name for x in part})
    index = {"metadata": {"total_size": sum(len(x[3]) for x in tensors)}, "weight_map": weight_map}
    with open(os.path.join(shard_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "test/fixtures/safetensors")
