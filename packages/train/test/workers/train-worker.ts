// One rank of test/parallel.test.ts: trains the config given as argv[2] (JSON) and prints the
// per-iteration losses on global rank 0 as `RESULT {...}`.
import { parseRunConfig, train } from '../../src/index.js';

const config = parseRunConfig(JSON.parse(process.argv[2] ?? '{}'));
const r = await train(config, { log: () => {}, report: false });
if ((process.env.RANK ?? '0') === '0')
  console.log(`RESULT ${JSON.stringify({ losses: r.losses, iteration: r.iteration })}`);
