// Round trip used by scripts/gpu_transformers_check.py on the GPU machine (bundled there with
// esbuild, since the machine has no registry): HF folder -> megapatch (layout) -> megapatch (1,1,1)
// -> HF folder. Also prints our FP8 decode table for comparison with torch's.
// Usage: node gpu-roundtrip.mjs <hfDir> <workDir> <tp> <pp> <ep> <etp>
//        node gpu-roundtrip.mjs --fp8-table
import * as path from 'node:path';
import { convertHfToMegapatch, convertMegapatchToHf, fp8ToNumber, reshardCheckpoint } from '../dist/index.js';

const args = process.argv.slice(2);
if (args[0] === '--fp8-table') {
  const table = (d) =>
    Array.from({ length: 256 }, (_, b) => {
      const v = fp8ToNumber(b, d);
      if (Number.isNaN(v)) return 'nan';
      if (!Number.isFinite(v)) return v > 0 ? 'inf' : '-inf';
      return Object.is(v, -0) ? '-0' : v;
    });
  console.log(JSON.stringify({ F8_E4M3: table('F8_E4M3'), F8_E5M2: table('F8_E5M2') }));
} else {
  const [hfDir, work, tp, pp, ep, etp] = args;
  const layout = { tp: +tp, pp: +pp, ep: +ep, etp: +etp };
  const sharded = path.join(work, 'mp-sharded');
  const single = path.join(work, 'mp-single');
  const back = path.join(work, 'hf-back');
  const a = await convertHfToMegapatch({ hfDir, output: sharded, layout });
  const b = await reshardCheckpoint({ input: sharded, output: single, layout: { tp: 1, pp: 1, ep: 1 } });
  const c = await convertMegapatchToHf({ input: single, output: back, maxShardSize: '2MB' });
  console.log(JSON.stringify({ layout, toMegapatch: a, reshard: b, toHf: c }));
}
