// The garbage collector's safety net, counted: a tensor dropped without dispose() (outside tidy)
// is released when the collector finds it, and memoryStats says how many were and what they freed,
// so a training loop can show it relies on nothing of the kind; MEGAPATCH_TRACE_COLLECTED=1 says
// where they were made. The variable is read when the package loads, hence the dynamic import.
import * as v8 from 'node:v8';
import * as vm from 'node:vm';
import { describe, expect, it } from 'vitest';

process.env.MEGAPATCH_TRACE_COLLECTED = '1';
const T = await import('../src/index.js');
v8.setFlagsFromString('--expose-gc');
const gc = vm.runInNewContext('gc') as () => void;

/** Collections until the finalizers have run (they run in tasks after a collection). */
async function collect(): Promise<void> {
  for (let i = 0; i < 4; i++) {
    gc();
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Makes tensors and drops them (unreachable once this returns). */
function dropTensors(): void {
  T.zeros([10]); // 40 bytes, never disposed
  T.ones([4], { dtype: 'float64' }); // 32 bytes
}

describe('tensors dropped without dispose()', () => {
  it('are counted when the collector releases them, with the bytes it freed', async () => {
    await collect();
    const before = T.memoryStats('cpu');
    dropTensors();
    expect(T.memoryStats('cpu').liveBytes - before.liveBytes).toBe(72);
    await collect();
    const after = T.memoryStats('cpu');
    expect(after.liveBytes).toBe(before.liveBytes);
    expect(after.collectedTensors - before.collectedTensors).toBe(2);
    expect(after.collectedBytes - before.collectedBytes).toBe(72);
  });

  it('a dropped view of a kept tensor counts as a tensor, its storage freed by the owner', async () => {
    const base = T.zeros([6]);
    await collect();
    const before = T.memoryStats('cpu');
    (() => void base.narrow(0, 1, 3))();
    await collect();
    const mid = T.memoryStats('cpu');
    expect(mid.collectedTensors - before.collectedTensors).toBe(1);
    expect(mid.collectedBytes - before.collectedBytes).toBe(0);
    expect(mid.liveBytes).toBe(before.liveBytes); // the base still holds its 24 bytes
    base.dispose();
    await collect();
    const after = T.memoryStats('cpu');
    expect(after.liveBytes).toBe(before.liveBytes - 24);
    expect(after.collectedTensors).toBe(mid.collectedTensors); // disposed: not the collector's
  });

  it('disposed tensors and tidy scopes leave the count alone', async () => {
    await collect();
    const before = T.memoryStats('cpu').collectedTensors;
    (() => {
      T.zeros([3]).dispose();
      T.tidy(() => T.ones([5]).add(1));
    })();
    await collect();
    // tidy's result moves to no enclosing scope: the add's output, dropped, is the collector's
    expect(T.memoryStats('cpu').collectedTensors - before).toBe(1);
  });

  it('MEGAPATCH_TRACE_COLLECTED=1 names where they were made', async () => {
    await collect();
    const before = new Map(T.collectedTensorSites('cpu').map((s) => [s.site, s.tensors]));
    dropTensors();
    await collect();
    const sites = T.collectedTensorSites('cpu').filter((s) => s.tensors > (before.get(s.site) ?? 0));
    expect(sites.length).toBeGreaterThan(0);
    for (const s of sites) {
      expect(s.device).toBe('cpu');
      expect(s.site).toMatch(/dropTensors/);
      expect(s.site).toMatch(/collected\.test\.ts/);
    }
    expect(sites.reduce((n, s) => n + s.tensors - (before.get(s.site) ?? 0), 0)).toBe(2);
    expect(T.collectedTensorSites('cuda:3')).toEqual([]);
  });
});
