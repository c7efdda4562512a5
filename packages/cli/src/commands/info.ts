import type { Command } from '../command.js';
import { packageVersion } from '../version.js';

const PACKAGES = [
  '@megapatch/cli',
  '@megapatch/tensor',
  '@megapatch/cuda',
  '@megapatch/parallel',
  '@megapatch/models',
  '@megapatch/data',
  '@megapatch/convert',
  '@megapatch/train',
];

/** Everything `megapatch info` reports, as data. */
export interface InfoReport {
  node: string;
  platform: string;
  packages: Record<string, string>;
  cpu:
    | {
        blas: string;
        blasConfig: string;
        /** How bf16 GEMMs run: oneDNN's bf16 kernels, or fp32 panels. */
        bf16Gemm: string;
        onednn: string | null;
        onednnIsa: string | null;
        simd: string;
        openmp: boolean;
        threads: number;
        addonPath: string;
      }
    | { error: string };
  cuda: {
    available: boolean;
    reason: string;
    toolkit?: string | null;
    runtime?: string | null;
    driver?: string | null;
    nccl?: string | null;
    ncclError?: string | null;
    devices?: { index: number; name: string; totalMemory: number; computeCapability: string }[];
  };
  collectives: { gloo: string } | { error: string };
}

export async function collectInfo(): Promise<InfoReport> {
  const packages: Record<string, string> = {};
  for (const p of PACKAGES) {
    const v = packageVersion(p);
    if (v) packages[p] = v;
  }
  let cpu: InfoReport['cpu'];
  try {
    const tensor = await import('@megapatch/tensor');
    const b = tensor.backendInfo();
    cpu = {
      blas: b.blas,
      blasConfig: b.blasConfig,
      bf16Gemm: b.bf16Gemm,
      onednn: b.onednn,
      onednnIsa: b.onednnIsa,
      simd: b.simd,
      openmp: b.openmp,
      threads: b.threads,
      addonPath: b.addonPath,
    };
  } catch (e) {
    cpu = { error: (e as Error).message };
  }
  let cuda: InfoReport['cuda'];
  const cudaInfoModule = '@megapatch/cuda/info';
  try {
    const { cudaInfo } = (await import(cudaInfoModule)) as typeof import('@megapatch/cuda/info');
    const c = cudaInfo();
    cuda = {
      available: c.available,
      reason: c.reason,
      toolkit: c.toolkit,
      runtime: c.runtime,
      driver: c.driver,
      nccl: c.nccl,
      ncclError: c.ncclError,
      devices: c.devices.map(({ index, name, totalMemory, computeCapability }) => ({
        index,
        name,
        totalMemory,
        computeCapability,
      })),
    };
  } catch {
    cuda = { available: false, reason: '@megapatch/cuda is not installed' };
  }
  let collectives: InfoReport['collectives'];
  try {
    const { collectivesInfo } = await import('@megapatch/parallel');
    const g = collectivesInfo().gloo;
    collectives = g.available ? { gloo: `${g.library} (${g.addonPath})` } : { error: g.error };
  } catch (e) {
    collectives = { error: (e as Error).message };
  }
  return {
    node: process.version,
    platform: `${process.platform}-${process.arch}`,
    packages,
    cpu,
    cuda,
    collectives,
  };
}

export function formatInfo(r: InfoReport): string {
  const lines = [`megapatch on node ${r.node} (${r.platform})`, '', 'packages:'];
  for (const [name, v] of Object.entries(r.packages)) lines.push(`  ${name.padEnd(22)} ${v}`);
  lines.push('', 'cpu backend:');
  if ('error' in r.cpu) lines.push(`  unavailable: ${r.cpu.error}`);
  else {
    lines.push(
      `  blas      ${r.cpu.blas} (${r.cpu.blasConfig})`,
      `  bf16 gemm ${r.cpu.bf16Gemm === 'onednn' ? `oneDNN ${r.cpu.onednn} (${r.cpu.onednnIsa})` : 'fp32 panels (no oneDNN bf16 kernels on this CPU or build)'}`,
      `  simd      ${r.cpu.simd}`,
      `  threads   ${r.cpu.threads}${r.cpu.openmp ? ' (OpenMP)' : ''} — set MEGAPATCH_NUM_THREADS to change`,
      `  addon     ${r.cpu.addonPath}`,
    );
  }
  lines.push(
    '',
    'collectives:',
    'error' in r.collectives
      ? `  gloo      unavailable: ${r.collectives.error}`
      : `  gloo      ${r.collectives.gloo}`,
  );
  lines.push('', `cuda: ${r.cuda.available ? 'available' : 'not available'} — ${r.cuda.reason}`);
  const c = r.cuda;
  if (c.toolkit !== undefined && c.toolkit !== null) {
    lines.push(
      `  built with CUDA ${c.toolkit}; runtime ${c.runtime ?? '?'}; driver ${c.driver ?? 'none'}; NCCL ${c.nccl ?? `none${c.ncclError ? ` (${c.ncclError})` : ''}`}`,
    );
  }
  for (const d of c.devices ?? []) {
    lines.push(
      `  cuda:${d.index}  ${d.name}, ${(d.totalMemory / 2 ** 30).toFixed(1)} GiB, compute ${d.computeCapability}`,
    );
  }
  return lines.join('\n');
}

const info: Command = {
  name: 'info',
  summary: 'package versions, the native backends in use (CPU, Gloo) and CUDA availability',
  options: { json: { type: 'boolean', description: 'print JSON' } },
  run: async ({ options, io }) => {
    const report = await collectInfo();
    io.out.log(options.json ? JSON.stringify(report, null, 2) : formatInfo(report));
  },
};
export default info;
