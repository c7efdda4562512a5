// The kernel profiler of the CUDA backend: device time per backend entry, from CUDA events
// recorded on the device's stream before and after each entry (the emulator's events carry host
// time, so there it measures the CPU's run of the kernels). Entries are what the backend calls in
// the addon (a unary op, a fused norm, a GEMM, attention's whole backward): one entry may launch
// several kernels, and the profile times them together. Bytes are each entry's tensor operands
// (a lower bound on its traffic; a GEMM's are its three matrices), so bytes / time says how far a
// memory-bound kernel is from the device's bandwidth, and FLOPs / time what a GEMM reaches.
//
// startKernelProfile(device) ... stopKernelProfile(device) brackets the work to profile; the stop
// waits for the device. Marks cost a cudaEventRecord each (a few microseconds of host time), which
// a device-bound step hides.
import type { BackendAddon } from './native.js';
import { type Entries, note } from './pack.js';

/** One label's totals in a profile. */
export interface KernelProfileEntry {
  /**
   * The addon entry, with the op for unary / binary / reduce entries (e.g. "binary:add"), and
   * with the `shapes` option the first operand's dtype and shape (e.g. "copy bf16[4,2048,2048]").
   */
  name: string;
  /** gemm: the GEMM entries; attention: fused attention; other: the rest. */
  kind: 'gemm' | 'attention' | 'other';
  calls: number;
  /** Device milliseconds between the marks around its calls. */
  ms: number;
  /** Bytes of the calls' tensor operands (see the file's comment). */
  bytes: number;
  /** FLOPs of the calls' GEMMs (0 for entries that are not GEMMs). */
  flops: number;
}

/** What stopKernelProfile returns. */
export interface KernelProfile {
  device: string;
  /** Every label, the longest first. */
  entries: KernelProfileEntry[];
  calls: number;
  /** The sum of the entries' times. */
  kernelMs: number;
  /** From the first mark to the last: kernelMs plus the gaps (the device waiting for the host). */
  spanMs: number;
  /** cudaMalloc calls of the caching allocator during the profile (each synchronises the device). */
  deviceMallocs: number;
  /**
   * Times the host waited for a device during the profile (any device of this addon): reads,
   * synchronize(), an upload finding the staging ring full of queued copies, an upload too large
   * for the ring. Uploads that fit do not wait: an asynchronous step waits at its reads alone.
   */
  hostWaits: number;
}

const GEMM_ENTRIES = new Set([
  'gemm',
  'gemmFallback',
  'linearBias',
  'linearActivation',
  'linearWeightBiasGrad',
  'linearWeightGradAccumulate',
  'linearResidual',
  'groupedGemm',
  'groupedGemmSized',
]);
const ATTENTION_ENTRIES = new Set(['attentionForward', 'attentionBackward']);
// addon functions that are not entries queuing device work
const NOT_ENTRIES = new Set([
  'setArgBuffer',
  'setDevice',
  'deviceCount',
  'synchronize',
  'alloc',
  'free',
  'emptyCache',
  'cachedBytes',
  'memGetInfo',
  'readInto',
  'readIntoMany',
  'writeFrom',
  'gemmEngine',
  'emuStats',
  'hostWaits',
  'setStagingBytes',
  'uploadStats',
  'profileMark',
  'profileCollect',
]);

interface Session {
  labels: string[];
  marks: number[];
  bytes: number[];
  flops: number[];
  mallocs0: number;
  waits0: number;
}

const profilers = new Map<string, { start(shapes: boolean): void; stop(): KernelProfile }>();

/**
 * The addon's entries as the backend calls them, each timed while its device has a profile
 * running (`current()`: the device index a call runs on), and `register(index, on)`, which makes
 * device `index` profilable (`on()` makes it current).
 */
export function profiledEntries(
  addon: BackendAddon,
  type: string,
  current: () => number,
): { entries: Entries; register(index: number, on: () => void): void } {
  const sessions = new Map<number, Session>();
  const entries: Entries = {};
  const canProfile = typeof addon.profileMark === 'function';
  const mark = addon.profileMark as () => number;
  const collect = addon.profileCollect as () => { ms: Float64Array; mallocs: number; hostWaits: number };
  for (const [name, fn] of Object.entries(addon)) {
    if (typeof fn !== 'function' || NOT_ENTRIES.has(name)) continue;
    const call = (fn as () => unknown).bind(addon);
    entries[name] = () => {
      const s = sessions.size ? sessions.get(current()) : undefined;
      if (s === undefined) return call();
      let label = note.tag ? `${name}:${note.tag}` : name;
      if (note.shapes && note.shape) label += ` ${note.shape}`;
      const bytes = note.bytes;
      const flops = note.flops;
      s.marks.push(mark());
      try {
        return call();
      } finally {
        s.marks.push(mark());
        s.labels.push(label);
        s.bytes.push(bytes);
        s.flops.push(flops);
      }
    };
  }

  const register = (index: number, on: () => void) => {
    const device = `${type}:${index}`;
    profilers.set(device, {
      start(shapes: boolean) {
        if (!canProfile)
          throw new Error(`startKernelProfile: the addon of ${device} has no profiler; rebuild it`);
        on();
        // marks left from an interrupted profile are dropped; the collection waits for the device
        const m = collect();
        sessions.set(index, {
          labels: [],
          marks: [],
          bytes: [],
          flops: [],
          mallocs0: m.mallocs,
          waits0: m.hostWaits,
        });
        note.active = true;
        note.shapes = shapes;
      },
      stop() {
        const s = sessions.get(index);
        if (!s) throw new Error(`stopKernelProfile: no profile is running on ${device}`);
        sessions.delete(index);
        note.active = sessions.size > 0;
        on();
        const { ms, mallocs, hostWaits } = collect();
        const by = new Map<string, KernelProfileEntry>();
        let kernelMs = 0;
        for (let i = 0; i < s.labels.length; i++) {
          const name = s.labels[i];
          const t = ms[s.marks[2 * i + 1]] - ms[s.marks[2 * i]];
          kernelMs += t;
          let e = by.get(name);
          if (!e) {
            const entry = name.split(/[: ]/)[0];
            const kind = GEMM_ENTRIES.has(entry)
              ? 'gemm'
              : ATTENTION_ENTRIES.has(entry)
                ? 'attention'
                : 'other';
            e = { name, kind, calls: 0, ms: 0, bytes: 0, flops: 0 };
            by.set(name, e);
          }
          e.calls++;
          e.ms += t;
          e.bytes += s.bytes[i];
          e.flops += s.flops[i];
        }
        return {
          device,
          entries: [...by.values()].sort((a, b) => b.ms - a.ms),
          calls: s.labels.length,
          kernelMs,
          spanMs: ms.length ? ms[ms.length - 1] : 0,
          deviceMallocs: mallocs - s.mallocs0,
          // less this collection's own wait
          hostWaits: hostWaits - s.waits0 - 1,
        };
      },
    });
  };
  return { entries, register };
}

function profilerOf(device: string) {
  const p = profilers.get(device);
  if (!p)
    throw new Error(
      `kernel profile: "${device}" is not a device of @megapatch/cuda that has been used (known: ${[...profilers.keys()].join(', ') || 'none'})`,
    );
  return p;
}

/** Options of {@link startKernelProfile}. */
export interface KernelProfileOptions {
  /** Label each entry with its first tensor operand's dtype and shape too (default false). */
  shapes?: boolean;
}

/**
 * Starts timing every backend entry on `device` ("cuda:0", or "cudaemu:0" on the emulator).
 * Waits for the device first. The device must have been used (a tensor made on it).
 */
export function startKernelProfile(device: string, options: KernelProfileOptions = {}): void {
  profilerOf(device).start(options.shapes ?? false);
}

/** Stops the profile of `device` and returns it (waits for the device). */
export function stopKernelProfile(device: string): KernelProfile {
  return profilerOf(device).stop();
}

/** A profile as a table: the `top` longest labels, then the totals by kind. */
export function formatKernelProfile(p: KernelProfile, top = 25): string {
  const f = (x: number, d = 3) => x.toFixed(d);
  const w = Math.max(36, ...p.entries.slice(0, top).map((e) => e.name.length));
  const lines = [
    `kernel profile of ${p.device}: ${p.calls} entries, ${f(p.kernelMs)} ms in entries of a ${f(p.spanMs)} ms span (gaps ${f(p.spanMs - p.kernelMs)} ms), ${p.deviceMallocs} cudaMalloc, ${p.hostWaits} host waits`,
    `${'entry'.padEnd(w)} ${'calls'.padStart(6)} ${'ms'.padStart(10)} ${'%'.padStart(6)} ${'us/call'.padStart(9)} ${'GB'.padStart(8)} ${'GB/s'.padStart(7)} ${'TFLOP/s'.padStart(8)}`,
  ];
  for (const e of p.entries.slice(0, top)) {
    const gbs = e.ms > 0 ? e.bytes / 1e6 / e.ms : 0;
    const tf = e.flops && e.ms > 0 ? f(e.flops / 1e9 / e.ms, 1) : '';
    lines.push(
      `${e.name.padEnd(w)} ${String(e.calls).padStart(6)} ${f(e.ms).padStart(10)} ${f((100 * e.ms) / (p.kernelMs || 1), 1).padStart(6)} ${f((1000 * e.ms) / e.calls, 1).padStart(9)} ${f(e.bytes / 1e9, 2).padStart(8)} ${f(gbs, 0).padStart(7)} ${tf.padStart(8)}`,
    );
  }
  if (p.entries.length > top) {
    const rest = p.entries.slice(top);
    lines.push(`(${rest.length} more labels: ${f(rest.reduce((s, e) => s + e.ms, 0))} ms)`);
  }
  const kinds = ['gemm', 'attention', 'other'] as const;
  lines.push(
    `by kind: ${kinds
      .map((k) => {
        const ms = p.entries.filter((e) => e.kind === k).reduce((s, e) => s + e.ms, 0);
        return `${k} ${f(ms)} ms (${f((100 * ms) / (p.kernelMs || 1), 1)}%)`;
      })
      .join(', ')}`,
  );
  return lines.join('\n');
}
