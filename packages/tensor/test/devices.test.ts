// Devices: canonical names ("cuda" is cuda:0, "cpu:0" is cpu), numbered backend types with one
// backend per index, the default device, Tensor.to / cpu / Module.to across dtypes and devices,
// and the CPU addon loaded only when a CPU tensor is made.
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import {
  type Backend,
  deviceCount,
  getBackend,
  getDefaultDevice,
  Linear,
  listBackends,
  memoryStats,
  normalizeDevice,
  registerBackendType,
  setDefaultDevice,
  TensorError,
  tensor,
  zeros,
} from '../src/index.js';

const here = dirname(fileURLToPath(import.meta.url));

/** A device type whose backends delegate every kernel to the CPU backend (distinct objects per index). */
function cpuAlike(type: string, count: number) {
  const cpu = getBackend('cpu');
  registerBackendType({
    type,
    deviceCount: () => count,
    create: (index) => ({ ...cpu, device: `${type}:${index}` }) as Backend,
  });
}

afterEach(() => setDefaultDevice('cpu'));

describe('device names', () => {
  it('are canonical: cpu and cpu:0 are the CPU, a numbered type without index is index 0', () => {
    cpuAlike('fake', 2);
    expect(normalizeDevice('cpu')).toBe('cpu');
    expect(normalizeDevice('cpu:0')).toBe('cpu');
    expect(normalizeDevice('fake')).toBe('fake:0');
    expect(normalizeDevice('fake:1')).toBe('fake:1');
    expect(deviceCount('fake')).toBe(2);
    expect(deviceCount('cpu')).toBe(1);
    expect(deviceCount('cuda')).toBe(0);
    expect(listBackends()).toContain('fake');
  });

  it('refuse malformed and unknown devices with one clear line', () => {
    cpuAlike('fake', 2);
    const err = (f: () => unknown) => {
      try {
        f();
      } catch (e) {
        expect(e).toBeInstanceOf(TensorError);
        expect((e as TensorError).code).toBe('INVALID_DEVICE');
        return (e as Error).message;
      }
      throw new Error('no error');
    };
    expect(err(() => normalizeDevice('Cuda 1'))).toMatch(/invalid device "Cuda 1": expected "cpu"/);
    expect(err(() => normalizeDevice('cpu:1'))).toMatch(/cpu has a single device, cpu \(or cpu:0\)/);
    expect(err(() => getBackend('fake:2'))).toMatch(
      /device "fake:2" does not exist: this machine has 2 fake devices \(fake:0 … fake:1\)/,
    );
    expect(err(() => zeros([2], { device: 'cuda:0' }))).toMatch(
      /no backend registered for device "cuda:0" \(import @megapatch\/cuda on a machine with an NVIDIA GPU\)/,
    );
  });

  it('give one backend per index: tensors on fake:0 and fake:1 are on different devices', () => {
    cpuAlike('fake', 2);
    expect(getBackend('fake')).toBe(getBackend('fake:0'));
    expect(getBackend('fake:0')).not.toBe(getBackend('fake:1'));
    const a = zeros([3], { device: 'fake' });
    const b = zeros([3], { device: 'fake:1' });
    expect(a.device).toBe('fake:0');
    expect(b.device).toBe('fake:1');
    expect(() => a.add(b)).toThrow(/tensors are on different devices \(fake:0 and fake:1\)/);
    const before = memoryStats('fake:1').liveBytes;
    const c = zeros([4], { device: 'fake:1' });
    expect(memoryStats('fake:1').liveBytes - before).toBe(16);
    expect(memoryStats('fake').liveBytes).toBe(memoryStats('fake:0').liveBytes);
    for (const t of [a, b, c]) t.dispose();
  });
});

describe('the default device', () => {
  it('is where tensors go without a device option (torch.set_default_device)', () => {
    cpuAlike('fake', 2);
    expect(getDefaultDevice()).toBe('cpu');
    setDefaultDevice('fake:1');
    expect(getDefaultDevice()).toBe('fake:1');
    const t = tensor([1, 2, 3]);
    expect(t.device).toBe('fake:1');
    expect(zeros([2], { device: 'cpu' }).device).toBe('cpu');
    expect(() => setDefaultDevice('fake:7')).toThrow(/does not exist/);
    expect(getDefaultDevice()).toBe('fake:1');
  });
});

describe('Tensor.to and Module.to', () => {
  it('moves between devices and dtypes, keeps the values, and sends gradients back', () => {
    cpuAlike('fake', 2);
    const x = tensor([1.5, -2.25, 3], { requiresGrad: true });
    const y = x.to('fake:1');
    expect(y.device).toBe('fake:1');
    expect(y.toArray()).toEqual([1.5, -2.25, 3]);
    const z = x.to('fake', 'bfloat16');
    expect([z.device, z.dtype]).toEqual(['fake:0', 'bfloat16']);
    const w = x.to({ dtype: 'float64' });
    expect([w.device, w.dtype]).toEqual(['cpu', 'float64']);
    expect(y.to('cpu').device).toBe('cpu');
    expect(y.cpu().device).toBe('cpu');
    // a non-contiguous view moves as its elements
    const m = tensor([
      [1, 2, 3],
      [4, 5, 6],
    ]).t();
    expect(m.to('fake:1').toArray()).toEqual([
      [1, 4],
      [2, 5],
      [3, 6],
    ]);
    // the gradient comes back to the CPU in float32
    y.mul(y).sum().backward();
    expect(x.grad?.device).toBe('cpu');
    expect(x.grad?.toArray()).toEqual([3, -4.5, 6]);
    // nothing to do: the same data (a new view)
    expect(x.to('cpu').toArray()).toEqual(x.toArray());
    expect(() => x.to('cpu', 'float8' as never)).toThrow(/unknown dtype "float8"/);
  });

  it('Module.to moves parameters and buffers, casting only floating-point ones', () => {
    cpuAlike('fake', 2);
    const lin = new Linear(4, 3);
    const before = lin.weight.toTypedArray() as Float32Array;
    lin.to('fake:1', 'bfloat16');
    expect(lin.weight.device).toBe('fake:1');
    expect(lin.weight.dtype).toBe('bfloat16');
    expect(lin.weight.requiresGrad).toBe(true);
    lin.to('cpu');
    expect(lin.weight.device).toBe('cpu');
    expect(lin.weight.dtype).toBe('bfloat16');
    const back = lin.weight.toTypedArray() as Float32Array;
    for (let i = 0; i < before.length; i++) expect(Math.abs(back[i] - before[i])).toBeLessThan(0.01);
    lin.to('float32');
    expect(lin.weight.dtype).toBe('float32');
    lin.dispose();
  });
});

describe('the CPU addon', () => {
  it('is loaded with the first CPU tensor, not when the package is imported', () => {
    // a child process records every native addon Node loads
    const script = `
      const loaded = [];
      const dlopen = process.dlopen;
      process.dlopen = (m, f, ...r) => { loaded.push(f); return dlopen(m, f, ...r); };
      const t = await import(${JSON.stringify(join(here, '..', 'src', 'index.ts'))});
      const before = loaded.filter((f) => f.endsWith('megapatch_tensor.node')).length;
      const x = t.zeros([2]);
      const after = loaded.filter((f) => f.endsWith('megapatch_tensor.node')).length;
      console.log(JSON.stringify({ before, after, device: x.device }));
    `;
    const tsx = join(here, '..', 'node_modules', 'tsx', 'dist', 'esm', 'index.mjs');
    const r = spawnSync(process.execPath, ['--import', tsx, '--input-type=module', '-e', script], {
      encoding: 'utf8',
    });
    expect(r.stderr).toBe('');
    expect(JSON.parse(r.stdout.trim().split('\n').pop() as string)).toEqual({
      before: 0,
      after: 1,
      device: 'cpu',
    });
  });
});
