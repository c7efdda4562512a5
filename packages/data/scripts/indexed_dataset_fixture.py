#!/usr/bin/env python3
"""Writes small Megatron .idx/.bin fixtures with numpy, independently of the TypeScript writer.

The writer below follows the documented format (megatron-core reference, section 1), not Megatron's
code, so the TypeScript reader and writer are checked against a second implementation.
Run: /usr/bin/python3 packages/data/scripts/indexed_dataset_fixture.py
"""
import json
import os
import struct

import numpy as np

CODES = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "float64": 6, "float32": 7, "uint16": 8}
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test", "fixtures", "indexed")


def write(prefix, dtype, documents, modes=None):
    """documents: list of documents, each a list of sequences (lists of ints)."""
    np_dtype = np.dtype(dtype)
    lengths, doc_idx = [], [0]
    with open(prefix + ".bin", "wb") as f:
        for doc in documents:
            for seq in doc:
                f.write(np.array(seq, dtype=np_dtype).tobytes(order="C"))
                lengths.append(len(seq))
            doc_idx.append(len(lengths))
    lengths_np = np.array(lengths, dtype=np.int32)
    # Pointers are byte offsets: the exclusive cumulative sum of length * itemsize.
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        pointers[1:] = np.cumsum(lengths_np[:-1].astype(np.int64) * np_dtype.itemsize)
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", CODES[dtype]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(lengths_np.astype("<i4").tobytes(order="C"))
        f.write(pointers.astype("<i8").tobytes(order="C"))
        f.write(np.array(doc_idx, dtype="<i8").tobytes(order="C"))
        if modes is not None:
            f.write(np.array(modes, dtype=np.int8).tobytes(order="C"))


FIXTURES = [
    # The byte-level test vector of the reference.
    {"name": "vector_uint16", "dtype": "uint16", "documents": [[[1, 2, 3]], [[4, 5]]]},
    # Multi-sequence documents, an empty document, a zero-length sequence and the uint16 extremes.
    {
        "name": "multi_uint16",
        "dtype": "uint16",
        "documents": [[[10, 11, 12]], [[20, 21], [22]], [], [[65535, 0], [], [7]]],
    },
    # Negative ids (SFT labels) and values beyond uint16 need int32.
    {
        "name": "multi_int32",
        "dtype": "int32",
        "documents": [[[-100, 100000, 2147483647], [-2147483648]], [], [[5, 6, 7, 8]], [[0]]],
    },
    {"name": "small_int64", "dtype": "int64", "documents": [[[1, -2, 3]], [[2147483647]]]},
    {
        "name": "modes_int32",
        "dtype": "int32",
        "documents": [[[1, 2], [3]], [[4]]],
        "modes": [0, 1, 2],
    },
]

if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    for fx in FIXTURES:
        write(os.path.join(OUT, fx["name"]), fx["dtype"], fx["documents"], fx.get("modes"))
    with open(os.path.join(OUT, "fixtures.json"), "w") as f:
        json.dump(FIXTURES, f, indent=1)
        f.write("\n")
