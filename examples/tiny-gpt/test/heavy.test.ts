// The README's promises, checked by running the command a newcomer runs (MEGAPATCH_HEAVY=1).
import { execFile } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { sharedPath, skipWithoutShared } from '@megapatch/test-support';
import { describe, expect, it } from 'vitest';

const here = dirname(fileURLToPath(import.meta.url));
const main = join(here, '..', 'dist', 'main.js');
const shakespeare = sharedPath('data/corpus/tinyshakespeare_input.txt');
// async, so that vitest's worker keeps answering while a run takes minutes
const run = async (args: string[]): Promise<string> =>
  (await promisify(execFile)(process.execPath, [main, ...args], { encoding: 'utf8', maxBuffer: 1 << 24 }))
    .stdout;

describe('tiny-gpt end to end', () => {
  it('learns 2-digit addition with the default settings and solves held-out problems', async () => {
    const out = await run([]);
    const m = out.match(/held-out accuracy: ([\d.]+)% of 500 problems/);
    expect(m, out).not.toBeNull();
    expect(Number(m![1])).toBeGreaterThanOrEqual(95);
    expect(out).toMatch(/iteration +1500\/ +1500 \|.*lm loss: .*\| grad norm: .*\| tokens per second: \d+/);
  });

  it.skipIf(skipWithoutShared(import.meta.url))(
    'trains a character model on tiny Shakespeare well below the unigram entropy',
    async () => {
      const out = await run(['--text', shakespeare]);
      const m = out.match(/validation loss ([\d.]+) nats\/char \(unigram entropy ([\d.]+)\)/);
      expect(m, out).not.toBeNull();
      const [val, entropy] = [Number(m![1]), Number(m![2])];
      expect(val).toBeLessThan(entropy - 1.0);
    },
  );
});
