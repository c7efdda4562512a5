// pnpm bench for @megapatch/parallel: the measured pipeline bubble of Megatron's 1F1B and
// interleaved (v = 2) schedules on p = 2 and 4 local processes (bench/pipeline-worker.mjs, one
// thread each) over a stack of Linear+GELU blocks, for m = 4, 8, 16 microbatches, against the
// theoretical bubble fraction of the total time: (p − 1)/(m + p − 1) for 1F1B and
// (p − 1)/(v·m + p − 1) interleaved (Narayanan et al. 2021: (p − 1)/(v·m) of the ideal time).
// The bubble is 1 − busy/wall per rank (busy: the forward and backward compute), averaged over the
// ranks, the median of several iterations after a warm-up.
// One JSON line per case: {"name", "unit", "ours", "reference", "referenceName", "ratio", "p", "m",
// "v", "wallMs", "busyMs"[, "note"]}.
// Usage: node bench/pipeline-bubble.mjs [--nproc 2,4] [--microbatches 4,8,16] [--iters 9] [--seq 64]
import { availableParallelism } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { launch } from '@megapatch/parallel/launch';

const here = dirname(fileURLToPath(import.meta.url));
const { values } = parseArgs({
  options: {
    nproc: { type: 'string', default: '2,4' },
    microbatches: { type: 'string', default: '4,8,16' },
    iters: { type: 'string', default: '9' },
    seq: { type: 'string', default: '64' },
  },
});
const cores = availableParallelism();
// 16 blocks of 256 × 256 on [seq 64, micro-batch 4] tokens (by default): a few ms of forward per stage at p = 2
const shape = { layers: 16, hidden: 256, seq: Number(values.seq), microBatch: 4 };

async function runWorkers(nproc, cfg) {
  let out = '';
  let err = '';
  const r = await launch({
    command: process.execPath,
    args: [join(here, 'pipeline-worker.mjs'), JSON.stringify(cfg)],
    nprocPerNode: nproc,
    env: { ...process.env, MEGAPATCH_NUM_THREADS: '1', OMP_NUM_THREADS: '1' },
    handleSignals: false,
    prefixOutput: false,
    stdout: (t) => (out += t),
    stderr: (t) => (err += t),
  });
  if (!r.ok) throw new Error(`${r.message}\n${err.slice(-3000)}`);
  return out
    .split('\n')
    .filter((l) => l.startsWith('RESULT '))
    .map((l) => JSON.parse(l.slice(7)));
}

const round = (x, d = 4) => Number(x.toPrecision(d));
for (const p of values.nproc.split(',').map(Number)) {
  const results = await runWorkers(p, {
    ...shape,
    ms: values.microbatches.split(',').map(Number),
    vs: [1, 2],
    iters: Number(values.iters),
    warmup: 2,
  });
  for (const r of results) {
    const theory = (p - 1) / (r.v * r.m + p - 1);
    const schedule = r.v === 1 ? '1f1b' : `interleaved-v${r.v}`;
    const line = {
      name: `pipeline-bubble-${schedule}-p${p}-m${r.m}`,
      unit: 'bubble fraction',
      ours: round(r.bubble, 3),
      reference: round(theory, 3),
      referenceName:
        r.v === 1 ? 'theoretical (p-1)/(m+p-1)' : 'theoretical (p-1)/(v*m+p-1) (Megatron interleaved)',
      ratio: Number((r.bubble / theory).toFixed(3)),
      p,
      m: r.m,
      v: r.v,
      wallMs: round(r.wallMs),
      busyMs: round(r.busyMs),
    };
    if (p > cores) {
      line.note = `${p} processes on ${cores} cores: oversubscribed, the bubble measures time-sharing more than the schedule`;
    }
    console.log(JSON.stringify(line));
  }
}
