// pnpm bench for @megapatch/models: the MoE token dispatchers on expert parallelism 2 (two local
// processes, bench/moe-dispatch-worker.mjs, one thread each): a MoELayer of hidden 256, 8 SwiGLU
// experts (ffn 256), top-2, at 256, 1024 and 4096 tokens per rank, timed with the alltoall
// dispatcher against the allgather dispatcher at the same sizes, in the same processes, alternating
// iteration by iteration: forward + backward of the whole layer, and the dispatcher alone
// (dispatch + combine of a forward without gradients). Medians after a warm-up, slowest rank.
// One JSON line per case: {"name", "unit", "ours", "reference", "referenceName", "ratio", "tokens"}.
// Usage: node bench/moe-dispatch.mjs [--tokens 256,1024,4096] [--iters 15]
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { launch } from '@megapatch/parallel/launch';

const here = dirname(fileURLToPath(import.meta.url));
const { values } = parseArgs({
  options: {
    tokens: { type: 'string', default: '256,1024,4096' },
    iters: { type: 'string', default: '15' },
  },
});
const EP = 2;

let out = '';
let err = '';
const r = await launch({
  command: process.execPath,
  args: [
    join(here, 'moe-dispatch-worker.mjs'),
    JSON.stringify({
      tokens: values.tokens.split(',').map(Number),
      hidden: 256,
      experts: 8,
      topk: 2,
      ffn: 256,
      iters: Number(values.iters),
      warmup: 2,
    }),
  ],
  nprocPerNode: EP,
  env: { ...process.env, MEGAPATCH_NUM_THREADS: '1', OMP_NUM_THREADS: '1' },
  handleSignals: false,
  prefixOutput: false,
  stdout: (t) => (out += t),
  stderr: (t) => (err += t),
});
if (!r.ok) throw new Error(`${r.message}\n${err.slice(-3000)}`);

const report = (name, mine, ref, tokens) =>
  console.log(
    JSON.stringify({
      name,
      unit: 'ms',
      ours: Number(mine.toPrecision(4)),
      reference: Number(ref.toPrecision(4)),
      referenceName: 'allgather dispatcher, same sizes',
      ratio: Number((mine / ref).toFixed(3)),
      tokens,
    }),
  );
for (const line of out.split('\n').filter((l) => l.startsWith('RESULT '))) {
  const res = JSON.parse(line.slice(7));
  const tag = `ep${res.ep}-${res.tokens}tok`;
  report(`moe-alltoall-fwd-bwd-${tag}`, res.fwdBwd.alltoall, res.fwdBwd.allgather, res.tokens);
  report(`moe-alltoall-dispatch-combine-${tag}`, res.dispatch.alltoall, res.dispatch.allgather, res.tokens);
}
