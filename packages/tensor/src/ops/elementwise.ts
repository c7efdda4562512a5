// Elementwise ops: arithmetic with broadcasting and type promotion, unary math, activations,
// comparisons, where / maskedFill / clamp. Gradients are written in terms of other ops.

import { attachGrad, needsGrad } from '../autograd/record.js';
import type { BinaryOp, UnaryOp } from '../backend/backend.js';
import { type DType, isFloating, promoteTypes, promoteWithScalar } from '../dtype.js';
import { argError, dtypeError, fmtShape, shapeError } from '../errors.js';
import { broadcastShapes, type Shape, sameShape } from '../shape.js';
import { Tensor } from '../tensor.js';
import { zerosLike } from './creation.js';
import { sum } from './reduce.js';
import { reshape } from './shape.js';
import { alloc, inputsBackend } from './util.js';

const COMPARISONS = new Set<BinaryOp>(['eq', 'ne', 'lt', 'le', 'gt', 'ge', 'logicalAnd', 'logicalOr']);

/** A tensor of `dtype` with the values of t: t itself when it already has that dtype. */
function asDtype(t: Tensor, dtype: DType): { t: Tensor; temp: boolean } {
  if (t.dtype === dtype) return { t, temp: false };
  const o = alloc(t.backend, t.shape, dtype);
  o.backend.copy(o, t);
  return { t: o, temp: true };
}

/** Sums a broadcast gradient back to `shape`. */
export function sumToShape(g: Tensor, shape: Shape): Tensor {
  if (sameShape(g.shape, shape)) return g.viewAs(g.shape, g.strides, g.offset);
  const lead = g.ndim - shape.length;
  const dims: number[] = [];
  for (let i = 0; i < g.ndim; i++) {
    if (i < lead || (shape[i - lead] === 1 && g.shape[i] !== 1)) dims.push(i);
  }
  const s = sum(g, dims, true);
  if (sameShape(s.shape, shape)) return s;
  const r = reshape(s, shape);
  s.dispose();
  return r;
}

function binaryTensor(name: string, op: BinaryOp, a: Tensor, b: Tensor, alpha = 1): Tensor {
  const backend = inputsBackend(name, a, b);
  const shape = broadcastShapes(name, a.shape, b.shape);
  const ct = promoteTypes(a.dtype, b.dtype);
  const x = asDtype(a, ct);
  const y = asDtype(b, ct);
  const out = alloc(backend, shape, COMPARISONS.has(op) ? 'bool' : ct);
  backend.binary(out, x.t, y.t, op, alpha);
  if (x.temp) x.t.dispose();
  if (y.temp) y.t.dispose();
  return out;
}

function binaryScalar(name: string, op: BinaryOp, a: Tensor, s: number, reverse: boolean): Tensor {
  const backend = inputsBackend(name, a);
  const ct = promoteWithScalar(a.dtype, s);
  const x = asDtype(a, ct);
  const out = alloc(backend, a.shape, COMPARISONS.has(op) ? 'bool' : ct);
  backend.binaryScalar(out, x.t, s, op, reverse);
  if (x.temp) x.t.dispose();
  return out;
}

type Operand = Tensor | number;

function checkFloatGrad(name: string, t: Tensor): void {
  if (t.requiresGrad && !isFloating(t.dtype)) throw dtypeError(name, 'gradients need floating-point inputs');
}

/** out = a + alpha * b (broadcasting). */
export function add(a: Operand, b: Operand, alpha = 1): Tensor {
  if (typeof a === 'number') {
    if (alpha === 1) return add(b as Tensor, a);
    // a + alpha * b with a scalar a
    const s = mul(b as Tensor, alpha);
    const out = add(s, a);
    s.dispose();
    return out;
  }
  if (typeof b === 'number') {
    const out = binaryScalar('add', 'add', a, alpha * b, false);
    if (needsGrad(a)) attachGrad(out, 'AddBackward', [a], [], (g) => [g]);
    return out;
  }
  const out = binaryTensor('add', 'add', a, b, alpha);
  if (needsGrad(a, b)) {
    const sa = a.shape;
    const sb = b.shape;
    attachGrad(out, 'AddBackward', [a, b], [], (g) => [
      a.requiresGrad ? sumToShape(g, sa) : null,
      b.requiresGrad ? scaleTo(g, alpha, sb) : null,
    ]);
  }
  return out;
}

function scaleTo(g: Tensor, alpha: number, shape: Shape): Tensor {
  const s = sumToShape(g, shape);
  if (alpha === 1) return s;
  const r = mul(s, alpha);
  s.dispose();
  return r;
}

/** out = a - alpha * b. */
export function sub(a: Operand, b: Operand, alpha = 1): Tensor {
  if (typeof a === 'number') {
    const bt = b as Tensor;
    if (alpha !== 1) throw argError('sub', 'alpha with a scalar first operand is not supported');
    const out = binaryScalar('sub', 'sub', bt, a, true);
    if (needsGrad(bt)) attachGrad(out, 'RsubBackward', [bt], [], (g) => [neg(g)]);
    return out;
  }
  if (typeof b === 'number') {
    const out = binaryScalar('sub', 'sub', a, alpha * b, false);
    if (needsGrad(a)) attachGrad(out, 'SubBackward', [a], [], (g) => [g]);
    return out;
  }
  const out = binaryTensor('sub', 'sub', a, b, alpha);
  if (needsGrad(a, b)) {
    const sa = a.shape;
    const sb = b.shape;
    attachGrad(out, 'SubBackward', [a, b], [], (g) => [
      a.requiresGrad ? sumToShape(g, sa) : null,
      b.requiresGrad ? scaleTo(g, -alpha, sb) : null,
    ]);
  }
  return out;
}

export function mul(a: Operand, b: Operand): Tensor {
  if (typeof a === 'number') return mul(b as Tensor, a);
  if (typeof b === 'number') {
    const out = binaryScalar('mul', 'mul', a, b, false);
    if (needsGrad(a)) attachGrad(out, 'MulBackward', [a], [], (g) => [mul(g, b)]);
    return out;
  }
  const out = binaryTensor('mul', 'mul', a, b);
  if (needsGrad(a, b)) {
    checkFloatGrad('mul', a);
    checkFloatGrad('mul', b);
    const sa = a.shape;
    const sb = b.shape;
    const ra = a.requiresGrad;
    const rb = b.requiresGrad;
    const save: Tensor[] = [];
    if (rb) save.push(a);
    if (ra) save.push(b);
    attachGrad(out, 'MulBackward', [a, b], save, (g, s) => {
      const xa = rb ? s[0] : null;
      const xb = ra ? s[rb ? 1 : 0] : null;
      return [ra ? gradTo(mul(g, xb!), sa) : null, rb ? gradTo(mul(g, xa!), sb) : null];
    });
  }
  return out;
}

/** sumToShape that consumes its input. */
function gradTo(g: Tensor, shape: Shape): Tensor {
  if (sameShape(g.shape, shape)) return g;
  const r = sumToShape(g, shape);
  g.dispose();
  return r;
}

export function div(a: Operand, b: Operand): Tensor {
  const tensors = [a, b].filter((v): v is Tensor => typeof v !== 'number');
  if (tensors.length > 0 && tensors.every((t) => !isFloating(t.dtype))) {
    // true division, as torch.div: integer operands are divided in float32, not truncated
    const fa = typeof a === 'number' ? null : asDtype(a, 'float32').t;
    const fb = typeof b === 'number' ? null : asDtype(b, 'float32').t;
    const out = div(fa ?? a, fb ?? b);
    fa?.dispose();
    fb?.dispose();
    return out;
  }
  if (typeof a === 'number') {
    const bt = b as Tensor;
    const out = binaryScalar('div', 'div', bt, a, true);
    if (needsGrad(bt)) {
      // d(a/b)/db = -a/b^2 = -out/b
      attachGrad(out, 'RdivBackward', [bt], [bt, out], (g, [x, y]) => {
        const t = div(y, x);
        const r = mul(t, g);
        t.dispose();
        const n = neg(r);
        r.dispose();
        return [n];
      });
    }
    return out;
  }
  if (typeof b === 'number') return mul(a, 1 / b);
  const out = binaryTensor('div', 'div', a, b);
  if (needsGrad(a, b)) {
    const sa = a.shape;
    const sb = b.shape;
    const ra = a.requiresGrad;
    const rb = b.requiresGrad;
    attachGrad(out, 'DivBackward', [a, b], [b, out], (g, [y, q]) => {
      const ga = ra ? gradTo(div(g, y), sa) : null;
      let gb: Tensor | null = null;
      if (rb) {
        const t = div(q, y);
        const r = mul(g, t);
        t.dispose();
        gb = gradTo(neg(r), sb);
        r.dispose();
      }
      return [ga, gb];
    });
  }
  return out;
}

export function pow(a: Operand, b: Operand): Tensor {
  if (typeof a === 'number') {
    const bt = b as Tensor;
    const out = binaryScalar('pow', 'pow', bt, a, true);
    if (needsGrad(bt)) {
      const lna = Math.log(a);
      attachGrad(out, 'PowBackward', [bt], [out], (g, [y]) => {
        const t = mul(y, lna);
        const r = mul(g, t);
        t.dispose();
        return [r];
      });
    }
    return out;
  }
  if (typeof b === 'number') {
    const out = binaryScalar('pow', 'pow', a, b, false);
    if (needsGrad(a)) {
      attachGrad(out, 'PowBackward', [a], [a], (g, [x]) => {
        if (b === 0) return [zerosLike(g)];
        const t = binaryScalar('pow', 'pow', x, b - 1, false);
        const u = mul(t, b);
        t.dispose();
        const r = mul(g, u);
        u.dispose();
        return [r];
      });
    }
    return out;
  }
  const out = binaryTensor('pow', 'pow', a, b);
  if (needsGrad(a, b)) {
    const sa = a.shape;
    const sb = b.shape;
    const ra = a.requiresGrad;
    const rb = b.requiresGrad;
    attachGrad(out, 'PowBackward', [a, b], [a, b, out], (g, [x, y, o]) => {
      let ga: Tensor | null = null;
      let gb: Tensor | null = null;
      if (ra) {
        const ym1 = sub(y, 1);
        const t = pow(x, ym1);
        ym1.dispose();
        const u = mul(t, y);
        t.dispose();
        ga = gradTo(mul(g, u), sa);
        u.dispose();
      }
      if (rb) {
        const l = log(x);
        const t = mul(o, l);
        l.dispose();
        gb = gradTo(mul(g, t), sb);
        t.dispose();
      }
      return [ga, gb];
    });
  }
  return out;
}

function compare(name: string, op: BinaryOp) {
  return (a: Tensor, b: Operand): Tensor =>
    typeof b === 'number' ? binaryScalar(name, op, a, b, false) : binaryTensor(name, op, a, b);
}
export const eq = compare('eq', 'eq');
export const ne = compare('ne', 'ne');
export const lt = compare('lt', 'lt');
export const le = compare('le', 'le');
export const gt = compare('gt', 'gt');
export const ge = compare('ge', 'ge');
export const logicalAnd = (a: Tensor, b: Tensor): Tensor => binaryTensor('logicalAnd', 'logicalAnd', a, b);
export const logicalOr = (a: Tensor, b: Tensor): Tensor => binaryTensor('logicalOr', 'logicalOr', a, b);

function minmax(name: string, op: 'maximum' | 'minimum') {
  return (a: Tensor, b: Tensor): Tensor => {
    const out = binaryTensor(name, op, a, b);
    if (needsGrad(a, b)) {
      const sa = a.shape;
      const sb = b.shape;
      // ties split the gradient in half, as torch.maximum does
      attachGrad(out, `${name}Backward`, [a, b], [a, b], (g, [x, y]) => {
        const wins = op === 'maximum' ? gt(x, y) : lt(x, y);
        const ties = eq(x, y);
        const half = mul(g, 0.5);
        const tieG = where(ties, half, 0);
        const ga = a.requiresGrad ? gradTo(where(wins, g, tieG), sa) : null;
        let gb: Tensor | null = null;
        if (b.requiresGrad) {
          const loses = op === 'maximum' ? lt(x, y) : gt(x, y);
          gb = gradTo(where(loses, g, tieG), sb);
          loses.dispose();
        }
        for (const t of [wins, ties, half, tieG]) t.dispose();
        return [ga, gb];
      });
    }
    return out;
  };
}
export const maximum = minmax('maximum', 'maximum');
export const minimum = minmax('minimum', 'minimum');

// ---- unary ------------------------------------------------------------------------------------

function unaryRaw(name: string, op: UnaryOp, x: Tensor, p0?: number, p1?: number, outDtype?: DType): Tensor {
  const backend = inputsBackend(name, x);
  let src = x;
  let temp = false;
  // math on integer tensors computes in float32, as in PyTorch
  if (!outDtype && !isFloating(x.dtype) && !['neg', 'abs', 'square', 'sign', 'relu', 'clamp'].includes(op)) {
    src = asDtype(x, 'float32').t;
    temp = true;
  }
  const out = alloc(backend, x.shape, outDtype ?? src.dtype);
  backend.unary(out, src, op, p0, p1);
  if (temp) src.dispose();
  return out;
}

type UnaryGrad = (g: Tensor, x: Tensor, y: Tensor) => Tensor;

/** Defines a unary op whose gradient uses the input (x) and/or output (y). */
function unary(name: string, op: UnaryOp, grad: UnaryGrad | null, saves: 'x' | 'y' | 'xy' | 'none' = 'x') {
  return (x: Tensor): Tensor => {
    const out = unaryRaw(name, op, x);
    if (grad && needsGrad(x)) {
      const save = saves === 'x' ? [x] : saves === 'y' ? [out] : saves === 'xy' ? [x, out] : [];
      attachGrad(out, `${name[0].toUpperCase()}${name.slice(1)}Backward`, [x], save, (g, s) =>
        // saved: [x], [y] or [x, y]; the grad function reads the one it asked for
        [grad(g, s[0], saves === 'xy' ? s[1] : s[0])],
      );
    }
    return out;
  };
}

function chain(...steps: ((prev: Tensor) => Tensor)[]): (t: Tensor) => Tensor {
  return (t) => {
    let cur = t;
    for (const s of steps) {
      const next = s(cur);
      if (cur !== t) cur.dispose();
      cur = next;
    }
    return cur;
  };
}

export const neg = unary('neg', 'neg', (g) => neg(g), 'none');
export const exp = unary('exp', 'exp', (g, _x, y) => mul(g, y), 'y');
export const log = unary('log', 'log', (g, x) => div(g, x));
export const sqrt = unary(
  'sqrt',
  'sqrt',
  (g, _x, y) =>
    chain(
      (t) => div(g, t),
      (t) => mul(t, 0.5),
    )(y),
  'y',
);
export const rsqrt = unary(
  'rsqrt',
  'rsqrt',
  (g, _x, y) =>
    chain(
      (t) => pow(t, 3),
      (t) => mul(t, g),
      (t) => mul(t, -0.5),
    )(y),
  'y',
);
export const abs = unary('abs', 'abs', (g, x) =>
  chain(
    (t) => sign(t),
    (t) => mul(t, g),
  )(x),
);
export const tanh = unary('tanh', 'tanh', (g, _x, y) => binaryTensor('tanh', 'tanhBackward', y, g), 'y');
export const sigmoid = unary(
  'sigmoid',
  'sigmoid',
  (g, _x, y) => binaryTensor('sigmoid', 'sigmoidBackward', y, g),
  'y',
);
export const silu = unary('silu', 'silu', (g, x) => binaryTensor('silu', 'siluBackward', x, g));
export const relu = unary('relu', 'relu', (g, _x, y) => binaryTensor('relu', 'reluBackward', y, g), 'y');
export const sin = unary('sin', 'sin', (g, x) =>
  chain(
    (t) => cos(t),
    (t) => mul(t, g),
  )(x),
);
export const cos = unary('cos', 'cos', (g, x) =>
  chain(
    (t) => sin(t),
    (t) => mul(t, g),
    (t) => neg(t),
  )(x),
);
export const square = unary('square', 'square', (g, x) =>
  chain(
    (t) => mul(t, g),
    (t) => mul(t, 2),
  )(x),
);
export const reciprocal = unary(
  'reciprocal',
  'reciprocal',
  (g, _x, y) =>
    chain(
      (t) => square(t),
      (t) => mul(t, g),
      (t) => neg(t),
    )(y),
  'y',
);
export const log1p = unary('log1p', 'log1p', (g, x) =>
  chain(
    (t) => add(t, 1),
    (t) => div(g, t),
  )(x),
);
export const expm1 = unary(
  'expm1',
  'expm1',
  (g, _x, y) =>
    chain(
      (t) => add(t, 1),
      (t) => mul(t, g),
    )(y),
  'y',
);
export const sign = unary('sign', 'sign', (g) => zerosLike(g), 'none');
export const floor = unary('floor', 'floor', (g) => zerosLike(g), 'none');
export const ceil = unary('ceil', 'ceil', (g) => zerosLike(g), 'none');
export const round = unary('round', 'round', (g) => zerosLike(g), 'none');

const geluExact = unary('gelu', 'gelu', (g, x) => binaryTensor('gelu', 'geluBackward', x, g));
const geluTanh = unary('gelu', 'geluTanh', (g, x) => binaryTensor('gelu', 'geluTanhBackward', x, g));
/** GELU, exact (erf) or with the tanh approximation. */
export function gelu(x: Tensor, approximate: 'none' | 'tanh' = 'none'): Tensor {
  return approximate === 'tanh' ? geluTanh(x) : geluExact(x);
}

export const logicalNot = (x: Tensor): Tensor =>
  unaryRaw('logicalNot', 'logicalNot', x, undefined, undefined, 'bool');
export const isnan = (x: Tensor): Tensor => unaryRaw('isnan', 'isnan', x, undefined, undefined, 'bool');
export const isinf = (x: Tensor): Tensor => unaryRaw('isinf', 'isinf', x, undefined, undefined, 'bool');

/** Clamps to [min, max]; null or undefined leaves that side open. */
export function clamp(x: Tensor, min?: number | null, max?: number | null): Tensor {
  const lo = min ?? Number.NaN;
  const hi = max ?? Number.NaN;
  const out = unaryRaw('clamp', 'clamp', x, lo, hi);
  if (needsGrad(x)) {
    attachGrad(out, 'ClampBackward', [x], [x], (g, [xs]) => {
      // gradient flows where min <= x <= max
      let mask: Tensor | null = null;
      if (min != null) mask = ge(xs, min);
      if (max != null) {
        const m2 = le(xs, max);
        if (mask) {
          const m = logicalAnd(mask, m2);
          mask.dispose();
          m2.dispose();
          mask = m;
        } else mask = m2;
      }
      if (!mask) return [g];
      const r = where(mask, g, 0);
      mask.dispose();
      return [r];
    });
  }
  return out;
}

/** Elementwise cond ? x : y with broadcasting; numbers broadcast as scalars. */
export function where(cond: Tensor, x: Operand, y: Operand): Tensor {
  const ref = typeof x === 'number' ? (y as Tensor) : x;
  const backend = inputsBackend(
    'where',
    cond,
    typeof x === 'number' ? null : x,
    typeof y === 'number' ? null : y,
  );
  if (cond.dtype !== 'bool') throw dtypeError('where', `condition must be bool, got ${cond.dtype}`);
  // a number operand promotes like `tensor OP number` (a float value lifts an integer tensor)
  const dtype =
    typeof x === 'number' && typeof y === 'number'
      ? 'float32'
      : typeof x === 'number'
        ? promoteWithScalar(ref.dtype, x)
        : typeof y === 'number'
          ? promoteWithScalar(x.dtype, y)
          : promoteTypes(x.dtype, y.dtype);
  const scalarT = (v: number): Tensor => {
    const t = alloc(backend, [], dtype);
    backend.fill(t, v);
    return t;
  };
  const xt = typeof x === 'number' ? { t: scalarT(x), temp: true } : asDtype(x, dtype);
  const yt = typeof y === 'number' ? { t: scalarT(y), temp: true } : asDtype(y, dtype);
  const shape = broadcastShapes('where', broadcastShapes('where', cond.shape, xt.t.shape), yt.t.shape);
  const out = alloc(backend, shape, dtype);
  backend.where(out, cond, xt.t, yt.t);
  if (xt.temp) xt.t.dispose();
  if (yt.temp) yt.t.dispose();
  const xg = typeof x === 'number' ? null : x;
  const yg = typeof y === 'number' ? null : y;
  if (needsGrad(xg, yg)) {
    attachGrad(out, 'WhereBackward', [xg, yg], [cond], (g, [c]) => [
      xg?.requiresGrad ? gradTo(where(c, g, 0), xg.shape) : null,
      yg?.requiresGrad ? gradTo(where(c, 0, g), yg.shape) : null,
    ]);
  }
  return out;
}

/** x with `value` where mask is true (mask broadcasts to x). */
export function maskedFill(x: Tensor, mask: Tensor, value: number): Tensor {
  if (mask.dtype !== 'bool') throw dtypeError('maskedFill', `mask must be bool, got ${mask.dtype}`);
  const shape = broadcastShapes('maskedFill', x.shape, mask.shape);
  if (!sameShape(shape, x.shape)) {
    throw shapeError(
      'maskedFill',
      `mask ${fmtShape(mask.shape)} must broadcast to the input shape ${fmtShape(x.shape)}`,
    );
  }
  // the result keeps x's dtype (as torch's masked_fill), so the value goes in as a 0-d tensor of
  // that dtype rather than as a number, which where() would promote
  const v = alloc(x.backend, [], x.dtype);
  x.backend.fill(v, value);
  const out = where(mask, v, x);
  v.dispose();
  return out;
}

Object.assign(Tensor.prototype, {
  add(this: Tensor, o: Operand, alpha?: number) {
    return add(this, o, alpha);
  },
  sub(this: Tensor, o: Operand, alpha?: number) {
    return sub(this, o, alpha);
  },
  mul(this: Tensor, o: Operand) {
    return mul(this, o);
  },
  div(this: Tensor, o: Operand) {
    return div(this, o);
  },
  pow(this: Tensor, o: Operand) {
    return pow(this, o);
  },
  neg(this: Tensor) {
    return neg(this);
  },
  exp(this: Tensor) {
    return exp(this);
  },
  log(this: Tensor) {
    return log(this);
  },
  sqrt(this: Tensor) {
    return sqrt(this);
  },
  rsqrt(this: Tensor) {
    return rsqrt(this);
  },
  abs(this: Tensor) {
    return abs(this);
  },
  tanh(this: Tensor) {
    return tanh(this);
  },
  sigmoid(this: Tensor) {
    return sigmoid(this);
  },
  silu(this: Tensor) {
    return silu(this);
  },
  gelu(this: Tensor, approximate?: 'none' | 'tanh') {
    return gelu(this, approximate);
  },
  relu(this: Tensor) {
    return relu(this);
  },
  sin(this: Tensor) {
    return sin(this);
  },
  cos(this: Tensor) {
    return cos(this);
  },
  square(this: Tensor) {
    return square(this);
  },
  reciprocal(this: Tensor) {
    return reciprocal(this);
  },
  sign(this: Tensor) {
    return sign(this);
  },
  clamp(this: Tensor, min?: number | null, max?: number | null) {
    return clamp(this, min, max);
  },
  eq(this: Tensor, o: Operand) {
    return eq(this, o);
  },
  ne(this: Tensor, o: Operand) {
    return ne(this, o);
  },
  lt(this: Tensor, o: Operand) {
    return lt(this, o);
  },
  le(this: Tensor, o: Operand) {
    return le(this, o);
  },
  gt(this: Tensor, o: Operand) {
    return gt(this, o);
  },
  ge(this: Tensor, o: Operand) {
    return ge(this, o);
  },
  maximum(this: Tensor, o: Tensor) {
    return maximum(this, o);
  },
  minimum(this: Tensor, o: Tensor) {
    return minimum(this, o);
  },
  logicalNot(this: Tensor) {
    return logicalNot(this);
  },
  maskedFill(this: Tensor, mask: Tensor, value: number) {
    return maskedFill(this, mask, value);
  },
});
