// pnpm test:heavy: the invariant over more layouts and steps, and through the real `megapatch
// launch` binary (build the cli package first: turbo's test:heavy depends on build).
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { beforeAll, describe, expect, it } from 'vitest';
import { ADDON, expectSameTraining, type Run, train, trainWithCli } from '../helpers/invariant.js';

const here = dirname(fileURLToPath(import.meta.url));
const BIN = join(here, '..', '..', '..', 'cli', 'bin', 'megapatch.js');
const CLI_DIST = join(here, '..', '..', '..', 'cli', 'dist', 'index.js');
const STEPS = 12;

describe.skipIf(!existsSync(ADDON))(`every layout trains like one process over ${STEPS} steps`, () => {
  let reference: Run;
  beforeAll(async () => {
    reference = await train(1, { tp: 1, steps: STEPS });
  }, 300_000);

  const layouts: [string, number, Record<string, unknown>][] = [
    ['TP4', 4, { tp: 4 }],
    ['TP4 + SP', 4, { tp: 4, sp: true }],
    ['DP4', 4, { tp: 1 }],
    [
      'DP4 + distributed optimizer, one bucket per parameter group',
      4,
      { tp: 1, distOpt: true, bucketSize: 100 },
    ],
    ['TP2 x DP2 + SP', 4, { tp: 2, sp: true }],
    ['TP2 x DP2 + distributed optimizer', 4, { tp: 2, distOpt: true }],
  ];
  for (const [name, nproc, cfg] of layouts) {
    it(`${name} (${nproc} processes)`, async () => {
      const run = await train(nproc, { ...cfg, steps: STEPS });
      expectSameTraining(run, reference, STEPS);
    }, 300_000);
  }

  it.skipIf(!existsSync(CLI_DIST))(
    'TP2 x DP2 + SP + distributed optimizer through the megapatch launch binary',
    async () => {
      const run = await trainWithCli(BIN, 4, { tp: 2, sp: true, distOpt: true, steps: STEPS });
      expect(run.layout).toMatchObject({ tp: 2, dp: 2, sequenceParallel: true });
      expectSameTraining(run, reference, STEPS);
    },
    300_000,
  );
});
