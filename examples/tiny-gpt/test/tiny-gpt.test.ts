// The example trains and learns: memory flat from step to step, digit sorting solved on held-out
// cases, tiny Shakespeare below its unigram entropy. Each run happens in a worker thread
// (test/run-worker.mjs) so that the test runner's event loop stays free.
import { readFileSync } from 'node:fs';
import { Worker } from 'node:worker_threads';
import { sharedPath, skipWithoutShared } from '@megapatch/test-support';
import { describe, expect, it } from 'vitest';

const shakespeare = sharedPath('data/corpus/tinyshakespeare_input.txt');
// Any text will do to show that memory stays flat: a generated one needs no data folder.
const generatedText = Array.from(
  { length: 4000 },
  (_, i) => `${['the', 'a', 'one'][i % 3]} ${['cat', 'dog', 'bird', 'fox'][(i * 7) % 4]} ${i % 11}.`,
).join(' ');

function run<T>(which: string, text?: string): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const w = new Worker(new URL('./run-worker.mjs', import.meta.url), { workerData: { case: which, text } });
    w.once('message', (m: T) => resolve(m));
    w.once('error', reject);
    w.once('exit', (code) => code !== 0 && reject(new Error(`the ${which} worker exited with ${code}`)));
  });
}

describe('tiny-gpt', () => {
  it('keeps native memory flat from step to step (50 steps)', async () => {
    const r = await run<{ liveBytes: number[]; losses: number[] }>('memory', generatedText);
    expect(r.liveBytes[4]).toBeGreaterThan(0);
    expect(r.liveBytes[49]).toBe(r.liveBytes[4]);
    expect(r.losses[49]).toBeLessThan(r.losses[0]);
  });

  it('learns to sort digits and solves held-out cases', async () => {
    const r = await run<{ accuracy: number }>('sort');
    expect(r.accuracy).toBeGreaterThan(0.9);
  });

  it.skipIf(skipWithoutShared(import.meta.url))(
    'trains on tiny Shakespeare to a validation loss well below the unigram entropy',
    async () => {
      const r = await run<{ val: number; unigramEntropy: number; before: number; after: number }>(
        'shakespeare',
        readFileSync(shakespeare, 'utf8'),
      );
      // unigram entropy of the text is about 3.3 nats per character
      expect(r.unigramEntropy).toBeGreaterThan(3);
      expect(r.val).toBeLessThan(r.unigramEntropy - 0.8);
      expect(r.after).toBeLessThanOrEqual(r.before);
    },
  );
});
