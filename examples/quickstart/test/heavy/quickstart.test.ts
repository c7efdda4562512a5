// The README's `pnpm demo` at full size (about two minutes on two cores): the model answers the
// held-out stories and its loss on them reaches the floor of a model that reads them perfectly.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, expect, it } from 'vitest';
import { runQuickstart } from '../../src/pipeline.js';
import { SIZES } from '../../src/sizes.js';

const root = fs.mkdtempSync(path.join(os.tmpdir(), 'mp-quickstart-heavy-'));
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));

it('answers the 500 held-out stories', async () => {
  const r = await runQuickstart({ out: path.join(root, 'out'), size: SIZES.full, write: () => {} });
  expect(r.firstLoss).toBeGreaterThan(10);
  expect(r.lastLoss).toBeLessThan(0.9);
  expect(r.total).toBe(500);
  expect(r.accuracy).toBeGreaterThanOrEqual(0.95);
  expect(r.evalLoss).toBeLessThan(r.evalFloor + 0.1);
});
