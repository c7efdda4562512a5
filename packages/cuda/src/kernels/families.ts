// The named kernels of each native kernel family, for the families the addon was built with
// (its `families` export): what the backend answers to `kernel(name)`.
import type { KernelTable } from '@megapatch/tensor';
import type { Entries } from '../pack.js';
import { attentionKernels } from './attention.js';
import { gemmKernels } from './gemm.js';
import { gluKernels } from './glu.js';
import { indexingKernels } from './indexing.js';
import { normKernels } from './norm.js';
import { optimKernels } from './optim.js';
import { softmaxKernels } from './softmax.js';

type Family = (call: Entries) => Partial<KernelTable>;

const FAMILIES: Record<string, Family> = {
  attention: attentionKernels,
  gemm: gemmKernels,
  glu: gluKernels,
  index: indexingKernels,
  norm: normKernels,
  optim: optimKernels,
  softmax: softmaxKernels,
};

export function familyKernels(call: Entries, families: readonly string[]): Partial<KernelTable> {
  const out: Partial<KernelTable> = {};
  for (const f of families) {
    const make = FAMILIES[f];
    if (make) Object.assign(out, make(call));
  }
  return out;
}
