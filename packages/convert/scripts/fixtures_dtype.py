#!/usr/bin/python3
"""Writes reference fixtures for test/dtype-cast.test.ts: input bit patterns and the output bit
patterns that torch / numpy (or an exact rational reference) give for each floating-point cast.

Usage (from the repository root; needs Debian's python3-torch 1.13 and numpy, so use /usr/bin/python3):
    /usr/bin/python3 packages/convert/scripts/fixtures_dtype.py
Regenerates packages/convert/test/fixtures/dtype/*.json byte for byte (fixed seeds).

Files:
  <FROM>_to_<TO>.json  {from, to, reference, note, edge: [[label, in_hex, out_hex]...],
                        random: {count, input, expected}}  (input/expected: base64 little-endian bytes)
  exhaustive16.json    for each 16-bit source cast: sha256 of the outputs of all 65536 inputs in
                        order (outputs of NaN inputs replaced by the canonical quiet NaN of the
                        target) plus every 257th [in, out] pair as a readable sample.
Outputs of NaN inputs are only compared for NaN-ness by the tests, not bit for bit.
"""
import base64
import hashlib
import json
import math
import os
import struct
import warnings
from fractions import Fraction

import numpy as np
import torch

warnings.filterwarnings("ignore", category=RuntimeWarning)  # overflow/NaN casts are intended

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test", "fixtures", "dtype")

# (exponent bits, mantissa bits) of the IEEE-like targets
FORMATS = {"F64": (11, 52), "F32": (8, 23), "F16": (5, 10), "BF16": (8, 7)}
WIDTH = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
UINT = {"F64": np.uint64, "F32": np.uint32, "F16": np.uint16, "BF16": np.uint16}
TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
TORCH_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16}
NP_INT = {8: np.int64, 4: np.int32, 2: np.int16}
CANON_NAN = {"F32": 0x7FC00000, "F16": 0x7E00, "BF16": 0x7FC0}


# --- bit helpers -------------------------------------------------------------------------------

def is_nan_bits(bits, dtype):
    e, m = FORMATS[dtype]
    exp = (bits >> m) & ((1 << e) - 1)
    return exp == (1 << e) - 1 and bits & ((1 << m) - 1) != 0


def f64_bits(x):
    return struct.unpack("<Q", struct.pack("<d", x))[0]


def f64_from_bits(b):
    return struct.unpack("<d", struct.pack("<Q", b))[0]


def f32_bits(x):
    return int(np.array([x], dtype=np.float32).view(np.uint32)[0])


def hexw(bits, dtype):
    return "0x%0*x" % (WIDTH[dtype] * 2, bits)


# --- exact reference: round a float64 value once to a binary format (RNE) ---------------------

def exact_round(bits64, to):
    """Encodes the float64 with bits `bits64` in format `to`, rounding the exact value once."""
    e_bits, m_bits = FORMATS[to]
    bias = (1 << (e_bits - 1)) - 1
    emin = 1 - bias
    max_biased = (1 << e_bits) - 1
    sign = (bits64 >> 63) << (e_bits + m_bits)
    x = f64_from_bits(bits64)
    if math.isnan(x):
        return sign | (max_biased << m_bits) | (1 << (m_bits - 1))
    a = abs(x)
    if math.isinf(a):
        return sign | (max_biased << m_bits)
    if a == 0:
        return sign
    _, e = math.frexp(a)  # a = f * 2^e with f in [0.5, 1)
    exp = max(e - 1, emin)
    k = exp - m_bits  # value of one unit in the last place
    q = Fraction(a) / (Fraction(2) ** k)
    n = math.floor(q)
    rem = q - n
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n % 2 == 1):
        n += 1
    if e - 1 < emin:  # subnormal: the count n is the encoding (n = 2^m is the smallest normal)
        return sign | n
    if n == 1 << (m_bits + 1):  # rounding carried into the next binade
        n >>= 1
        exp += 1
    biased = exp + bias
    if biased >= max_biased:
        return sign | (max_biased << m_bits)
    return sign | (biased << m_bits) | (n - (1 << m_bits))


# --- casts through torch / numpy -----------------------------------------------------------------

def as_np_float(bits, dtype):
    return np.array(bits, dtype=UINT[dtype]).view({"F64": np.float64, "F32": np.float32, "F16": np.float16}[dtype])


def torch_cast(bits, src, dst):
    w = WIDTH[src]
    t = torch.from_numpy(np.array(bits, dtype=UINT[src]).view(NP_INT[w]).copy()).view(TORCH[src])
    r = t.to(TORCH[dst]).view(TORCH_INT[WIDTH[dst]]).numpy().view(UINT[dst])
    return [int(v) for v in r]


def numpy_cast(bits, src, dst):
    r = as_np_float(bits, src).astype({"F32": np.float32, "F16": np.float16, "F64": np.float64}[dst])
    return [int(v) for v in r.view(UINT[dst])]


def count_diff(a, b, inputs, src):
    return sum(1 for x, y, i in zip(a, b, inputs) if x != y and not is_nan_bits(i, src))


def pack(bits, dtype):
    return base64.b64encode(np.array(bits, dtype=UINT[dtype]).astype(np.dtype(UINT[dtype]).newbyteorder("<")).tobytes()).decode()


# --- inputs ----------------------------------------------------------------------------------------

def p2(k):
    return math.ldexp(1.0, k)


# Values given as float64 numbers (exact in float64); labels name why each is there.
EDGE_VALUES = [
    ("+0", 0.0), ("-0", -0.0), ("+Inf", math.inf), ("-Inf", -math.inf),
    ("1", 1.0), ("-1.5", -1.5), ("0.1", 0.1), ("-3.14159", -3.14159),
    # F32
    ("F32 max", float(np.finfo(np.float32).max)),
    ("F32 max + half ulp (tie, odd -> Inf)", float(np.finfo(np.float32).max) + p2(103)),
    ("F32 max + just under half ulp", float(np.finfo(np.float32).max) + p2(103) - p2(75)),
    ("F32 min normal", p2(-126)), ("F32 min subnormal", p2(-149)), ("F32 half min subnormal (tie -> 0)", p2(-150)),
    ("F32 1.5 min subnormal (tie -> 2)", 3 * p2(-150)), ("F32 tie even 1+2^-24", 1 + p2(-24)),
    ("F32 tie odd 1+3*2^-24", 1 + 3 * p2(-24)), ("F32 above tie 1+2^-24+2^-50", 1 + p2(-24) + p2(-50)),
    ("F64 max", 1.7976931348623157e308), ("F64 min subnormal", 5e-324), ("-F64 min normal", -p2(-1022)),
    # BF16
    ("BF16 max", (2 - p2(-7)) * p2(127)), ("BF16 max + half ulp (tie, odd -> Inf)", (2 - p2(-8)) * p2(127)),
    ("BF16 max + under half ulp", (2 - p2(-8) - p2(-23)) * p2(127)),
    ("BF16 tie even 1+2^-8", 1 + p2(-8)), ("BF16 tie odd 1+3*2^-8", 1 + 3 * p2(-8)),
    ("BF16 tie even + 2^-40 (double rounding via F32 goes down)", 1 + p2(-8) + p2(-40)),
    ("-BF16 tie even + 2^-60", -(1 + p2(-8) + p2(-60))),
    ("BF16 tie even - 2^-40", 1 + p2(-8) - p2(-40)),
    ("BF16 carry into next binade 2-2^-9", 2 - p2(-9)), ("BF16 carry 2-2^-8 (tie odd)", 2 - p2(-8)),
    ("BF16 min subnormal 2^-133", p2(-133)), ("BF16 half min subnormal 2^-134 (tie -> 0)", p2(-134)),
    ("BF16 2^-134 + tiny", p2(-134) + p2(-170)), ("BF16 1.5*2^-133 (tie -> 2)", 3 * p2(-134)),
    ("BF16 subnormal tie + tiny", 5 * p2(-134) + p2(-180)),
    ("BF16 largest subnormal rounds to min normal", (1 - p2(-9)) * p2(-126)),
    # F16
    ("F16 max 65504", 65504.0), ("F16 65519", 65519.0), ("F16 65520 (tie, odd -> Inf)", 65520.0),
    ("F16 65520 - 2^-30", 65520.0 - p2(-30)), ("F16 65536", 65536.0), ("F16 1e10", 1e10),
    ("F16 min normal 2^-14", p2(-14)), ("F16 just under min normal", p2(-14) - p2(-40)),
    ("F16 min subnormal 2^-24", p2(-24)), ("F16 2^-25 (tie -> 0)", p2(-25)),
    ("F16 2^-25 + tiny", p2(-25) + p2(-60)), ("F16 3*2^-25 (tie -> 2)", 3 * p2(-25)),
    ("F16 5*2^-25 (tie -> 2)", 5 * p2(-25)), ("F16 tie even 1+2^-11", 1 + p2(-11)),
    ("F16 tie odd 1+3*2^-11", 1 + 3 * p2(-11)), ("F16 tie even + 2^-40", 1 + p2(-11) + p2(-40)),
    ("F16 carry 2-2^-12", 2 - p2(-12)), ("-F16 1024.5 (tie even)", -1024.5), ("F16 2049 (tie)", 2049.0),
    ("F16 2051 (tie odd)", 2051.0), ("F16 subnormal tie 1023.5*2^-24", 1023.5 * p2(-24)),
]

# Extra float64 bit patterns: NaNs with payloads and sign.
EDGE_F64_BITS = [("NaN", 0x7FF8000000000000), ("-NaN payload", 0xFFF8000012345678),
                 ("sNaN", 0x7FF0000000000001), ("NaN low-word payload only", 0x7FF0000000000000 | 0x1)]
EDGE_F32_BITS = [("NaN", 0x7FC00000), ("-NaN payload", 0xFFC12345), ("sNaN", 0x7F800001),
                 ("F32 max finite (-> BF16 Inf)", 0x7F7FFFFF), ("BF16 tie even bits", 0x3F808000),
                 ("BF16 tie odd bits", 0x3F818000), ("BF16 above tie bits", 0x3F808001),
                 ("BF16 carry 0x3fff8000", 0x3FFF8000), ("BF16 max + tie bits", 0x7F7F8000),
                 ("BF16 max + under tie bits", 0x7F7F7FFF), ("F32 min subnormal", 0x00000001),
                 ("BF16 subnormal tie even bits", 0x00008000), ("BF16 subnormal tie odd bits", 0x00018000),
                 ("-F32 max subnormal (-> BF16 min normal)", 0x807FFFFF),
                 ("F16 mantissa tie bits", 0x3F801000), ("F16 mantissa tie odd bits", 0x3F803000),
                 ("F16 just above 2^-25", 0x33000001), ("F16 2^-25", 0x33000000)]

SCALES = [1e-8, 1e-6, 1e-4, 1e-2, 1.0, 1e2, 1e4, 1e5]


def random_values(seed, per_scale):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.standard_normal(per_scale) * s for s in SCALES])


def near_ties(seed, count, m_bits, lo_exp, hi_exp):
    """Float64 values within a few 2^-30 relative of halfway points of a format with m_bits."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        e = int(rng.integers(lo_exp, hi_exp))
        mant = int(rng.integers(0, 1 << m_bits))
        v = (1 + mant * p2(-m_bits)) * p2(e)
        half = p2(e - m_bits - 1)
        k = int(rng.integers(-1, 2))
        sgn = -1.0 if rng.integers(0, 2) else 1.0
        out.append(sgn * (v + half + k * half * p2(-30)))
    return out


def f64_inputs(seed):
    edge = [(label, f64_bits(v)) for label, v in EDGE_VALUES] + EDGE_F64_BITS
    rng = np.random.default_rng(seed + 1)
    rand = [f64_bits(float(v)) for v in random_values(seed, 96)]
    rand += [f64_bits(v) for v in near_ties(seed + 2, 128, 7, -140, 128)]
    rand += [f64_bits(v) for v in near_ties(seed + 3, 128, 10, -26, 16)]
    rand += [f64_bits(v) for v in near_ties(seed + 4, 128, 23, -150, 128)]
    rand += [int(v) for v in rng.integers(0, 1 << 63, 256, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 256, dtype=np.uint64)]
    return edge, rand


def f32_inputs(seed):
    edge = []
    for label, v in EDGE_VALUES:
        b = f32_bits(v)
        if f64_from_bits(f64_bits(v)) == float(np.float32(v)):  # keep only values exact in F32
            edge.append((label, b))
    edge += EDGE_F32_BITS
    rng = np.random.default_rng(seed + 1)
    rand = [f32_bits(v) for v in random_values(seed, 96).astype(np.float32)]
    rand += [f32_bits(v) for v in np.array(near_ties(seed + 3, 128, 10, -26, 16), dtype=np.float32)]
    rand += [f32_bits(v) for v in np.array(near_ties(seed + 2, 128, 7, -130, 128), dtype=np.float32)]
    rand += [int(v) for v in rng.integers(0, 1 << 32, 256, dtype=np.uint64)]
    return edge, rand


# --- writers -----------------------------------------------------------------------------------------

def write_case(src, dst, edge, rand, compute, reference, note=""):
    edge_in = [b for _, b in edge]
    edge_out = compute(edge_in)
    rand_out = compute(rand)
    doc = {
        "from": src,
        "to": dst,
        "reference": reference,
        "note": note,
        "edge": [[label, hexw(i, src), hexw(o, dst)] for (label, i), o in zip(edge, edge_out)],
        "random": {"count": len(rand), "input": pack(rand, src), "expected": pack(rand_out, dst)},
    }
    with open(os.path.join(OUT_DIR, f"{src}_to_{dst}.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def check_same(name, a, b, inputs, src):
    d = count_diff(a, b, inputs, src)
    if d:
        raise SystemExit(f"{name}: {d} disagreements between references")


def main():
    os.makedirs(OUT_DIR, exist_ok=True)

    # F32 -> BF16 (torch; cross-checked with the exact reference)
    edge, rand = f32_inputs(1)
    allin = [b for _, b in edge] + rand
    as64 = [f64_bits(float(v)) for v in np.array(allin, dtype=np.uint32).view(np.float32).astype(np.float64)]
    check_same("F32->BF16", torch_cast(allin, "F32", "BF16"), [exact_round(b, "BF16") for b in as64], allin, "F32")
    write_case("F32", "BF16", edge, rand, lambda x: torch_cast(x, "F32", "BF16"), "torch 1.13 Tensor.to(bfloat16)")

    # F32 -> F16 (torch; cross-checked with numpy and the exact reference)
    check_same("F32->F16 torch/numpy", torch_cast(allin, "F32", "F16"), numpy_cast(allin, "F32", "F16"), allin, "F32")
    check_same("F32->F16 exact", torch_cast(allin, "F32", "F16"), [exact_round(b, "F16") for b in as64], allin, "F32")
    write_case("F32", "F16", edge, rand, lambda x: torch_cast(x, "F32", "F16"), "torch 1.13 Tensor.to(float16), = numpy")

    # F64 -> F32 (numpy; cross-checked with torch and the exact reference)
    edge, rand = f64_inputs(2)
    allin = [b for _, b in edge] + rand
    check_same("F64->F32 torch", numpy_cast(allin, "F64", "F32"), torch_cast(allin, "F64", "F32"), allin, "F64")
    check_same("F64->F32 exact", numpy_cast(allin, "F64", "F32"), [exact_round(b, "F32") for b in allin], allin, "F64")
    write_case("F64", "F32", edge, rand, lambda x: numpy_cast(x, "F64", "F32"), "numpy astype(float32), = torch")

    # F64 -> F16 (numpy rounds once; cross-checked with the exact reference; torch noted)
    check_same("F64->F16 exact", numpy_cast(allin, "F64", "F16"), [exact_round(b, "F16") for b in allin], allin, "F64")
    d16 = count_diff(numpy_cast(allin, "F64", "F16"), torch_cast(allin, "F64", "F16"), allin, "F64")
    write_case("F64", "F16", edge, rand, lambda x: numpy_cast(x, "F64", "F16"),
               "numpy astype(float16) (rounds once), = exact rational reference",
               f"torch 1.13 float64->float16 disagrees on {d16} of {len(allin)} inputs")

    # F64 -> BF16: torch 1.13 goes through float32 and double-rounds, so the exact reference is used.
    exact = [exact_round(b, "BF16") for b in allin]
    tb = torch_cast(allin, "F64", "BF16")
    dbf = count_diff(exact, tb, allin, "F64")
    via32 = torch_cast(numpy_cast(allin, "F64", "F32"), "F32", "BF16")
    if count_diff(tb, via32, allin, "F64"):
        raise SystemExit("F64->BF16: torch is not F64->F32->BF16 as assumed")
    write_case("F64", "BF16", edge, rand, lambda x: [exact_round(b, "BF16") for b in x],
               "exact rational reference (Fraction), rounding once",
               f"torch 1.13 float64->bfloat16 rounds via float32 (double rounding) and differs from single "
               f"rounding on {dbf} of {len(allin)} inputs, e.g. 1+2^-8+2^-40 -> torch 0x3f80, exact 0x3f81")

    # Exhaustive 16-bit sources (torch)
    words = list(range(65536))
    exhaustive = {}
    for src, dst in [("F16", "F32"), ("BF16", "F32"), ("F16", "BF16"), ("BF16", "F16")]:
        out = torch_cast(words, src, dst)
        if dst == "F32":
            as64 = [f64_bits(float(v)) for v in np.array(words, dtype=np.uint16).view(np.float16).astype(np.float64)] \
                if src == "F16" else [f64_bits(float(v)) for v in (np.array(words, dtype=np.uint32) << 16).view(np.float32).astype(np.float64)]
            ref = [exact_round(b, dst) for b in as64]
            check_same(f"{src}->{dst} exact", out, ref, words, src)
        canon = [CANON_NAN[dst] if is_nan_bits(w, src) else o for w, o in zip(words, out)]
        raw = np.array(canon, dtype=UINT[dst]).astype(np.dtype(UINT[dst]).newbyteorder("<")).tobytes()
        exhaustive[f"{src}>{dst}"] = {
            "sha256": hashlib.sha256(raw).hexdigest(),
            "sample": [[hexw(w, src), hexw(canon[w], dst)] for w in range(0, 65536, 257)],
        }
    with open(os.path.join(OUT_DIR, "exhaustive16.json"), "w") as f:
        json.dump({"reference": "torch 1.13 Tensor.to, all 65536 inputs in order; NaN outputs canonical",
                   "canonicalNaN": {k: hexw(v, k) for k, v in CANON_NAN.items()}, "cases": exhaustive}, f, indent=1)
        f.write("\n")
    print(f"F64->BF16 torch double-rounding disagreements: {dbf}; F64->F16 torch disagreements: {d16}")


if __name__ == "__main__":
    main()
