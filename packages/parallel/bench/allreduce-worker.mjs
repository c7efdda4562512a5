// One rank of the all-reduce benchmark (megapatch over Gloo). Prints one JSON line on rank 0:
// {"sizes": {bytes: seconds per op (median)}, "latencyUs": mean µs of a 4-byte all-reduce}.
import { zeros } from '@megapatch/tensor';
import { destroyProcessGroup, initProcessGroup } from '../dist/index.js';

const [sizesArg, latencyIters] = process.argv.slice(2);
const sizes = sizesArg ? sizesArg.split(',').map(Number) : [];
const g = await initProcessGroup();
const median = (a) => a.sort((x, y) => x - y)[a.length >> 1];
const out = { sizes: {}, latencyUs: null };
for (const bytes of sizes) {
  const t = zeros([bytes / 4]);
  const iters = Math.max(3, Math.min(20, Math.round((256 << 20) / bytes)));
  g.allReduce(t).waitSync(); // warm-up
  const times = [];
  for (let i = 0; i < iters; i++) {
    g.barrier().waitSync();
    const t0 = performance.now();
    g.allReduce(t).waitSync();
    times.push((performance.now() - t0) / 1000);
  }
  out.sizes[bytes] = median(times);
  t.dispose();
}
if (Number(latencyIters) > 0) {
  const t = zeros([1]);
  for (let i = 0; i < 50; i++) g.allReduce(t).waitSync();
  g.barrier().waitSync();
  const t0 = performance.now();
  for (let i = 0; i < Number(latencyIters); i++) g.allReduce(t).waitSync();
  out.latencyUs = ((performance.now() - t0) * 1000) / Number(latencyIters);
}
if (g.rank === 0) console.log(JSON.stringify(out));
await destroyProcessGroup();
