// Cancellation: a conversion given an AbortSignal stops between chunks, removes every temporary it
// created and rethrows the signal's reason unchanged; what was there before is left as it was.
import fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  type ConversionProgress,
  convertHfToMegapatch,
  convertMegapatchToHf,
  convertMegapatchToMegatron,
  convertMegatronToMegapatch,
  LATEST_ITERATION_FILE,
  reshardCheckpoint,
} from '../src/index.js';
import { SYNTHETIC_MODELS, writeSyntheticHfCheckpoint } from '../src/testing/index.js';
import { scratch, snapshot, temporaries, thrown } from './helpers.js';

const tmp = scratch('abort');
const llama = SYNTHETIC_MODELS.find((m) => m.id === 'llama')?.config as Record<string, unknown>;

/** A signal aborted with `reason` by the first progress report; counts the reports. */
function abortOnFirstChunk(reason: unknown) {
  const ac = new AbortController();
  const seen = { chunks: 0 };
  const onProgress = () => {
    if (++seen.chunks === 1) ac.abort(reason);
  };
  return { signal: ac.signal, onProgress, seen };
}

describe('cancellation', () => {
  const hfDir = tmp('hf');
  writeSyntheticHfCheckpoint(hfDir, llama, { seed: 8 });
  const base = tmp('base');
  const ready = convertHfToMegapatch({ hfDir, output: base, layout: { tp: 2 } });

  it('hf-to-megapatch stops after the first chunk, leaves no trace, keeps the previous checkpoint and tracker', async () => {
    const root = tmp('hf-to-mp');
    await convertHfToMegapatch({ hfDir, output: root });
    const before = snapshot(root);
    const reason = new Error('interrupted by the user');
    const a = abortOnFirstChunk(reason);
    const e = await thrown(() =>
      convertHfToMegapatch({ hfDir, output: root, iteration: 5, layout: { tp: 2 }, chunkBytes: 1024, ...a }),
    );
    expect(e).toBe(reason);
    // One HF chunk reaches at most both TP pieces before the converter looks at the signal.
    expect(a.seen.chunks).toBeLessThanOrEqual(2);
    expect(snapshot(root)).toEqual(before);
    expect(fs.readdirSync(root).sort()).toEqual(['iter_0000000', LATEST_ITERATION_FILE]);
    expect(fs.readFileSync(path.join(root, LATEST_ITERATION_FILE), 'utf8').trim()).toBe('0');
    // The same when it would have replaced the existing iteration.
    const b = abortOnFirstChunk({ code: 'SIGINT' });
    const e2 = await thrown(() =>
      convertHfToMegapatch({ hfDir, output: root, overwrite: true, chunkBytes: 1024, ...b }),
    );
    expect(e2).toEqual({ code: 'SIGINT' });
    expect(snapshot(root)).toEqual(before);
  });

  it('reshard stops the same way, keeping the earlier output', async () => {
    await ready;
    const out = tmp('reshard');
    await reshardCheckpoint({ input: base, output: out, layout: { tp: 1 } });
    const before = snapshot(out);
    const reason = new DOMException('stopped', 'AbortError');
    const a = abortOnFirstChunk(reason);
    const e = await thrown(() =>
      reshardCheckpoint({
        input: base,
        output: out,
        layout: { pp: 2 },
        overwrite: true,
        chunkBytes: 512,
        ...a,
      }),
    );
    expect(e).toBe(reason);
    expect(snapshot(out)).toEqual(before);
    expect(temporaries(out)).toEqual([]);
  });

  it('megapatch-to-hf removes its temporary folder and keeps an earlier export', async () => {
    await ready;
    const parent = tmp('export');
    const out = path.join(parent, 'hf');
    const reason = new Error('stop');
    const a = abortOnFirstChunk(reason);
    expect(
      await thrown(() => convertMegapatchToHf({ input: base, output: out, chunkBytes: 1024, ...a })),
    ).toBe(reason);
    expect(fs.existsSync(out)).toBe(false);
    expect(fs.existsSync(parent) ? fs.readdirSync(parent) : []).toEqual([]);
    await convertMegapatchToHf({ input: base, output: out });
    const before = snapshot(parent);
    const b = abortOnFirstChunk(reason);
    expect(
      await thrown(() =>
        convertMegapatchToHf({ input: base, output: out, overwrite: true, chunkBytes: 1024, ...b }),
      ),
    ).toBe(reason);
    expect(snapshot(parent)).toEqual(before);
  });

  it('megapatch-to-megatron and megatron-to-megapatch stop the same way, keeping earlier outputs', async () => {
    await ready;
    const meg = tmp('megatron');
    await convertMegapatchToMegatron({ input: base, output: meg, layout: { tp: 2, pp: 2 } });
    const before = snapshot(meg);
    const reason = new Error('SIGTERM');
    const a = abortOnFirstChunk(reason);
    expect(
      await thrown(() =>
        convertMegapatchToMegatron({ input: base, output: meg, overwrite: true, chunkBytes: 512, ...a }),
      ),
    ).toBe(reason);
    expect(snapshot(meg)).toEqual(before);
    expect(temporaries(meg)).toEqual([]);
    const back = tmp('from-megatron');
    await convertMegatronToMegapatch({ input: meg, hfDir, output: back });
    const kept = snapshot(back);
    const b = abortOnFirstChunk(reason);
    expect(
      await thrown(() =>
        convertMegatronToMegapatch({
          input: meg,
          hfDir,
          output: back,
          overwrite: true,
          chunkBytes: 512,
          ...b,
        }),
      ),
    ).toBe(reason);
    expect(snapshot(back)).toEqual(kept);
    expect(temporaries(back)).toEqual([]);
  });

  it('an already aborted signal stops each converter before it creates anything', async () => {
    await ready;
    const reason = { stopped: true };
    const signal = AbortSignal.abort(reason);
    const out = tmp('never');
    expect(await thrown(() => convertHfToMegapatch({ hfDir, output: out, signal }))).toBe(reason);
    expect(await thrown(() => reshardCheckpoint({ input: base, output: out, layout: {}, signal }))).toBe(
      reason,
    );
    expect(await thrown(() => convertMegapatchToHf({ input: base, output: out, signal }))).toBe(reason);
    expect(await thrown(() => convertMegapatchToMegatron({ input: base, output: out, signal }))).toBe(reason);
    expect(fs.existsSync(out)).toBe(false);
    expect(fs.readdirSync(path.dirname(out)).filter((n) => n.startsWith(path.basename(out)))).toEqual([]);
  });

  it('yields to the event loop between chunks, so a timer (or a SIGINT handler) can stop a long tensor', async () => {
    const root = tmp('timer');
    const ac = new AbortController();
    const reason = new Error('SIGINT');
    let last: ConversionProgress | undefined;
    let scheduled = false;
    const onProgress = (p: ConversionProgress) => {
      last = p;
      if (!scheduled) {
        scheduled = true;
        // Runs only when the converter hands the event loop back (timers come after I/O and immediates).
        setTimeout(() => ac.abort(reason), 0);
      }
    };
    // 256-byte chunks: the 1000 × 64 BF16 embedding alone takes 500 of them.
    const e = await thrown(() =>
      convertHfToMegapatch({ hfDir, output: root, chunkBytes: 256, signal: ac.signal, onProgress }),
    );
    expect(e).toBe(reason);
    expect(last?.tensor).toBe('embedding.word_embeddings.weight');
    expect(last?.doneBytes).toBeLessThan(1000 * 64 * 2);
    expect(fs.readdirSync(root)).toEqual([]);
  });
});
