// The closing table of gpu-bench.sh from its bench.jsonl: megapatch against PyTorch per case, the
// ratio and issue 13's target, then what limits megapatch's training step (a model of the step
// from the measured GEMM rate and the model-shaped attention case). Appends one "summary" JSON
// line to the file. usage: node table.mjs bench.jsonl
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const file = process.argv[2];
const here = path.dirname(fileURLToPath(import.meta.url));
const lines = fs
  .readFileSync(file, 'utf8')
  .split('\n')
  .filter((l) => l.startsWith('{'))
  .map((l) => {
    try {
      return JSON.parse(l);
    } catch {
      return null;
    }
  })
  .filter(Boolean);
const allCases = JSON.parse(fs.readFileSync(path.join(here, 'cases.json'), 'utf8'));
const tiny = lines.some((l) => l.tiny === true);
const cases = allCases[tiny ? 'tiny' : 'full'];
const peak = allCases.peakTflops;

// the last good line per (side, kind, case, mode); an error line only where nothing good came
const pick = (side, kind, c, mode) => {
  const all = lines.filter(
    (l) => l.side === side && l.kind === kind && l.case === c && (mode === undefined || l.mode === mode),
  );
  return all.filter((l) => !l.error).at(-1) ?? all.at(-1) ?? null;
};
const num = (x, d = 3) => (typeof x === 'number' && Number.isFinite(x) ? Number(x.toPrecision(d)) : null);
const cell = (l, f, d = 4) => (!l ? 'missing' : l.error ? 'ERROR' : String(num(f(l), d)));
const rows = [];
const errors = [];
const summary = { kind: 'summary', side: 'bench', tiny, gemm: [], attn: [], train: {} };
const row = (name, ours, theirs, ratio, target, verdict = '') =>
  rows.push([name, ours, theirs, ratio, target, verdict]);
const note = (l, what) => l?.error && errors.push(`${what}: ${l.error}`);

const env = lines.find((l) => l.kind === 'env');
const device = lines.find((l) => l.side === 'megapatch')?.device ?? '?';

// GEMM: TFLOP/s, ours / torch ≥ 0.95
for (const c of cases.gemm) {
  const o = pick('megapatch', 'gemm', c.case);
  const t = pick('torch', 'gemm', c.case);
  note(o, `megapatch gemm ${c.case}`);
  note(t, `torch gemm ${c.case}`);
  const r = o && t && !o.error && !t.error ? o.tflops / t.tflops : null;
  summary.gemm.push({ case: c.case, ours: o?.tflops ?? null, torch: t?.tflops ?? null, ratio: num(r) });
  row(
    `gemm ${c.case} ${c.M}x${c.N}x${c.K} TFLOP/s`,
    cell(o, (l) => l.tflops),
    cell(t, (l) => l.tflops),
    r === null ? '-' : String(num(r)),
    '>= 0.95',
    r === null ? '' : r >= 0.95 ? 'ok' : 'MISS',
  );
  if (o?.autotuneTflops) {
    // MEGAPATCH_GEMM_AUTOTUNE=1: cuBLASLt's candidate algorithms timed, the fastest kept
    row(
      `gemm ${c.case} TFLOP/s, autotuned`,
      `${o.autotuneTflops}`,
      '',
      `${num(o.autotuneTflops / o.tflops)}`,
      '(info: autotuned / heuristic)',
    );
  }
}
// MoE's grouped GEMM: TFLOP/s of ours by MEGAPATCH_GROUPED_GEMM (loop: one cuBLASLt GEMM per expert,
// the GPU's default; streams: the loop over several streams; grouped: cuBLAS's grouped GEMM; mma:
// our tensor-core grouped kernel), the
// best of them against torch's best of its matmul loop and _grouped_mm (information: the issue sets
// no target)
summary.grouped = [];
for (const c of cases.grouped ?? []) {
  const modes = ['loop', 'streams', 'grouped', 'mma', 'wgmma', 'wgmma256'];
  const ours = Object.fromEntries(modes.map((m) => [m, pick('megapatch', 'grouped', c.case, m)]));
  const tl = pick('torch', 'grouped', c.case, 'loop');
  const tg = pick('torch', 'grouped', c.case, 'grouped_mm');
  note(ours.loop, `megapatch grouped ${c.case} (loop)`);
  note(tl, `torch grouped ${c.case} (loop)`);
  const bestOf = (ls) => ls.filter((l) => l && !l.error).sort((a, b) => b.tflops - a.tflops)[0] ?? null;
  const o = bestOf(Object.values(ours));
  const best = bestOf([tl, tg]);
  const r = o && best ? o.tflops / best.tflops : null;
  summary.grouped.push({
    case: c.case,
    ...Object.fromEntries(modes.map((m) => [m, ours[m]?.tflops ?? null])),
    ...Object.fromEntries(modes.map((m) => [`${m}Train`, ours[m]?.trainTflops ?? null])),
    torchLoop: tl?.tflops ?? null,
    torchGroupedMm: tg?.tflops ?? null,
    ratio: num(r),
  });
  row(
    `grouped ${c.case} ${c.N}x${c.F}x${c.K} TFLOP/s`,
    modes.map((m) => `${m} ${ours[m] ? cell(ours[m], (l) => l.tflops) : '-'}`).join(' / '),
    `loop ${cell(tl, (l) => l.tflops)} / _grouped_mm ${tg ? cell(tg, (l) => l.tflops) : '-'}`,
    r === null ? '-' : String(num(r)),
    '(info: our best vs torch best)',
  );
  // forward + backward: ours by mode against torch's best of the loop and _grouped_mm
  if (modes.some((m) => ours[m]?.trainTflops)) {
    const oursT = Math.max(0, ...modes.map((m) => ours[m]?.trainTflops ?? 0));
    const torchT = Math.max(0, ...[tl, tg].map((l) => l?.trainTflops ?? 0));
    row(
      `grouped ${c.case} fwd+bwd TFLOP/s`,
      modes.map((m) => `${m} ${ours[m]?.trainTflops ?? '-'}`).join(' / '),
      `loop ${tl?.trainTflops ?? '-'} / _grouped_mm ${tg?.trainTflops ?? '-'}`,
      oursT && torchT ? String(num(oursT / torchT)) : '-',
      '(info: our best vs torch best)',
    );
  }
}
// attention: forward+backward ms, torch / ours ≥ 1.0 (and the forward alone, for information)
for (const c of cases.attn) {
  const o = pick('megapatch', 'attn', c.case);
  const t = pick('torch', 'attn', c.case);
  note(o, `megapatch attn ${c.case}`);
  note(t, `torch attn ${c.case}`);
  const ok = o && t && !o.error && !t.error;
  // issue 13's target is against torch's flash kernel, which needs D = Dv (MLA's heads do not)
  const flash = (c.Dv ?? c.D) === c.D;
  const r = ok ? t.fwdBwdMs / o.fwdBwdMs : null;
  const rf = ok ? t.fwdMs / o.fwdMs : null;
  summary.attn.push({
    case: c.case,
    oursMs: o?.fwdBwdMs ?? null,
    torchMs: t?.fwdBwdMs ?? null,
    oursTflops: o?.fwdBwdTflops ?? null,
    torchTflops: t?.fwdBwdTflops ?? null,
    ratio: num(r),
  });
  row(
    `attn ${c.case} fwd+bwd ms (TFLOP/s)`,
    !o || o.error ? cell(o, () => 0) : `${num(o.fwdBwdMs, 4)} (${num(o.fwdBwdTflops)})`,
    !t || t.error ? cell(t, () => 0) : `${num(t.fwdBwdMs, 4)} (${num(t.fwdBwdTflops)})`,
    r === null ? '-' : String(num(r)),
    flash ? '>= 1.0 (torch/ours)' : '(info: torch default backend)',
    r === null || !flash ? '' : r >= 1 ? 'ok' : 'MISS',
  );
  row(
    `attn ${c.case} fwd ms`,
    cell(o, (l) => l.fwdMs),
    cell(t, (l) => l.fwdMs),
    rf === null ? '-' : String(num(rf)),
    '(info)',
  );
  if (o?.fwdRows128Ms) {
    // MEGAPATCH_ATTENTION_FWD_ROWS=128: 128-row forward tiles (two m-tiles a warp)
    row(
      `attn ${c.case} fwd / fwd+bwd ms, 128-row fwd tiles`,
      `${num(o.fwdRows128Ms.fwd, 4)} / ${num(o.fwdRows128Ms.fwdBwd, 4)}`,
      '',
      `${num(o.fwdRows128Ms.fwd / o.fwdMs)}`,
      '(info: fwd 128-row / 64-row)',
    );
  }
  if (o?.fusedBwdMs) {
    // MEGAPATCH_ATTENTION_BWD=fused: one backward pass, dQ summed by atomics
    const rt = ok ? t.fwdBwdMs / o.fusedBwdMs.fwdBwd : null;
    row(
      `attn ${c.case} fwd+bwd ms, fused backward`,
      `${num(o.fusedBwdMs.fwdBwd, 4)}`,
      rt === null ? '' : `torch/fused ${num(rt)}`,
      `${num(o.fusedBwdMs.fwdBwd / o.fwdBwdMs)}`,
      '(info: fused / dk,dv + dq)',
    );
  }
  if (o?.bwdBq32Ms) {
    // MEGAPATCH_ATTENTION_BWD_BQ=32: dK/dV tiles of 32 queries (the forward is unchanged)
    row(
      `attn ${c.case} fwd+bwd ms, dK/dV tiles of 32 queries`,
      `${num(o.bwdBq32Ms.fwdBwd, 4)}`,
      '',
      `${num(o.bwdBq32Ms.fwdBwd / o.fwdBwdMs)}`,
      '(info: 32-query / 64-query dK/dV tiles)',
    );
  }
  if (o?.oneStreamMs) {
    // MEGAPATCH_ATTENTION_BWD_STREAMS=1: the dq kernel after dk/dv on one stream (default: beside it)
    row(
      `attn ${c.case} fwd+bwd ms, dq after dk/dv on one stream`,
      `${num(o.oneStreamMs.fwdBwd, 4)}`,
      '',
      `${num(o.oneStreamMs.fwdBwd / o.fwdBwdMs)}`,
      '(info: one stream / two streams)',
    );
  }
  if (o?.uncappedMs) {
    // MEGAPATCH_ATTENTION_OCC=0: forward at 129 registers (3 blocks an SM), dK/dV at 178 (2)
    row(
      `attn ${c.case} fwd / fwd+bwd ms, registers uncapped`,
      `${num(o.uncappedMs.fwd, 4)} / ${num(o.uncappedMs.fwdBwd, 4)}`,
      '',
      `${num(o.uncappedMs.fwd / o.fwdMs)} / ${num(o.uncappedMs.fwdBwd / o.fwdBwdMs)}`,
      '(info: uncapped / capped, fwd and fwd+bwd)',
    );
  }
  if (o?.keys128Ms) {
    // MEGAPATCH_ATTENTION_FWD_KEYS=128: the mma.sync forward with 128 keys a tile (D + Dv <= 128)
    row(
      `attn ${c.case} fwd / fwd+bwd ms, 128-key fwd tiles`,
      `${num(o.keys128Ms.fwd, 4)} / ${num(o.keys128Ms.fwdBwd, 4)}`,
      '',
      `${num(o.keys128Ms.fwd / o.fwdMs)} / ${num(o.keys128Ms.fwdBwd / o.fwdBwdMs)}`,
      '(info: 128-key / 64-key fwd tiles)',
    );
  }
  for (const [key, label] of [
    ['wgmmaMs', 'wgmma forward'],
    ['wgmma64Ms', 'wgmma forward, 64-key tiles'],
    ['wgmmaSerialMs', 'wgmma forward, no overlap'],
    ['wgmma64SerialMs', 'wgmma forward, 64-key tiles, no overlap'],
    ['wgmmaBwdMs', 'wgmma backward'],
    ['wgmmaBothMs', 'wgmma forward and backward'],
    ['wgmma2Ms', 'wgmma forward, two warpgroups'],
    ['wgmma64x2Ms', 'wgmma forward, 64-key tiles, two warpgroups'],
    ['wgmmaBwd2Ms', 'wgmma backward, two warpgroups'],
    ['wgmmaBoth2Ms', 'wgmma forward and backward, two warpgroups'],
    ['wgmmaWsMs', 'wgmma forward, warp-specialised'],
    ['wgmmaBwdWsMs', 'wgmma backward, dK/dV warp-specialised'],
    ['wgmmaBwdWsDqMs', 'wgmma backward, dQ warp-specialised'],
    ['wgmmaBwdWsBothMs', 'wgmma backward, dK/dV and dQ warp-specialised'],
  ]) {
    // MEGAPATCH_ATTENTION_WGMMA=1 / 64 (and MEGAPATCH_ATTENTION_WGMMA_OVERLAP=0): the forward's
    // tile products on Hopper's wgmma; MEGAPATCH_ATTENTION_WGMMA_BWD=1 the backward's; two
    // warpgroups a block: MEGAPATCH_ATTENTION_FWD_ROWS=128 with the forward's, =2 the backward's
    if (!o?.[key]) continue;
    row(
      `attn ${c.case} fwd / fwd+bwd ms, ${label}`,
      `${num(o[key].fwd, 4)} / ${num(o[key].fwdBwd, 4)}`,
      '',
      `${num(o[key].fwd / o.fwdMs)} / ${num(o[key].fwdBwd / o.fwdBwdMs)}`,
      '(info: wgmma / mma.sync, fwd and fwd+bwd)',
    );
  }
  if (o?.dqCappedMs) {
    // MEGAPATCH_ATTENTION_DQ_OCC=1: the dQ kernel at 128 registers (4 blocks an SM) too
    row(
      `attn ${c.case} fwd+bwd ms, dQ registers capped`,
      `${num(o.dqCappedMs.fwdBwd, 4)}`,
      '',
      `${num(o.dqCappedMs.fwdBwd / o.fwdBwdMs)}`,
      '(info: dQ capped / default)',
    );
  }
  if (o?.noPipelineMs) {
    // MEGAPATCH_ATTENTION_PIPELINE=0: tiles loaded between barriers, no cp.async prefetch
    row(
      `attn ${c.case} fwd / fwd+bwd ms, no prefetch`,
      `${num(o.noPipelineMs.fwd, 4)} / ${num(o.noPipelineMs.fwdBwd, 4)}`,
      '',
      `${num(o.noPipelineMs.fwdBwd / o.fwdBwdMs)}`,
      '(info: no-prefetch / prefetch)',
    );
  }
}
// the training step
const tc = cases.train;
const o = pick('megapatch', 'train', tc.case, 'megapatch');
const e = pick('torch', 'train', tc.case, 'torch-eager');
const k = pick('torch', 'train', tc.case, 'torch-compile');
note(o, 'megapatch train');
note(e, 'torch eager train');
note(k, 'torch compile train');
const good = (l) => l && !l.error;
const squares = lines.filter(
  (l) => l.side === 'torch' && l.kind === 'gemm' && /^square/.test(l.case) && !l.error,
);
const measuredPeak = squares.length ? Math.max(...squares.map((l) => l.tflops)) : null;
row(
  `train MFU (Megatron FLOPs / ${peak} TFLOP/s)`,
  cell(o, (l) => l.mfu),
  `eager ${cell(e, (l) => l.mfu)} / compile ${cell(k, (l) => l.mfu)}`,
  '-',
  '>= 0.50 (goal)',
  good(o) ? (o.mfu >= 0.5 ? 'ok' : 'MISS') : '',
);
if (measuredPeak && good(o))
  row(
    `train MFU vs measured torch.matmul peak (${num(measuredPeak, 4)} TFLOP/s)`,
    String(num(o.achievedTflops / measuredPeak)),
    `eager ${good(e) ? num(e.achievedTflops / measuredPeak) : '-'} / compile ${good(k) ? num(k.achievedTflops / measuredPeak) : '-'}`,
    '-',
    '(info)',
  );
for (const [name, ref] of [
  ['eager', e],
  ['compile', k],
]) {
  const r = good(o) && good(ref) ? o.tokensPerSecond / ref.tokensPerSecond : null;
  row(
    `train tokens/s vs torch ${name}`,
    cell(o, (l) => l.tokensPerSecond, 5),
    cell(ref, (l) => l.tokensPerSecond, 5),
    r === null ? '-' : String(num(r)),
    '(report)',
  );
  summary.train[name] = { torchTokensPerSecond: ref?.tokensPerSecond ?? null, ratio: num(r) };
}
summary.train.megapatch = good(o)
  ? { tokensPerSecond: o.tokensPerSecond, mfu: o.mfu, stepMs: o.stepMs, microBatchSize: o.microBatchSize }
  : null;
if (good(o) && good(e) && o.microBatchSize !== e.microBatchSize)
  errors.push(`note: micro-batch differs: megapatch ${o.microBatchSize}, torch ${e.microBatchSize}`);

// the MoE step (the opt-in parts moe-train and torch-moe-train): Megatron's FLOPs count the routed
// experts' products; PyTorch eager loops over the experts as Hugging Face's Mixtral block does
const mc = cases.trainMoe;
const mo = mc ? pick('megapatch', 'train', mc.case, 'megapatch') : null;
const me = mc ? pick('torch', 'train', mc.case, 'torch-eager') : null;
if (mo || me) {
  note(mo, 'megapatch MoE train');
  note(me, 'torch eager MoE train');
  row(
    `moe-train ${mc.case} MFU (Megatron FLOPs / ${peak} TFLOP/s)`,
    cell(mo, (l) => l.mfu),
    `eager ${cell(me, (l) => l.mfu)}`,
    '-',
    '(report)',
  );
  const r = good(mo) && good(me) ? mo.tokensPerSecond / me.tokensPerSecond : null;
  row(
    'moe-train tokens/s vs torch eager (a loop over the experts)',
    cell(mo, (l) => l.tokensPerSecond, 5),
    cell(me, (l) => l.tokensPerSecond, 5),
    r === null ? '-' : String(num(r)),
    '(report)',
  );
  summary.trainMoe = {
    megapatch: good(mo) ? { tokensPerSecond: mo.tokensPerSecond, mfu: mo.mfu, stepMs: mo.stepMs } : null,
    eager: good(me) ? { tokensPerSecond: me.tokensPerSecond, mfu: me.mfu, stepMs: me.stepMs } : null,
    ratio: num(r),
  };
}

// decoding (the opt-in parts generate and torch-generate): new tokens/s against Hugging Face's
// generate, each batch greedy and with top-p; ours also says how often a step waited for the device
const gen = cases.generate;
if (gen) {
  const matching = (side, b, sampling) => {
    const all = lines.filter(
      (l) => l.side === side && l.kind === 'generate' && l.batch === b && l.sampling === sampling,
    );
    return all.filter((l) => !l.error).at(-1) ?? all.at(-1) ?? null;
  };
  const anyGen = lines.some((l) => l.kind === 'generate');
  const failed = lines.find((l) => l.kind === 'generate' && l.error && l.batch === undefined);
  if (failed) errors.push(`${failed.side} generate: ${failed.error}`);
  summary.generate = [];
  for (const b of anyGen ? gen.batches : []) {
    for (const sampling of gen.sampling) {
      const go = matching('megapatch', b, sampling);
      const ge = matching('torch', b, sampling);
      note(go, `megapatch generate b${b} ${sampling}`);
      note(ge, `torch generate b${b} ${sampling}`);
      const r = good(go) && good(ge) ? go.tokensPerSecond / ge.tokensPerSecond : null;
      const waits = good(go) ? `, ${go.hostWaitsPer4Tokens} waits / 4 tokens` : '';
      row(
        `generate ${gen.case} b${b} ${sampling} tokens/s vs HF generate`,
        `${cell(go, (l) => l.tokensPerSecond, 5)}${waits}`,
        cell(ge ?? (failed?.side === 'torch' ? failed : null), (l) => l.tokensPerSecond, 5),
        r === null ? '-' : String(num(r)),
        '(report)',
      );
      summary.generate.push({
        batch: b,
        sampling,
        megapatch: good(go) ? go.tokensPerSecond : null,
        torch: good(ge) ? ge.tokensPerSecond : null,
        ratio: num(r),
      });
    }
  }
}

// What limits the step: GEMM FLOPs at the measured rate of the Llama-shaped products, attention
// from the model-shaped case (per layer, scaled to the step's sequences), the rest by difference.
function stepModel(side, t) {
  if (!good(t)) return null;
  const h = tc.hf;
  const L = h.num_hidden_layers;
  const q = h.hidden_size; // query width = heads × head dim
  const seq = t.seqLength ?? tc.seqLength;
  const gbs = t.globalBatchSize ?? tc.globalBatchSize;
  const scoreFlops = gbs * seq * seq * ((6 * q) / 2) * 2 * L;
  const gemmFlops = t.flopsPerStep - scoreFlops;
  const llama = lines.filter(
    (l) => l.side === side && l.kind === 'gemm' && !l.error && !/^square/.test(l.case),
  );
  const rate = llama.length
    ? llama.reduce((a, l) => a + 2 * l.M * l.N * l.K, 0) / llama.reduce((a, l) => a + l.ms / 1000, 0)
    : null;
  const layerCase = cases.attn.find((c) => c.modelLayer);
  const a = layerCase ? pick(side, 'attn', layerCase.case) : null;
  const gemmMs = rate ? (gemmFlops / rate) * 1000 : null;
  const attnMs = good(a) ? a.fwdBwdMs * L * (gbs / layerCase.B) : null;
  const rest = gemmMs !== null && attnMs !== null ? t.stepMs - gemmMs - attnMs : null;
  return { stepMs: t.stepMs, gemmMs, gemmRateTflops: rate ? rate / 1e12 : null, attnMs, restMs: rest };
}
const limits = [];
for (const [label, side, t] of [
  ['megapatch', 'megapatch', o],
  ['torch eager', 'torch', e],
]) {
  const m = stepModel(side, t);
  if (!m) continue;
  summary.train[`${label.replace(' ', '_')}_model`] = m;
  const pct = (x) => (x === null ? '?' : `${num(x, 3)} ms (${Math.round((100 * x) / m.stepMs)}%)`);
  limits.push(
    `${label}: step ${num(m.stepMs, 4)} ms ≈ GEMMs ${pct(m.gemmMs)} at ${num(m.gemmRateTflops, 3)} TFLOP/s + attention ${pct(m.attnMs)} + rest (norms, RoPE, SwiGLU, loss, optimizer, launch gaps) ${pct(m.restMs)}`,
  );
}
if (good(o)) {
  const b = o.breakdownMs;
  limits.push(
    `megapatch timers (median ms): data ${b.data}, forward ${b.forward} (host enqueue), backward ${b.backward} (host enqueue), optimizer ${b.optimizer} (host enqueue; the step's one read, at its end, waits for the device); peak memory ${o.peakMemoryGiB} GiB${memoryNote(o)}; losses ${o.losses.join(' ')}`,
  );
}
if (good(e))
  limits.push(
    `torch eager timers (median ms, events): forward ${e.breakdownMs.forward}, backward ${e.breakdownMs.backward}, optimizer ${e.breakdownMs.optimizer}; peak memory ${e.peakMemoryGiB} GiB`,
  );
if (good(k)) limits.push(`torch compile: warm-up (compile) ${k.warmupS} s, step ${k.stepMs} ms`);
// the same step under each kernel variant (gpu-bench.sh's ours-train-<name>: mode megapatch-<name>,
// its environment in the line's `variantEnv`)
for (const v of lines.filter(
  (l) =>
    l.side === 'megapatch' && l.kind === 'train' && l.case === tc.case && l.mode?.startsWith('megapatch-'),
)) {
  if (good(v) && good(o))
    limits.push(
      `megapatch with ${v.variantEnv ?? v.mode}: step ${v.stepMs} ms (${v.tokensPerSecond} tokens/s, MFU ${v.mfu}) vs ${o.stepMs} ms`,
    );
}
// the memory-bound kernels one at a time (ours.mts's stream part) against torch's copy on the same GPU
const copyRef = lines.find((l) => l.side === 'torch' && l.kind === 'stream' && l.case === 'copy' && !l.error);
const streams = lines.filter((l) => l.side === 'megapatch' && l.kind === 'stream');
if (streams.length) {
  summary.stream = [];
  const parts = streams.map((l) => {
    if (l.error) return `${l.case} ERROR`;
    const ratio = copyRef ? num(l.gbs / copyRef.gbs) : null;
    const vs = Object.entries(l.variants ?? {})
      .map(([k, v]) => `, ${k}: ${num(v.ms, 3)} ms`)
      .join('');
    const theirs = lines.find(
      (t) => t.side === 'torch' && t.kind === 'stream' && t.case === l.case && !t.error,
    );
    summary.stream.push({
      case: l.case,
      ms: l.ms,
      gbs: l.gbs,
      ofCopy: ratio,
      variants: l.variants ?? {},
      torchMs: theirs?.ms ?? null,
    });
    return `${l.case} ${num(l.ms, 3)} ms ${Math.round(l.gbs)} GB/s${ratio === null ? '' : ` (${ratio} of copy)`}${theirs ? ` [torch ${num(theirs.ms, 3)} ms]` : ''}${vs}`;
  });
  limits.push(
    `memory-bound kernels at the step's shapes${copyRef ? ` (torch copy: ${Math.round(copyRef.gbs)} GB/s)` : ''}: ${parts.join('; ')}`,
  );
}
// the profiled iteration after the timed ones (ours.mts: device time per backend entry)
const prof = lines.find(
  (l) => l.side === 'megapatch' && l.kind === 'profile' && l.case === tc.case && !l.error,
);
if (prof) {
  const kinds = { gemm: [0, 0], attention: [0, 0], other: [0, 0] };
  for (const e of prof.entries) {
    kinds[e.kind][0] += e.ms;
    kinds[e.kind][1] += e.flops;
  }
  const share = (ms) => `${num(ms, 4)} ms (${Math.round((100 * ms) / prof.spanMs)}%)`;
  limits.push(
    `megapatch, one step profiled (CUDA events around each backend entry): span ${num(prof.spanMs, 4)} ms = GEMMs ${share(kinds.gemm[0])} at ${num(kinds.gemm[1] / 1e9 / (kinds.gemm[0] || 1), 3)} TFLOP/s + attention ${share(kinds.attention[0])} + other entries ${share(kinds.other[0])} + gaps ${share(prof.spanMs - prof.kernelMs)}; ${prof.calls} entries, ${prof.deviceMallocs} cudaMalloc${prof.hostWaits === undefined ? '' : `, ${prof.hostWaits} host waits`}`,
  );
  const top = prof.entries.filter((e) => e.kind === 'other').slice(0, 12);
  limits.push(
    `  the longest other entries (ms, calls, GB/s of their operands): ${top
      .map(
        (e) => `${e.name} ${num(e.ms, 3)} (${e.calls}, ${e.ms > 0 ? Math.round(e.bytes / 1e6 / e.ms) : '-'})`,
      )
      .join('; ')}`,
  );
  summary.train.megapatchProfile = {
    spanMs: prof.spanMs,
    kernelMs: prof.kernelMs,
    gemmMs: kinds.gemm[0],
    attentionMs: kinds.attention[0],
    otherMs: kinds.other[0],
    deviceMallocs: prof.deviceMallocs,
    hostWaits: prof.hostWaits,
  };
}
// the MoE step's timers and profile
if (good(mo)) {
  const b = mo.breakdownMs;
  limits.push(
    `megapatch MoE step ${mo.stepMs} ms: data ${b.data}, forward ${b.forward}, backward ${b.backward}, optimizer ${b.optimizer} (median ms, host side); peak memory ${mo.peakMemoryGiB} GiB${memoryNote(mo)}; losses ${mo.losses.join(' ')}`,
  );
}
if (good(me))
  limits.push(
    `torch eager MoE step ${me.stepMs} ms: forward ${me.breakdownMs.forward}, backward ${me.breakdownMs.backward}, optimizer ${me.breakdownMs.optimizer}; peak memory ${me.peakMemoryGiB} GiB`,
  );
// the MoE step's profiles: the default's, then each variant's (gpu-bench.sh's ours-moe-train-mma)
const moeProfs = mc
  ? lines.filter((l) => l.side === 'megapatch' && l.kind === 'profile' && l.case === mc.case && !l.error)
  : [];
for (const moeProf of moeProfs) {
  const by = { gemm: 0, attention: 0, other: 0 };
  for (const e of moeProf.entries) by[e.kind] += e.ms;
  const top = moeProf.entries.slice(0, 8).map((e) => `${e.name} ${num(e.ms, 3)} (${e.calls})`);
  const variant = moeProf.mode && moeProf.mode !== 'megapatch' ? ` (${moeProf.mode})` : '';
  limits.push(
    `megapatch MoE step profiled${variant}: span ${num(moeProf.spanMs, 4)} ms = GEMMs ${num(by.gemm, 4)} + attention ${num(by.attention, 4)} + other ${num(by.other, 4)} + gaps ${num(moeProf.spanMs - moeProf.kernelMs, 4)} ms; ${moeProf.hostWaits ?? '?'} host waits; longest: ${top.join('; ')}`,
  );
}
for (const v of mc
  ? lines.filter(
      (l) =>
        l.side === 'megapatch' &&
        l.kind === 'train' &&
        l.case === mc.case &&
        l.mode?.startsWith('megapatch-'),
    )
  : []) {
  if (good(v) && good(mo))
    limits.push(
      `megapatch MoE with ${v.variantEnv ?? v.mode}: step ${v.stepMs} ms (${v.tokensPerSecond} tokens/s, MFU ${v.mfu}) vs ${mo.stepMs} ms`,
    );
}

// print
const head = ['case', 'megapatch', 'PyTorch', 'ratio', 'target', ''];
const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => String(r[i]).length)));
const fmt = (r) =>
  r
    .map((c, i) => String(c).padEnd(widths[i]))
    .join('  ')
    .trimEnd();
console.log('');
console.log(
  `== megapatch GPU bench: ${device}${env ? `; torch ${env.torch} on ${env.gpu ?? 'the CPU'}` : '; no torch'}${tiny ? '; TINY rehearsal sizes' : ''}`,
);
console.log(fmt(head));
for (const r of rows) console.log(fmt(r));
console.log('what limits the step:');
for (const l of limits) console.log(`  ${l}`);
const skipped = lines.filter((l) => l.side === 'bench');
for (const s of skipped) errors.push(`${s.case}: ${s.error}`);
if (errors.length) {
  console.log('errors:');
  for (const x of errors) console.log(`  ${x}`);
}
fs.appendFileSync(file, `${JSON.stringify(summary)}\n`);

/** ", live x GiB after every step (reserved y)" from a train record, or "" before these were logged. */
function memoryNote(r) {
  if (r.memoryFlat === undefined) return '';
  const flat = r.memoryFlat ? 'the same after every step' : 'NOT the same after every step (a leak?)';
  return `, live ${r.liveMemoryGiB} GiB ${flat}, reserved ${r.reservedMemoryGiB} GiB`;
}
