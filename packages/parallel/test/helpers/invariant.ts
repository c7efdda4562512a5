// Runs the invariant worker (a small GPT on the tensor-parallel layers, DDP and the optimizers)
// under the launcher and compares a run with the single-process reference.
import { spawn } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect } from 'vitest';
import { launch } from '../../src/launch/launcher.js';
import { freePort } from './workers.js';

const here = dirname(fileURLToPath(import.meta.url));
export const ADDON = join(here, '..', '..', 'build', 'Release', 'megapatch_parallel.node');
const TSX = join(here, '..', '..', 'node_modules', 'tsx', 'dist', 'esm', 'index.mjs');
const WORKER = join(here, '..', 'workers', 'gpt-invariant-worker.ts');

export interface Run {
  losses: number[];
  gradNorms: number[];
  weights: Record<string, number[]>;
  stats: { buckets: number; bucketsLaunchedDuringBackward: number };
  layout: { tp: number; dp: number; localQkvRows: number; sequenceParallel: boolean };
  liveBytes: number[];
}

/** Trains on `nproc` processes: one launcher, or `nnodes` launchers (one per "node") on loopback. */
export async function train(nproc: number, cfg: Record<string, unknown>, nnodes = 1): Promise<Run> {
  let out = '';
  let err = '';
  const masterPort = nnodes > 1 ? await freePort() : undefined;
  const results = await Promise.all(
    Array.from({ length: nnodes }, (_, nodeRank) =>
      launch({
        command: process.execPath,
        args: ['--import', TSX, WORKER, JSON.stringify(cfg)],
        nprocPerNode: nproc / nnodes,
        nnodes,
        nodeRank,
        masterAddr: '127.0.0.1',
        masterPort,
        env: { ...process.env, MEGAPATCH_NUM_THREADS: '1' },
        handleSignals: false,
        prefixOutput: false,
        stdout: (t) => (out += t),
        stderr: (t) => (err += t),
      }),
    ),
  );
  for (const r of results) if (!r.ok) throw new Error(`${r.message}\n${err.slice(-3000)}`);
  const line = out.split('\n').find((l) => l.startsWith('RESULT '));
  if (!line) throw new Error(`no result:\n${out.slice(-2000)}\n${err.slice(-2000)}`);
  return JSON.parse(line.slice(7)) as Run;
}

export function relNorm(a: number[], b: number[]): number {
  let d = 0;
  let n = 0;
  for (let i = 0; i < a.length; i++) {
    d += (a[i] - b[i]) ** 2;
    n += b[i] ** 2;
  }
  return Math.sqrt(d) / Math.max(Math.sqrt(n), 1e-30);
}

/** Runs the worker through the real `megapatch launch` binary (the cli package must be built). */
export function trainWithCli(bin: string, nproc: number, cfg: Record<string, unknown>): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(
      process.execPath,
      [
        bin,
        'launch',
        '--nproc-per-node',
        String(nproc),
        '--no-prefix',
        '--',
        process.execPath,
        '--import',
        TSX,
        WORKER,
        JSON.stringify(cfg),
      ],
      { env: { ...process.env, MEGAPATCH_NUM_THREADS: '1' }, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (err += d));
    child.on('close', (code) => {
      const line = out.split('\n').find((l) => l.startsWith('RESULT '));
      if (code !== 0 || !line) reject(new Error(`megapatch launch exited ${code}:\n${err.slice(-3000)}`));
      else resolve(JSON.parse(line.slice(7)) as Run);
    });
  });
}

/** Asserts that `run` (a layout) matches `reference` (one process): losses, grad norms, weights. */
export function expectSameTraining(run: Run, reference: Run, steps: number): void {
  for (let s = 0; s < steps; s++) {
    expect(
      Math.abs(run.losses[s] - reference.losses[s]) / reference.losses[s],
      `loss of step ${s + 1}`,
    ).toBeLessThan(1e-5);
    expect(Math.abs(run.gradNorms[s] - reference.gradNorms[s]) / reference.gradNorms[s]).toBeLessThan(1e-4);
  }
  expect(Object.keys(run.weights).sort()).toEqual(Object.keys(reference.weights).sort());
  for (const [k, w] of Object.entries(run.weights)) {
    const ref = reference.weights[k];
    expect(w.length, k).toBe(ref.length);
    expect(relNorm(w, ref), k).toBeLessThan(1e-5);
    let maxAbs = 0;
    for (let i = 0; i < w.length; i++) maxAbs = Math.max(maxAbs, Math.abs(w[i] - ref[i]));
    expect(maxAbs, k).toBeLessThan(1e-5);
  }
}
