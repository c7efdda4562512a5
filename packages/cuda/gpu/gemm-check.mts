// GEMM check of @megapatch/cuda against the CPU backend, through Backend.gemm with raw operands:
// cuBLASLt layouts (row-major, transposed, padded ld, broadcast batch, misaligned views, GEMV
// shapes, batches over 65535) and layouts only the tiled kernel takes (both strides non-unit, a
// zero row stride), every float dtype, beta 0 over NaN-filled C, beta != 0, writes outside C,
// run-to-run determinism, the TF32 switch and gemmEngine(); then the grouped GEMM (the
// groupedGemm kernel: MoE's expert products, cuBLAS's grouped GEMM on a GPU) against the CPU's
// per-problem GEMMs, with writes outside the outputs checked.
// usage (repository root): npx tsx gemm-gpu-check.mts [cuda:0 | cudaemu:0] [grouped]
// ("grouped": only the grouped part, e.g. with MEGAPATCH_GROUPED_GEMM=tiled or =loop)
import { resolve } from 'node:path';

const root = process.env.MEGAPATCH_ROOT ?? process.cwd();
const device = process.argv[2] ?? 'cuda:0';
const emu = device.startsWith('cudaemu');
const T: any = await import(resolve(root, 'packages/tensor/dist/index.js'));
const C: any = await import(
  resolve(root, emu ? 'packages/cuda/src/emulator.ts' : 'packages/cuda/src/index.ts')
);
const { getBackend, fromTypedArray, synchronize } = T;
const cpu = getBackend('cpu');
const dev = getBackend(device);

let failures = 0,
  cases = 0;
const fail = (msg: string) => {
  failures++;
  if (failures <= 20) console.log('FAIL ' + msg);
};
let seed = 12345;
const rnd = () => {
  seed = (seed * 1103515245 + 12345) % 2147483648;
  return seed / 1073741824 - 1;
};

// a 1-D buffer of `len` values on the CPU and on the device (same bits)
function buffers(len: number, dtype: string, fillNaN = false) {
  const f = new Float64Array(len);
  for (let i = 0; i < len; i++) f[i] = fillNaN ? Number.NaN : rnd();
  const h = fromTypedArray(f).to(dtype);
  return { h, d: h.to(device) };
}
const read = (t: any) => Float64Array.from(t.to('cpu', 'float64').toTypedArray() as Float64Array);

// layouts of a rows x cols operand: [rs, cs, span]
function layout(kind: number, rows: number, cols: number): [number, number, number] {
  switch (kind) {
    case 0:
      return [cols, 1, rows * cols]; // row-major
    case 1:
      return [1, rows, rows * cols]; // column-major (transposed view)
    case 2:
      return [cols + 3, 1, rows * (cols + 3)]; // padded leading dimension
    case 3:
      return [2 * cols + 1, 2, rows * (2 * cols + 1)]; // no unit stride: tiled kernel
    default:
      return [0, 1, cols]; // expanded row (rs 0): tiled kernel
  }
}
const TOL: Record<string, number> = { float64: 1e-12, float32: 2e-5, bfloat16: 1.6e-2, float16: 2e-3 };

function run(
  dtype: string,
  batch: number,
  M: number,
  N: number,
  K: number,
  la: number,
  lb: number,
  bca: boolean,
  bcb: boolean,
  alpha: number,
  beta: number,
  misalign: number,
) {
  cases++;
  const [ars, acs, aspan] = layout(la, M, K),
    [brs, bcs, bspan] = layout(lb, K, N);
  const abs = bca ? 0 : aspan + 5,
    bbs = bcb ? 0 : bspan + 3;
  const A = buffers((bca ? 1 : batch) * (aspan + 5) + misalign + 8, dtype);
  const B = buffers((bcb ? 1 : batch) * (bspan + 3) + misalign + 8, dtype);
  const crs = N + (la === 2 ? 2 : 0),
    cbs = M * crs + 1,
    clen = batch * cbs + misalign + 4;
  const Cb = buffers(clen, dtype, beta === 0);
  const view = (t: any, off: number, len: number) => t.narrow(0, off, len);
  const ops = (s: 'h' | 'd') => [
    { tensor: view(A[s], misalign, A[s].shape[0] - misalign), bs: abs, rs: ars, cs: acs },
    { tensor: view(B[s], misalign, B[s].shape[0] - misalign), bs: bbs, rs: brs, cs: bcs },
    { tensor: view(Cb[s], misalign, clen - misalign), bs: cbs, rs: crs, cs: 1 },
  ];
  const c0 = read(Cb.h);
  const [ah, bh, ch] = ops('h');
  cpu.gemm(batch, M, N, K, ah, bh, ch, alpha, beta);
  const [ad, bd, cd] = ops('d');
  dev.gemm(batch, M, N, K, ad, bd, cd, alpha, beta);
  synchronize(device);
  const want = read(Cb.h),
    got = read(Cb.d);
  const tol = TOL[dtype] * Math.max(1, Math.sqrt(K));
  let bad = 0;
  for (let i = 0; i < clen; i++) {
    const j = i - misalign,
      b = Math.floor(j / cbs),
      r = Math.floor((j % cbs) / crs),
      n = (j % cbs) % crs;
    const inside = j >= 0 && b < batch && r < M && n < N;
    if (!inside) {
      if (!Object.is(got[i], c0[i]) && !(Number.isNaN(got[i]) && Number.isNaN(c0[i]))) bad++;
      continue;
    }
    if (!Number.isFinite(got[i]) || Math.abs(got[i] - want[i]) > tol * Math.max(1, Math.abs(want[i]))) {
      if (bad < 2) console.log(`  at ${i}: got ${got[i]} want ${want[i]}`);
      bad++;
    }
  }
  if (bad)
    fail(
      `${dtype} batch ${batch} M ${M} N ${N} K ${K} layouts ${la}/${lb} bcast ${bca}/${bcb} alpha ${alpha} beta ${beta} misalign ${misalign}: ${bad} bad`,
    );
  // determinism: the same product again, bit for bit
  if (!emu && cases % 7 === 0 && beta === 0) {
    dev.gemm(batch, M, N, K, ad, bd, cd, alpha, beta);
    synchronize(device);
    const again = read(Cb.d);
    if (again.some((v, i) => !Object.is(v, got[i]) && !(Number.isNaN(v) && Number.isNaN(got[i]))))
      fail(`${dtype} M ${M} N ${N} K ${K}: a second run differs`);
  }
  for (const t of [A.h, A.d, B.h, B.d, Cb.h, Cb.d]) t.dispose();
}

// The grouped GEMM: `groups` products in one call in one of four layouts (A K- or M-fast, B K- or
// N-fast: the four of MEGAPATCH_GROUPED_GEMM=mma's kernel), group e's output in slot e of one
// NaN-filled buffer, with a gap after each output that must stay NaN:
//   fwd    y_e = x_e @ w_e^T   (A K-fast, B K-fast: a linear layer's forward)
//   dgrad  d_e = g_e @ w_e     (A K-fast, B N-fast: its input gradient)
//   wgrad  v_e = x_e^T @ g_e   (A M-fast, B N-fast, k the group's rows: its weight gradient)
//   xtgt   u_e = x_e^T @ h_e^T (A M-fast, B K-fast: h_e [F, n] stored row-major)
type GroupedLayout = 'fwd' | 'dgrad' | 'wgrad' | 'xtgt';
function grouped(dtype: string, groups: number, K: number, F: number, kind: GroupedLayout) {
  cases++;
  const rows = Array.from({ length: groups }, (_, e) => (e % 5 === 2 ? 0 : 1 + ((e * 37) % 97)));
  const N = rows.reduce((a, b) => a + b, 0);
  const x = buffers(N * K, dtype);
  const w = buffers(groups * F * K, dtype);
  const g = buffers(N * F, dtype);
  const slot = Math.max(97, K) * Math.max(F, K) + 7;
  const outLen = groups * slot;
  const out = buffers(outLen, dtype, true);
  const problems = (s: 'h' | 'd') => {
    const list: any[] = [];
    let start = 0;
    rows.forEach((n, e) => {
      const xe = x[s].narrow(0, start * K, n * K);
      const ge = g[s].narrow(0, start * F, n * F); // [n, F] for dgrad / wgrad, [F, n] for xtgt
      const we = w[s].narrow(0, e * F * K, F * K); // [F, K]
      const out_ = (m: number, cols: number) => ({
        tensor: out[s].narrow(0, e * slot, m * cols),
        bs: 0,
        rs: cols,
        cs: 1,
      });
      if (n === 0) {
        // nothing
      } else if (kind === 'fwd') {
        list.push({
          m: n,
          n: F,
          k: K,
          a: { tensor: xe, bs: 0, rs: K, cs: 1 },
          b: { tensor: we, bs: 0, rs: 1, cs: K },
          c: out_(n, F),
        });
      } else if (kind === 'dgrad') {
        list.push({
          m: n,
          n: K,
          k: F,
          a: { tensor: ge, bs: 0, rs: F, cs: 1 },
          b: { tensor: we, bs: 0, rs: K, cs: 1 },
          c: out_(n, K),
        });
      } else if (kind === 'wgrad') {
        list.push({
          m: K,
          n: F,
          k: n,
          a: { tensor: xe, bs: 0, rs: 1, cs: K },
          b: { tensor: ge, bs: 0, rs: F, cs: 1 },
          c: out_(K, F),
        });
      } else {
        list.push({
          m: K,
          n: F,
          k: n,
          a: { tensor: xe, bs: 0, rs: 1, cs: K },
          b: { tensor: ge, bs: 0, rs: 1, cs: n },
          c: out_(K, F),
        });
      }
      start += n;
    });
    return list;
  };
  for (const p of problems('h')) cpu.gemm(1, p.m, p.n, p.k, p.a, p.b, p.c, 1, 0);
  const kernel = dev.kernel('groupedGemm');
  if (!kernel) {
    fail('the device has no groupedGemm kernel');
    return;
  }
  kernel(problems('d'));
  synchronize(device);
  const want = read(out.h),
    got = read(out.d);
  const tol = TOL[dtype] * Math.sqrt(kind === 'wgrad' || kind === 'xtgt' ? 97 : kind === 'dgrad' ? F : K);
  let bad = 0;
  for (let i = 0; i < outLen; i++) {
    if (Number.isNaN(want[i])) {
      if (!Number.isNaN(got[i])) bad++; // a write outside every product's output
    } else if (
      !Number.isFinite(got[i]) ||
      Math.abs(got[i] - want[i]) > tol * Math.max(1, Math.abs(want[i]))
    ) {
      if (bad < 2) console.log(`  grouped at ${i}: got ${got[i]} want ${want[i]}`);
      bad++;
    }
  }
  if (bad) fail(`grouped ${dtype} ${groups} groups K ${K} F ${F} (${kind}): ${bad} bad`);
  for (const t of [x.h, x.d, w.h, w.d, g.h, g.d, out.h, out.d]) t.dispose();
}
// groupedLinear with its group sizes on the device (the groupedGemmSized kernel: MoE's tokens per
// expert at EP = 1): forward, dx and every dW the bits of the same call with the sizes as numbers
// (the same grouped kernel either way), an empty group's dW zeros, and no host wait where the mode
// plans the groups on the device (=tiled, the emulator's default; =mma / =wgmma for 16-bit), one
// (the sizes read) elsewhere.
function sizedCase(dtype: string) {
  cases++;
  // (smaller in the emulator, still several 128-row tiles and partial ones)
  const sizes = emu ? [5, 0, 130, 1, 40, 0, 9] : [37, 0, 300, 1, 129, 0, 64];
  const [K, F] = emu ? [40, 136] : [136, 264];
  const N = sizes.reduce((a, b) => a + b, 0);
  const make = (shape: number[]) => {
    const n = shape.reduce((a, b) => a * b, 1);
    return fromTypedArray(Float64Array.from({ length: n }, rnd), shape)
      .to(dtype)
      .to(device);
  };
  const x = make([N, K]);
  const ws = sizes.map(() => make([F, K]));
  const gy = make([N, F]);
  const run = (s: number[] | any) => {
    const xl = x.clone().requiresGrad_(true);
    const wl = ws.map((w: any) => w.clone().requiresGrad_(true));
    const y = T.groupedLinear(xl, wl, s);
    y.backward(gy);
    return [y, xl.grad, ...wl.map((w: any) => w.grad)];
  };
  const want = run(sizes).map(read);
  const onDevice = T.tensor(sizes, { dtype: 'int64' }).to(device);
  synchronize(device);
  C.startKernelProfile(device);
  let outs: any[];
  let prof: any;
  try {
    outs = run(onDevice);
  } finally {
    prof = C.stopKernelProfile(device);
  }
  const got = outs.map(read);
  const mode = process.env.MEGAPATCH_GROUPED_GEMM ?? '';
  // (in the emulator =grouped, as its default, runs the grouped tiled kernel)
  const planned =
    mode === 'tiled' ||
    (emu && (mode === '' || mode === 'grouped')) ||
    ((mode === 'mma' || mode === 'wgmma') && (dtype === 'bfloat16' || dtype === 'float16'));
  const what = `sized ${dtype} (MEGAPATCH_GROUPED_GEMM=${mode})`;
  if (prof.hostWaits !== (planned ? 0 : 1))
    fail(`${what}: ${prof.hostWaits} host waits, want ${planned ? 0 : 1}`);
  got.forEach((g: Float64Array, j: number) => {
    const i = g.findIndex((v, k) => !Object.is(v, want[j][k]));
    if (i >= 0) fail(`${what}: output ${j} differs at ${i}: ${g[i]} vs ${want[j][i]}`);
  });
  if (got[3].some((v: number) => v !== 0)) fail(`${what}: the empty group's dW is not zeros`);
  for (const t of [x, gy, onDevice, ...ws, ...outs]) t.dispose();
}
const groupedCases = () => {
  for (const dtype of ['float32', 'float64', 'bfloat16', 'float16'])
    for (const kind of ['fwd', 'dgrad', 'wgrad', 'xtgt'] as const) {
      grouped(dtype, 8, 64, 48, kind);
      grouped(dtype, emu ? 40 : 200, 100, 24, kind); // over one upload of the address arrays
      grouped(dtype, 12, 136, 264, kind); // several 128-wide tiles, partial ones at both ends
    }
  for (const dtype of ['float32', 'bfloat16', 'float16']) sizedCase(dtype);
};
if (process.argv[3] === 'grouped') {
  groupedCases();
  console.log(
    `grouped (MEGAPATCH_GROUPED_GEMM=${process.env.MEGAPATCH_GROUPED_GEMM ?? ''}): ${cases} cases, ${failures} failures`,
  );
  process.exit(failures ? 1 : 0);
}

const sizes = emu ? [1, 3, 17, 33] : [1, 3, 17, 33, 64, 257];
let it = 0;
for (const dtype of ['float32', 'float64', 'bfloat16', 'float16'])
  for (const M of sizes)
    for (const N of sizes)
      for (const K of sizes) {
        it++;
        const la = it % 5,
          lb = (it * 3 + 1) % 5;
        run(dtype, 1, M, N, K, la % 3, lb % 3, false, false, 1, 0, it % 3 === 0 ? 1 : 0);
        run(
          dtype,
          3,
          M,
          N,
          K,
          la,
          lb,
          it % 4 === 0,
          it % 4 === 1,
          0.75,
          it % 2 ? 0 : 0.5,
          it % 5 === 0 ? 1 : 0,
        );
      }
// every pair of layouts, broadcast batches and misaligned views at a mid size
for (const dtype of ['float32', 'float64', 'bfloat16', 'float16'])
  for (let la = 0; la < 5; la++)
    for (let lb = 0; lb < 5; lb++)
      run(dtype, 2, 19, 40, 37, la, lb, la === 1, lb === 2, -1.5, lb % 2 ? 0 : 2, (la + lb) % 2);
// bigger products (tensor cores, split-K) and a batch over cuBLASLt's 65535 chunk
if (!emu) {
  for (const dtype of ['float32', 'bfloat16', 'float16'])
    run(dtype, 2, 512, 384, 4096, 0, 1, false, false, 1, 0, 0);
  run('float32', 70001, 2, 3, 4, 0, 0, false, true, 1, 0, 0);
}
// TF32: off by default (float32 products within 2e-5), on with MEGAPATCH_ALLOW_TF32=1
if (!emu) {
  const relerr = () => {
    const a = buffers(256 * 1024, 'float32'),
      b = buffers(1024 * 256, 'float32'),
      c = buffers(256 * 256, 'float32', true);
    const A = (s: 'h' | 'd') => ({ tensor: a[s], bs: 0, rs: 1024, cs: 1 });
    const B = (s: 'h' | 'd') => ({ tensor: b[s], bs: 0, rs: 256, cs: 1 });
    const Cc = (s: 'h' | 'd') => ({ tensor: c[s], bs: 0, rs: 256, cs: 1 });
    cpu.gemm(1, 256, 256, 1024, A('h'), B('h'), Cc('h'), 1, 0);
    dev.gemm(1, 256, 256, 1024, A('d'), B('d'), Cc('d'), 1, 0);
    synchronize(device);
    const w = read(c.h),
      g = read(c.d);
    let e = 0;
    for (let i = 0; i < w.length; i++) e = Math.max(e, Math.abs(g[i] - w[i]) / Math.max(1, Math.abs(w[i])));
    return e;
  };
  const off = relerr();
  process.env.MEGAPATCH_ALLOW_TF32 = '1';
  const on = relerr();
  delete process.env.MEGAPATCH_ALLOW_TF32;
  console.log(
    `float32 256x256x1024 max rel. error: ${off.toExponential(2)} (TF32 off), ${on.toExponential(2)} (TF32 on)`,
  );
  if (off > 2e-5) fail('float32 is not full precision with TF32 off');
  if (on <= off) fail('MEGAPATCH_ALLOW_TF32=1 changed nothing');
}
groupedCases();
// Diagnostic (printed, not checked): how cuBLASLt's bias epilogue rounds 16-bit outputs: the
// product plus bias rounded once, or the product rounded first and the bias added after
if (!emu) {
  const lb = dev.kernel('linearBias');
  for (const dtype of ['bfloat16', 'float16'])
    for (const [M, N, K] of [
      [130, 33, 7],
      [130, 130, 33],
      [64, 64, 256],
    ]) {
      const x = buffers(M * K, dtype),
        w = buffers(N * K, dtype),
        b = buffers(N, dtype),
        o = buffers(M * N, dtype);
      lb(o.d.view(M, N), x.d.view(M, K), w.d.view(N, K), b.d);
      synchronize(device);
      const got = read(o.d),
        xv = read(x.h),
        wv = read(w.h),
        bv = read(b.h);
      const acc = new Float64Array(M * N),
        exact = new Float64Array(M * N);
      for (let i = 0; i < M; i++)
        for (let j = 0; j < N; j++) {
          let s = 0;
          for (let k = 0; k < K; k++) s += xv[i * K + k] * wv[j * K + k];
          acc[i * N + j] = s;
          exact[i * N + j] = s + bv[j];
        }
      const round = (a: Float64Array) => read(fromTypedArray(a).to(dtype));
      const once = round(exact);
      const accR = round(acc);
      const twice = round(Float64Array.from(accR, (v, i) => v + bv[i % N]));
      let eqOnce = 0,
        eqTwice = 0,
        neither = 0;
      for (let i = 0; i < M * N; i++) {
        if (got[i] === once[i]) eqOnce++;
        if (got[i] === twice[i]) eqTwice++;
        if (got[i] !== once[i] && got[i] !== twice[i]) neither++;
      }
      console.log(
        `linearBias ${dtype} ${M}x${N}x${K}: ${eqOnce} of ${M * N} equal one rounding, ${eqTwice} the product rounded first, ${neither} neither`,
      );
      for (const t of [x.h, x.d, w.h, w.d, b.h, b.d, o.h, o.d]) t.dispose();
    }
}
const engine = C.gemmEngine ? C.gemmEngine() : '(no gemmEngine export)';
console.log(`engine: ${engine}`);
if (!emu && !/^cuBLASLt \d+\.\d+\.\d+$/.test(engine)) fail(`gemmEngine() = ${engine}`);
console.log(`${cases} cases, ${failures} failures`);
process.exit(failures ? 1 : 0);
