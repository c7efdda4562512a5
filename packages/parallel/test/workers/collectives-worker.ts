// Every collective for every dtype and odd sizes, checked against a local computation of its
// result: each rank can compute any rank's input, so each can compute the expected output.
import { type DType, empty, fromTypedArray, setDefaultDevice, type Tensor, zeros } from '@megapatch/tensor';
import { registerReferenceBackend } from '@megapatch/tensor/reference';
import { destroyProcessGroup, initProcessGroup } from '../../src/distributed.js';
import type { GlooProcessGroup } from '../../src/gloo.js';
import type { ProcessGroup, ReduceOp } from '../../src/process-group.js';

const DTYPES: DType[] = ['float32', 'bfloat16', 'float16', 'int32', 'int64', 'float64'];
const SIZES = [1, 13, 65_537];
const failures: string[] = [];
let cases = 0;

// Small integers: exact in every dtype, so sums, maxima and minima compare exactly.
function value(rank: number, i: number, salt = 0): number {
  return ((rank * 7 + i * 3 + salt * 5) % 11) - 5;
}
function make(dtype: DType, n: number, rank: number, salt = 0): Tensor {
  const a = new Float64Array(n);
  for (let i = 0; i < n; i++) a[i] = value(rank, i, salt);
  return fromTypedArray(a, [n]).to(dtype);
}
function read(t: Tensor): number[] {
  return Array.from(t.toTypedArray() as ArrayLike<number | bigint>, Number);
}
function expectEqual(what: string, got: number[], want: number[], tol = 0): void {
  cases++;
  if (got.length !== want.length) {
    failures.push(`${what}: length ${got.length} != ${want.length}`);
    return;
  }
  for (let i = 0; i < got.length; i++) {
    if (!(Math.abs(got[i] - want[i]) <= tol * Math.max(1, Math.abs(want[i])))) {
      failures.push(`${what}: [${i}] = ${got[i]}, expected ${want[i]}`);
      return;
    }
  }
}
function reduce(op: ReduceOp, size: number, n: number, salt = 0, offset = 0): number[] {
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const vals = Array.from({ length: size }, (_, r) => value(r, i + offset, salt));
    if (op === 'max') out.push(Math.max(...vals));
    else if (op === 'min') out.push(Math.min(...vals));
    else {
      const s = vals.reduce((a, b) => a + b, 0);
      out.push(op === 'avg' ? s / size : s);
    }
  }
  return out;
}
const tolOf = (d: DType) => (d === 'bfloat16' ? 1e-2 : d === 'float16' ? 1e-3 : 1e-6);
const isFloat = (d: DType) => !d.startsWith('int');

// MEGAPATCH_WORKER_DEVICE: every tensor on another device: the reference backend (collectives
// through host copies), or 'cudaemu' (the emulated CUDA backend: this rank's device cudaemu:<rank>,
// collectives through the emulator's NCCL unless MEGAPATCH_DEVICE_COLLECTIVES=0)
const workerDevice = process.env.MEGAPATCH_WORKER_DEVICE;
if (workerDevice === 'cudaemu') {
  await import('@megapatch/cuda/emulator');
  setDefaultDevice(`cudaemu:${process.env.LOCAL_RANK ?? 0}`);
} else if (workerDevice) {
  registerReferenceBackend();
  setDefaultDevice(workerDevice);
}
const g: ProcessGroup = await initProcessGroup({ timeoutMs: 60_000 });
const { rank, size } = g;

for (const dtype of DTYPES) {
  for (const n of SIZES) {
    const tag = `${dtype} n=${n}`;
    const ops: ReduceOp[] = isFloat(dtype) ? ['sum', 'avg', 'max', 'min'] : ['sum', 'max', 'min'];
    for (const op of ops) {
      const t = make(dtype, n, rank);
      g.allReduce(t, op).waitSync();
      expectEqual(`allReduce ${op} ${tag}`, read(t), reduce(op, size, n), op === 'avg' ? tolOf(dtype) : 0);
    }
    // allGather into a list and into one tensor
    const input = make(dtype, n, rank, 1);
    const outs = Array.from({ length: size }, () => empty([n], { dtype }));
    await g.allGather(outs, input).wait();
    for (let r = 0; r < size; r++) {
      expectEqual(`allGather list ${tag} from ${r}`, read(outs[r]), read(make(dtype, n, r, 1)));
    }
    const flat = empty([size * n], { dtype });
    g.allGatherIntoTensor(flat, input).waitSync();
    const wantFlat = Array.from({ length: size }, (_, r) => read(make(dtype, n, r, 1))).flat();
    expectEqual(`allGatherIntoTensor ${tag}`, read(flat), wantFlat);
    // reduceScatter: rank r gets the reduction of everyone's chunk r
    for (const op of isFloat(dtype) ? (['sum', 'avg'] as ReduceOp[]) : (['sum', 'max'] as ReduceOp[])) {
      const big = make(dtype, size * n, rank, 2);
      const out = empty([n], { dtype });
      g.reduceScatterTensor(out, big, op).waitSync();
      const want = reduce(op, size, n, 2, rank * n);
      expectEqual(`reduceScatterTensor ${op} ${tag}`, read(out), want, op === 'avg' ? tolOf(dtype) : 0);
      const parts = big.split(n, 0).map((p) => p.contiguous());
      const out2 = empty([n], { dtype });
      g.reduceScatter(out2, parts, op).waitSync();
      expectEqual(`reduceScatter list ${op} ${tag}`, read(out2), want, op === 'avg' ? tolOf(dtype) : 0);
    }
    // broadcast from every root
    for (let root = 0; root < size; root++) {
      const t = make(dtype, n, rank, 3);
      g.broadcast(t, root).waitSync();
      expectEqual(`broadcast root ${root} ${tag}`, read(t), read(make(dtype, n, root, 3)));
    }
    // send/recv in a ring, both directions at once (must not deadlock)
    if (size > 1) {
      const next = (rank + 1) % size;
      const prev = (rank + size - 1) % size;
      const a = make(dtype, n, rank, 4);
      const fromPrev = empty([n], { dtype });
      const b = make(dtype, n, rank, 5);
      const fromNext = empty([n], { dtype });
      const works = [
        g.send(a, next, 1),
        g.recv(fromPrev, prev, 1),
        g.send(b, prev, 2),
        g.recv(fromNext, next, 2),
      ];
      for (const w of works) await w.wait();
      expectEqual(`send/recv ring ${tag}`, read(fromPrev), read(make(dtype, n, prev, 4)));
      expectEqual(`send/recv reverse ring ${tag}`, read(fromNext), read(make(dtype, n, next, 5)));
    }
  }
  // allToAll, equal and uneven splits, rows of 3 elements
  const rowsTo = (src: number, dst: number) => (src + 2 * dst) % 3; // may be 0
  const inRows = Array.from({ length: size }, (_, j) => rowsTo(rank, j));
  const outRows = Array.from({ length: size }, (_, j) => rowsTo(j, rank));
  const build = (src: number) => {
    const parts: number[] = [];
    for (let j = 0; j < size; j++) for (let k = 0; k < rowsTo(src, j) * 3; k++) parts.push(value(src, k, j));
    return parts;
  };
  const sum = (a: number[]) => a.reduce((x, y) => x + y, 0);
  const input = fromTypedArray(Float64Array.from(build(rank)), [sum(inRows), 3]).to(dtype);
  const output = zeros([sum(outRows), 3], { dtype });
  g.allToAll(output, input, outRows, inRows).waitSync();
  const want: number[] = [];
  for (let j = 0; j < size; j++) {
    for (let k = 0; k < rowsTo(j, rank) * 3; k++) want.push(value(j, k, rank));
  }
  expectEqual(`allToAll uneven ${dtype}`, read(output), want);
  const eqIn = make(dtype, size * 4, rank, 6).view(size * 2, 2);
  const eqOut = empty([size * 2, 2], { dtype });
  g.allToAll(eqOut, eqIn).waitSync();
  const wantEq: number[] = [];
  for (let j = 0; j < size; j++)
    wantEq.push(...read(make(dtype, size * 4, j, 6)).slice(rank * 4, rank * 4 + 4));
  expectEqual(`allToAll equal ${dtype}`, read(eqOut), wantEq);
}

// 16-bit edge values survive the fp32 round trip of a reduction exactly (every rank holds the
// same values, so max is the identity): the largest normal, the smallest normal and subnormal,
// a value with a full mantissa, zero; small (inside the check record) and large (ring) sizes.
const SPECIALS: Record<string, number[]> = {
  float16: [65504, 2 ** -14, 2 ** -24, 0.333251953125, -2.5, 0],
  bfloat16: [(2 - 2 ** -7) * 2 ** 127, 2 ** -126, 0.333984375, -2.5, 0],
};
for (const [dtype, specials] of Object.entries(SPECIALS)) {
  for (const repeat of [1, 2000]) {
    const vals = Array.from({ length: specials.length * repeat }, (_, i) => specials[i % specials.length]);
    const t = fromTypedArray(Float64Array.from(vals), [vals.length]).to(dtype as DType);
    g.allReduce(t, 'max').waitSync();
    expectEqual(`allReduce max of ${dtype} edge values x${repeat}`, read(t), vals);
  }
}

// Issue order: several async ops in flight complete in order with the right values.
const ts = Array.from({ length: 6 }, (_, k) => make('float32', 1000, rank, k));
const works = ts.map((t) => g.allReduce(t));
await Promise.all(works.map((w) => w.wait()));
for (let k = 0; k < ts.length; k++)
  expectEqual(`async allReduce #${k}`, read(ts[k]), reduce('sum', size, 1000, k));

// The event loop keeps running while a large collective is in flight.
let ticks = 0;
const timer = setInterval(() => ticks++, 2);
const big = make('float32', 8_000_000, rank, 7);
await g.allReduce(big).wait();
await g.allReduce(big).wait();
clearInterval(timer);
// (a device library queues its work on the device's stream instead; the emulator's runs in the call)
const viaHostThreads = (g as GlooProcessGroup).collectivesFor(zeros([1]).device) === 'gloo';
cases++;
if (ticks === 0 && viaHostThreads) failures.push('the event loop did not run during a large allReduce');

// A work seen completed without a wait (DDP polls isCompleted) has its results in place, also
// when they travel back from host copies.
{
  const t = make('float32', 4096, rank, 9);
  const w = g.allReduce(t);
  while (!w.isCompleted()) await new Promise((r) => setTimeout(r, 1));
  expectEqual('allReduce polled with isCompleted', read(t), reduce('sum', size, 4096, 9));
}

g.barrier().waitSync();
console.log(
  `RESULT ${JSON.stringify({
    rank,
    cases,
    failures: failures.slice(0, 20),
    ticks,
    device: zeros([1]).device,
    library: (g as GlooProcessGroup).collectivesFor(zeros([1]).device),
  })}`,
);
await destroyProcessGroup();
