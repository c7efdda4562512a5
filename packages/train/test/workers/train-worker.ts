// One rank of test/parallel.test.ts: trains the config given as argv[2] (JSON) and prints the
// per-iteration losses on global rank 0 as `RESULT {...}`.
import { deviceCollectivesLibrary } from '@megapatch/parallel';
import { getBackend } from '@megapatch/tensor';
import { parseRunConfig, train } from '../../src/index.js';

const config = parseRunConfig(JSON.parse(process.argv[2] ?? '{}'));
const r = await train(config, { log: () => {}, report: false });
// the library this rank's collectives used for the run's device (null: host copies over Gloo)
const dev = config.training.device;
const device =
  dev === 'cpu'
    ? 'cpu'
    : getBackend(dev.includes(':') ? dev : `${dev}:${process.env.LOCAL_RANK ?? 0}`).device;
const collectives = deviceCollectivesLibrary(device);
if ((process.env.RANK ?? '0') === '0')
  console.log(`RESULT ${JSON.stringify({ losses: r.losses, iteration: r.iteration, device, collectives })}`);
