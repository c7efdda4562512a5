// Shared by the DDP / distributed-optimizer tests and their workers: a small MLP of Linear layers,
// deterministic data, the single-process reference run, and a data-parallel group of size 1 whose
// ops complete at once (for single-process tests; it records what was launched).
import {
  AdamW,
  crossEntropy,
  type DType,
  Generator,
  Linear,
  Module,
  ModuleList,
  noGrad,
  randint,
  randn,
  type Tensor,
  tidy,
} from '@megapatch/tensor';
import type { ProcessGroup, ReduceOp, Work } from '../../src/process-group.js';

/**
 * in → hidden → hidden (→ `extra` more hidden layers) → classes with SiLU, built from
 * @megapatch/tensor Linear layers.
 */
export class MLP extends Module {
  readonly fc1: Linear;
  readonly fc2: Linear;
  readonly extra: ModuleList<Linear>;
  readonly fc3: Linear;
  constructor(
    dims: { in: number; hidden: number; out: number },
    seed: number,
    dtype: DType = 'float32',
    extra = 0,
  ) {
    super();
    const generator = new Generator(seed);
    const h = dims.hidden;
    this.fc1 = this.registerModule('fc1', new Linear(dims.in, h, { dtype, generator }));
    this.fc2 = this.registerModule('fc2', new Linear(h, h, { dtype, generator }));
    const layers = Array.from({ length: extra }, () => new Linear(h, h, { dtype, generator }));
    this.extra = this.registerModule('extra', new ModuleList(layers));
    this.fc3 = this.registerModule('fc3', new Linear(h, dims.out, { dtype, generator }));
  }
  forward(x: Tensor): Tensor {
    return tidy(() => {
      let h = this.fc2.forward(this.fc1.forward(x).silu()).silu();
      for (const l of this.extra) h = l.forward(h).silu();
      return this.fc3.forward(h);
    });
  }
}

export const DIMS = { in: 12, hidden: 48, out: 5 };

/** `steps` global batches of `rows` samples: x [rows, in], y [rows] class ids. */
export function makeData(steps: number, rows: number, seed: number): { x: Tensor; y: Tensor }[] {
  const g = new Generator(seed);
  return Array.from({ length: steps }, () => ({
    x: randn([rows, DIMS.in], { generator: g }),
    y: randint(0, DIMS.out, [rows], { generator: g }),
  }));
}

/** Rows [rank·n, (rank+1)·n) of a global batch (copies). */
export function shardOf(
  batch: { x: Tensor; y: Tensor },
  rank: number,
  size: number,
): { x: Tensor; y: Tensor } {
  const n = batch.x.shape[0] / size;
  return tidy(() => ({
    x: batch.x
      .narrow(0, rank * n, n)
      .contiguous()
      .clone(),
    y: batch.y
      .narrow(0, rank * n, n)
      .contiguous()
      .clone(),
  }));
}

export interface TrainHyper {
  lr: number;
  weightDecay: number;
  betas: [number, number];
  eps: number;
  clipGrad: number;
}

export const HYPER: TrainHyper = { lr: 1e-2, weightDecay: 0.1, betas: [0.9, 0.95], eps: 1e-8, clipGrad: 0.3 };

/** The reference: one process, the whole batch, torch-style AdamW with Megatron's no-decay groups and clipping. */
export function referenceRun(
  data: readonly { x: Tensor; y: Tensor }[],
  seed: number,
  hyper: TrainHyper,
  clipGradNorm: (params: Tensor[], max: number) => number,
  dims = DIMS,
  extra = 0,
): { losses: number[]; gradNorms: number[]; weights: Record<string, number[]> } {
  const model = new MLP(dims, seed, 'float32', extra);
  const named = model.namedParameters();
  const decay = named.filter(([n, p]) => !(p.ndim === 1 || n.endsWith('.bias'))).map(([, p]) => p);
  const noDecay = named.filter(([n, p]) => p.ndim === 1 || n.endsWith('.bias')).map(([, p]) => p);
  const opt = new AdamW(
    [
      { params: decay, weightDecay: hyper.weightDecay },
      { params: noDecay, weightDecay: 0 },
    ],
    { lr: hyper.lr, betas: hyper.betas, eps: hyper.eps },
  );
  const losses: number[] = [];
  const gradNorms: number[] = [];
  for (const { x, y } of data) {
    opt.zeroGrad();
    losses.push(
      tidy(() => {
        const l = crossEntropy(model.forward(x), y);
        l.backward();
        return l.item();
      }),
    );
    gradNorms.push(clipGradNorm(model.parameters(), hyper.clipGrad));
    opt.step();
  }
  const weights = weightsOf(model);
  opt.dispose();
  model.dispose();
  return { losses, gradNorms, weights };
}

/** Every parameter's values by name (as fp32 numbers). */
export function weightsOf(model: Module): Record<string, number[]> {
  return Object.fromEntries(
    model.namedParameters().map(([n, p]) => [n, Array.from(noGrad(() => p.toTypedArray()) as Float32Array)]),
  );
}

/**
 * ‖a − b‖ / ‖b‖ for each tensor, the worst over all of them. Norm-wise, because AdamW divides by
 * √v: an element whose gradient is near zero turns rounding noise in the gradient into a visible
 * difference of that one weight, while the tensor as a whole agrees to fp32 rounding.
 */
export function maxRelDiff(a: Record<string, number[]>, b: Record<string, number[]>): number {
  let worst = 0;
  for (const [name, ref] of Object.entries(b)) {
    const got = a[name];
    if (!got || got.length !== ref.length) return Number.POSITIVE_INFINITY;
    let diff = 0;
    let norm = 0;
    for (let i = 0; i < ref.length; i++) {
      diff += (got[i] - ref[i]) ** 2;
      norm += ref[i] ** 2;
    }
    worst = Math.max(worst, Math.sqrt(diff) / Math.max(Math.sqrt(norm), 1e-12));
  }
  return worst;
}

/** What the local group saw: each op with the element range of its (first) tensor in its storage. */
export interface LocalOp {
  op: string;
  offset: number;
  numel: number;
  reduce?: ReduceOp;
}

const done: Work = { wait: () => Promise.resolve(), waitSync: () => {}, isCompleted: () => true };

/** A data-parallel group of one process: every op completes at once (size 1 only). */
export class LocalGroup implements ProcessGroup {
  readonly backend = 'local';
  readonly name = 'local';
  readonly rank = 0;
  readonly size = 1;
  readonly ranks = [0];
  readonly timeoutMs = 1000;
  readonly ops: LocalOp[] = [];
  /** Called as each op is issued (tests look at the gradients at that moment). */
  onOp: ((op: LocalOp) => void) | null = null;

  private record(op: string, t: Tensor, reduce?: ReduceOp): Work {
    const o = { op, offset: t.offset, numel: t.numel, reduce };
    this.ops.push(o);
    this.onOp?.(o);
    return done;
  }
  allReduce(tensor: Tensor, op: ReduceOp = 'sum'): Work {
    return this.record('allReduce', tensor, op);
  }
  allGatherIntoTensor(output: Tensor, input: Tensor): Work {
    if (output.storage !== input.storage || output.offset !== input.offset) noGrad(() => output.copy_(input));
    return this.record('allGatherIntoTensor', output);
  }
  reduceScatterTensor(output: Tensor, input: Tensor, op: ReduceOp = 'sum'): Work {
    if (output.storage !== input.storage || output.offset !== input.offset) noGrad(() => output.copy_(input));
    return this.record('reduceScatterTensor', input, op);
  }
  broadcast(tensor: Tensor): Work {
    return this.record('broadcast', tensor);
  }
  barrier(): Work {
    return done;
  }
  destroy(): void {}
  allGather(): Work {
    throw new Error('LocalGroup: allGather is not used by these tests');
  }
  reduceScatter(): Work {
    throw new Error('LocalGroup: reduceScatter is not used by these tests');
  }
  send(): Work {
    throw new Error('LocalGroup: send is not used by these tests');
  }
  recv(): Work {
    throw new Error('LocalGroup: recv is not used by these tests');
  }
  allToAll(): Work {
    throw new Error('LocalGroup: allToAll is not used by these tests');
  }
}
