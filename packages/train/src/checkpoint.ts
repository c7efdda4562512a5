// Training checkpoints: the megapatch checkpoint of the model plus everything a resumed run needs to
// continue bit for bit — the fp32 master weights and AdamW moments stored per logical parameter with
// global shapes (so another layout can read them), the scheduler, the RNG state, the data position
// and consumed samples, the resolved config and the package versions. Written atomically (a
// temporary folder renamed into place, the `latest` tracker last), keeping the last `ckptKeep`.
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import * as path from 'node:path';
import {
  Checkpoint,
  CheckpointWriter,
  castElements,
  iterationDirName,
  LATEST_ITERATION_FILE,
  readLatestIteration,
  type SafetensorsDtype,
} from '@megapatch/convert';
import { type GPTModel, type ParameterSlice, parameterSlices } from '@megapatch/models';
import {
  type DataParallelOptimizer,
  type DistributedOptimizer,
  gatherShards,
  type ProcessGroup,
} from '@megapatch/parallel';
import {
  type AdamWState,
  empty,
  fromTypedArray,
  type GradScalerState,
  getRngState,
  noGrad,
  type OptimizerParamScheduler,
  type OptimizerParamSchedulerState,
  type OptimizerStateDict,
  type RngState,
  setRngState,
  Tensor,
  zeros,
} from '@megapatch/tensor';
import type { RunConfig } from './config.js';
import { TrainError } from './errors.js';

/** Where a run stands: what a checkpoint records besides tensors. */
export interface TrainingState {
  iteration: number;
  consumedSamples: number;
  skippedIterations: number;
  /**
   * Validation samples read so far (Megatron's consumed_valid_samples): each evaluation reads the
   * next training.evalIters global batches. Absent in checkpoints written before it was kept.
   */
  consumedValidSamples?: number;
}

type AnyOptimizer = DataParallelOptimizer | DistributedOptimizer;

const ST: Partial<Record<string, SafetensorsDtype>> = { float32: 'F32', bfloat16: 'BF16', float16: 'F16' };

/** The full logical tensor of a local parameter (gathered over its TP / expert-TP group). */
function gatherFull(model: GPTModel, s: ParameterSlice, local: Tensor): Tensor {
  const expert = /\.local_experts\./.test(s.local);
  const group: ProcessGroup = expert ? model.etpGroup : model.tpGroup;
  if (group.size === 1 || s.partition === 'replicate') return local;
  const input = local.contiguous();
  const parts = Array.from({ length: group.size }, () => empty(input.shape, { dtype: input.dtype }));
  group.allGather(parts, input).waitSync();
  input.dispose();
  const c = model.config;
  const full = gatherShards(parts, s.partition === 'vocab' ? 'split0' : s.partition, {
    qkvDims: { numHeads: c.numAttentionHeads, numQueryGroups: c.numQueryGroups, headDim: c.kvChannels },
  });
  for (const p of parts) p.dispose();
  return full;
}

/** This rank's piece of a parameter's optimizer state: where it starts, its master and moments. */
interface OptimizerPiece {
  offset: number;
  master: Tensor;
  state: AdamWState | null;
}

/**
 * The optimizer state of this rank by local parameter name: one piece per parameter (the whole
 * parameter without the distributed optimizer, this rank's shard of it with).
 */
function optimizerPieces(optimizer: AnyOptimizer): Map<string, OptimizerPiece> {
  const sd = optimizer.stateDict() as { optimizer: OptimizerStateDict | null };
  const stateOf = new Map<Tensor, AdamWState>();
  let index = 0;
  for (const g of optimizer.paramGroups) {
    for (const master of g.params) {
      const st = sd.optimizer?.state[String(index)] as AdamWState | undefined;
      if (st) stateOf.set(master, st);
      index++;
    }
  }
  const out = new Map<string, OptimizerPiece>();
  for (const p of optimizer.masterPieces) {
    out.set(p.name, { offset: p.offset, master: p.master, state: stateOf.get(p.master) ?? null });
  }
  return out;
}

function versions(): Record<string, string> {
  const require = createRequire(import.meta.url);
  const out: Record<string, string> = {};
  for (const p of [
    '@megapatch/train',
    '@megapatch/models',
    '@megapatch/parallel',
    '@megapatch/tensor',
    '@megapatch/convert',
    '@megapatch/data',
  ]) {
    try {
      out[p] = (require(`${p}/package.json`) as { version: string }).version;
    } catch {
      // a package without an exported package.json: its version is not recorded
    }
  }
  return out;
}

/** Options of {@link saveTrainingCheckpoint}. */
export interface SaveOptions {
  model: GPTModel;
  /**
   * The model chunks of this rank with the interleaved schedule (virtual pipeline stages; default
   * [model]); their parameters are named `chunks.<v>.…` in the optimizer.
   */
  chunks?: readonly GPTModel[];
  optimizer: AnyOptimizer;
  scheduler: OptimizerParamScheduler;
  architecture: string;
  state: TrainingState;
  config: RunConfig;
  /** HF folder whose config and tokenizer files travel with the checkpoint. */
  hfSource: string | null;
  keep: number | null;
  /**
   * Global rank, the data-parallel group, the expert-data-parallel group (expert shards) and the
   * pipeline group (stages send their tensors to the first one).
   */
  layout: { rank: number; dp: ProcessGroup; edp: ProcessGroup; pp: ProcessGroup };
}

type Piece = Parameters<CheckpointWriter['addPiece']>[1];

/** Sends a stage's pieces to pipeline rank 0: a length pair, a JSON header, then the bytes. */
function sendPieces(pp: ProcessGroup, pieces: { name: string; piece: Piece }[]): void {
  const header = Buffer.from(
    JSON.stringify(
      pieces.map(({ name, piece }) => ({
        name,
        dtype: piece.dtype,
        globalShape: piece.globalShape,
        offsets: piece.offsets,
        shape: piece.shape,
        bytes: piece.data.byteLength,
      })),
    ),
  );
  const data = Buffer.concat(pieces.map(({ piece }) => piece.data));
  const sizes = fromTypedArray(Float64Array.from([header.byteLength, data.byteLength]), [2]);
  pp.send(sizes, 0).waitSync();
  sizes.dispose();
  for (const b of [header, data]) {
    if (b.byteLength === 0) continue;
    const t = fromTypedArray(new Uint8Array(b.buffer, b.byteOffset, b.byteLength), [b.byteLength], {
      dtype: 'uint8',
    });
    pp.send(t, 0).waitSync();
    t.dispose();
  }
}

/** Receives the pieces pipeline rank `src` sent with {@link sendPieces}. */
function receivePieces(pp: ProcessGroup, src: number): { name: string; piece: Piece }[] {
  const sizes = zeros([2], { dtype: 'float64' });
  pp.recv(sizes, src).waitSync();
  const [headerBytes, dataBytes] = Array.from(sizes.toTypedArray() as Float64Array);
  sizes.dispose();
  const read = (n: number): Buffer => {
    if (n === 0) return Buffer.alloc(0);
    const t = zeros([n], { dtype: 'uint8' });
    pp.recv(t, src).waitSync();
    const out = Buffer.from(t.toBytes());
    t.dispose();
    return out;
  };
  const header = JSON.parse(read(headerBytes).toString('utf8')) as (Omit<Piece, 'data'> & {
    name: string;
    bytes: number;
  })[];
  const data = read(dataBytes);
  let at = 0;
  return header.map(({ name, bytes, ...rest }) => {
    const piece = { ...rest, data: data.subarray(at, at + bytes) } as Piece;
    at += bytes;
    return { name, piece };
  });
}

/**
 * Writes `<root>/iter_<N>`: every rank joins the gathers; global rank 0 writes. Returns the
 * iteration folder (on rank 0; null elsewhere).
 */
export function saveTrainingCheckpoint(root: string, o: SaveOptions): string | null {
  const { model, optimizer } = o;
  const sharded = o.config.parallel.useDistributedOptimizer;
  // Megatron --no-save-optim / --no-save-rng: leave the optimizer state (and LR schedule) or the RNG out
  const saveOptim = !o.config.checkpoint.noSaveOptim;
  const saveRng = !o.config.checkpoint.noSaveRng;
  const opt = optimizerPieces(optimizer);
  let step = 0;
  for (const v of opt.values()) if (v.state) step = Math.max(step, v.state.step);
  if (saveOptim && sharded && o.layout.dp.size > 1) {
    // a host number: through the host's collectives, not the device
    const t = fromTypedArray(Float64Array.from([step]), [1], { device: 'cpu' });
    o.layout.dp.allReduce(t, 'max').waitSync();
    step = (t.toTypedArray() as Float64Array)[0];
    t.dispose();
  }
  const writer =
    o.layout.rank === 0
      ? new CheckpointWriter(root, o.state.iteration, {
          layout: {
            tp: model.tpGroup.size,
            pp: o.layout.pp.size,
            ep: model.epGroup.size,
            etp: model.etpGroup.size,
            dp: o.layout.dp.size,
          },
          modelConfig: model.config as unknown as Record<string, unknown>,
          architecture: o.architecture,
          consumedSamples: o.state.consumedSamples,
          huggingface: { files: [] },
          ...(saveOptim
            ? {
                optimizer: {
                  kind: 'adamw',
                  step,
                  paramGroups: optimizer.paramGroups.map((g) => ({ lr: g.lr, weightDecay: g.weightDecay })),
                  // fp16: the loss scaler (scale, growth and hysteresis trackers)
                  gradScaler: optimizer.lossScaler?.stateDict() ?? null,
                },
                scheduler: o.scheduler.stateDict(),
              }
            : {}),
          ...(saveRng ? { rng: getRngState() } : {}),
          dataLoader: {
            consumedSamples: o.state.consumedSamples,
            consumedValidSamples: o.state.consumedValidSamples ?? 0,
          },
          training: { ...o.state, config: o.config, versions: versions() },
        })
      : null;
  try {
    const chunks = o.chunks ?? [model];
    const epSize = model.epGroup.size;
    const perRank = (model.config.moe?.numExperts ?? 0) / epSize;
    // Pipeline: the stages of global rank 0's pipeline send their (gathered) tensors to it
    const pp = o.layout.pp;
    const sender = pp.size > 1 && pp.rank > 0 && pp.ranks.includes(0);
    const collected: { name: string; piece: Parameters<CheckpointWriter['addPiece']>[1] }[] = [];
    noGrad(() => {
      for (const [v, chunk] of chunks.entries()) {
        const namePrefix = chunks.length > 1 ? `chunks.${v}.` : '';
        const tensors = new Map<string, Tensor>([...chunk.namedParameters(), ...chunk.namedBuffers()]);
        const shared = chunk.preProcess ? null : chunk.sharedEmbeddingWeight();
        for (const s of parameterSlices(chunk, o.architecture)) {
          const p = tensors.get(s.local) as Tensor;
          // the last stage's copy of tied embeddings: the first stage saves the table (and its state)
          if (p === shared) continue;
          const localExpert = /\.local_experts\.(\d+)\./.exec(s.local);
          const write = (name: string, full: Tensor, fixed?: SafetensorsDtype) => {
            if (!writer && !sender) return;
            const dtype = ST[full.dtype] as SafetensorsDtype;
            const c = full.contiguous();
            const bytes = c.toBytes();
            c.dispose();
            const to = fixed ?? dtype;
            const piece = {
              dtype: to,
              globalShape: [...full.shape],
              offsets: full.shape.map(() => 0),
              shape: [...full.shape],
              data: to === dtype ? bytes : castElements(bytes, dtype, to, name),
            };
            if (writer) writer.addPiece(name, piece);
            else collected.push({ name, piece });
          };
          const put = (name: string, t: Tensor, fixed?: SafetensorsDtype) => {
            const full = gatherFull(chunk, s, t);
            if (localExpert && epSize > 1) {
              // expert parallelism: local expert i of EP rank r is global expert r·perRank + i;
              // the EP group of global rank 0 holds every expert
              const c = full.contiguous();
              const parts = Array.from({ length: epSize }, () => empty(c.shape, { dtype: c.dtype }));
              model.epGroup.allGather(parts, c).waitSync();
              c.dispose();
              const i = Number(localExpert[1]);
              parts.forEach((part, r) => {
                write(name.replace(/(\.local_experts\.)\d+\./, `$1${r * perRank + i}.`), part, fixed);
                part.dispose();
              });
            } else write(name, full, fixed);
            if (full !== t) full.dispose();
          };
          put(s.name, p, s.name.endsWith('router.expert_bias') ? 'F32' : undefined);
          // buffers (the expert bias) have no optimizer state
          if (!p.requiresGrad || !saveOptim) continue;
          const piece = opt.get(namePrefix + s.local) ?? null;
          // The whole local parameter's state: this rank's piece in place, and with the distributed
          // optimizer the other data-parallel ranks' pieces summed in (each element lives on one rank).
          const whole = (pick: (q: OptimizerPiece) => Tensor | null): Tensor => {
            const flat = zeros([p.numel], { dtype: 'float32' });
            const src = piece ? pick(piece) : null;
            if (piece && src) {
              const dst = flat.narrow(0, piece.offset, src.numel);
              // an offloaded optimizer's state is on the host (--optimizer-cpu-offload)
              const here = src.device === dst.device ? src : src.to(dst.device);
              dst.copy_(here);
              if (here !== src) here.dispose();
              dst.dispose();
            }
            // the distributed optimizer shards expert buffers over expert-dp, the others over dp
            const shardGroup = localExpert ? o.layout.edp : o.layout.dp;
            if (sharded && shardGroup.size > 1) shardGroup.allReduce(flat, 'sum').waitSync();
            const shaped = flat.view(...p.shape);
            flat.dispose(); // the view holds the storage
            return shaped;
          };
          for (const [prefix, pick] of [
            ['optimizer.master', (q: OptimizerPiece) => q.master],
            ['optimizer.exp_avg', (q: OptimizerPiece) => q.state?.expAvg ?? null],
            ['optimizer.exp_avg_sq', (q: OptimizerPiece) => q.state?.expAvgSq ?? null],
          ] as const) {
            const t = whole(pick);
            put(`${prefix}.${s.name}`, t);
            t.dispose();
          }
        }
      }
    });
    if (pp.size > 1 && pp.ranks.includes(0)) {
      if (sender) sendPieces(pp, collected);
      else if (writer) {
        for (let r = 1; r < pp.size; r++) {
          for (const { name, piece } of receivePieces(pp, r)) writer.addPiece(name, piece);
        }
      }
    }
    if (!writer) return null;
    if (o.hfSource) {
      for (const f of fs.readdirSync(o.hfSource)) {
        if (/\.json$|tokeniz|\.model$|merges|vocab/.test(f) && !/safetensors|index/.test(f)) {
          writer.addFile(f, fs.readFileSync(path.join(o.hfSource, f)));
        }
      }
    }
    writer.finalize();
    if (o.keep) pruneCheckpoints(root, o.keep);
    return path.join(root, iterationDirName(o.state.iteration));
  } catch (e) {
    writer?.abort();
    throw e;
  }
}

/** Removes all but the newest `keep` complete iteration folders. */
function pruneCheckpoints(root: string, keep: number): void {
  const iters = fs
    .readdirSync(root)
    .map((f) => /^iter_(\d{7})$/.exec(f))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => Number(m[1]))
    .sort((a, b) => a - b);
  for (const it of iters.slice(0, Math.max(0, iters.length - keep))) {
    fs.rmSync(path.join(root, iterationDirName(it)), { recursive: true, force: true });
  }
}

/**
 * The newest complete checkpoint iteration under `root`: the one `latest_checkpointed_iteration.txt`
 * names when it opens, else the newest earlier one that does; folders a killed save left behind
 * (`iter_N.tmp-<pid>`) and iterations that do not open are skipped with a warning naming them.
 */
export function resolveCheckpointIteration(root: string, log: (line: string) => void): number {
  if (!fs.existsSync(root)) throw new TrainError('CHECKPOINT', `no checkpoint folder ${root}`);
  const entries = fs.readdirSync(root);
  for (const f of entries) {
    if (/^iter_\d{7}\.tmp-/.test(f))
      log(`warning: ignoring ${path.join(root, f)}: a save that did not finish`);
  }
  const iterations = entries
    .map((f) => /^iter_(\d{7})$/.exec(f))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => Number(m[1]))
    .sort((a, b) => b - a);
  let latest: number | null = null;
  try {
    latest = readLatestIteration(root);
  } catch (e) {
    log(
      `warning: ${path.join(root, LATEST_ITERATION_FILE)}: ${(e as Error).message}; using the newest complete checkpoint`,
    );
  }
  const order = latest === null ? iterations : [latest, ...iterations.filter((i) => i < latest)];
  for (const it of order) {
    try {
      Checkpoint.open(root, { iteration: it, verifyChecksums: false }).close();
      return it;
    } catch (e) {
      log(`warning: skipping checkpoint ${path.join(root, iterationDirName(it))}: ${(e as Error).message}`);
    }
  }
  throw new TrainError('CHECKPOINT', `${root} holds no complete checkpoint`);
}

/** Options of {@link loadTrainingCheckpoint}. */
export interface LoadOptions {
  model: GPTModel;
  /** The model chunks (virtual pipeline stages; default [model]), named `chunks.<v>.…` in the optimizer. */
  chunks?: readonly GPTModel[];
  optimizer: AnyOptimizer;
  scheduler: OptimizerParamScheduler;
  architecture: string;
  log: (line: string) => void;
  /** Restore the optimizer state and LR schedule (default true; Megatron --no-load-optim: false). */
  loadOptim?: boolean;
  /** Restore the random-number state (default true; Megatron --no-load-rng: false). */
  loadRng?: boolean;
}

/**
 * Restores the optimizer, scheduler, RNG and training position from the latest complete checkpoint
 * under `root` (the model's weights were loaded when it was built). A folder left incomplete by a
 * killed save is skipped with a warning naming what was wrong. As in Megatron, the LR schedule is
 * restored with the optimizer state (not with `loadOptim: false`, nor from a checkpoint saved
 * without it: both start fresh at step 0, at the checkpoint's iteration), and a checkpoint with no
 * training state (a converted model, Megatron's "release" checkpoint) starts at iteration 0.
 */
export function loadTrainingCheckpoint(root: string, o: LoadOptions & { iteration?: number }): TrainingState {
  let ckpt: Checkpoint;
  try {
    ckpt = Checkpoint.open(root, o.iteration === undefined ? {} : { iteration: o.iteration });
  } catch (e) {
    throw new TrainError('CHECKPOINT', `checkpoint.load ${root}: ${(e as Error).message}`);
  }
  try {
    const meta = ckpt.metadata;
    const training = meta.training as TrainingState | undefined;
    if (!training) {
      o.log(
        `loaded the weights of ${ckpt.dir}: it holds no training state (a converted model), so the run starts at iteration 0 with a new optimizer`,
      );
      return { iteration: 0, consumedSamples: 0, skippedIterations: 0 };
    }
    const at = `iteration ${training.iteration} (${training.consumedSamples} samples consumed)`;
    const loadRng = o.loadRng ?? true;
    if (loadRng && meta.rng) setRngState(meta.rng as RngState);
    if (!(o.loadOptim ?? true) || meta.optimizer === undefined) {
      o.log(
        `loaded checkpoint ${ckpt.dir} at ${at}${loadRng ? '' : ' without its RNG state'}; the optimizer state and LR schedule start fresh (${
          (o.loadOptim ?? true) ? 'the checkpoint was saved without them' : 'checkpoint.noLoadOptim'
        })`,
      );
      return {
        iteration: training.iteration,
        consumedSamples: training.consumedSamples,
        skippedIterations: training.skippedIterations,
        ...(training.consumedValidSamples !== undefined
          ? { consumedValidSamples: training.consumedValidSamples }
          : {}),
      };
    }
    // every chunk's slices and parameters under the names the optimizer knows them by
    const chunks = o.chunks ?? [o.model];
    const prefixOf = (v: number) => (chunks.length > 1 ? `chunks.${v}.` : '');
    const byLocal = new Map(
      chunks.flatMap((c, v) =>
        parameterSlices(c, o.architecture).map((s) => [prefixOf(v) + s.local, s] as const),
      ),
    );
    const readLocal = (name: string, s: ParameterSlice, like: Tensor): Tensor => {
      const info = ckpt.info(name);
      const parts = s.boxes.map((b) => ckpt.readSlice(name, b.offsets, b.shape));
      const bytes = parts.length === 1 ? parts[0] : Buffer.concat(parts);
      const f32 = castElements(bytes, info.dtype, 'F32', name);
      return fromTypedArray(
        new Float32Array(f32.buffer.slice(f32.byteOffset, f32.byteOffset + f32.byteLength)),
        like.shape,
      );
    };
    const params = new Map(
      chunks.flatMap((c, v) => c.namedParameters().map(([n, p]) => [prefixOf(v) + n, p] as const)),
    );
    const pieces = optimizerPieces(o.optimizer);
    const stepOf = (meta.optimizer as { step?: number | null } | undefined)?.step ?? 0;
    // this rank's piece of a stored per-parameter state, flattened
    const readPiece = (prefix: string, local: string, piece: OptimizerPiece): Tensor => {
      const s = byLocal.get(local);
      const p = params.get(local);
      if (!s || !p) throw new TrainError('CHECKPOINT', `no parameter ${local} for an optimizer state`);
      const read = readLocal(`${prefix}.${s.name}`, s, p);
      const full = read.view(-1);
      read.dispose();
      const narrow = full.narrow(0, piece.offset, piece.master.numel);
      full.dispose();
      const part = narrow.contiguous();
      narrow.dispose();
      return part;
    };
    const state: OptimizerStateDict['state'] = {};
    let index = 0;
    for (const g of o.optimizer.paramGroups) {
      for (const master of g.params) {
        const local = master.name ?? '';
        const piece = pieces.get(local);
        if (!piece) throw new TrainError('CHECKPOINT', `no optimizer piece for ${local}`);
        state[String(index)] = {
          step: stepOf,
          expAvg: readPiece('optimizer.exp_avg', local, piece),
          expAvgSq: readPiece('optimizer.exp_avg_sq', local, piece),
        } as never;
        index++;
      }
    }
    const masters = o.optimizer.masterPieces.map((mp) => {
      const piece = pieces.get(mp.name) as OptimizerPiece;
      return readPiece('optimizer.master', mp.name, piece);
    });
    const sd = o.optimizer.stateDict() as {
      dataParallelRank: number;
      dataParallelSize: number;
      optimizer: OptimizerStateDict | null;
    };
    try {
      o.optimizer.loadStateDict({
        dataParallelRank: sd.dataParallelRank,
        dataParallelSize: sd.dataParallelSize,
        optimizer: sd.optimizer ? { state, paramGroups: sd.optimizer.paramGroups } : null,
        masters,
      } as never);
    } finally {
      // loadStateDict copies: the pieces read here are ours to free (the moments too)
      for (const t of masters) t.dispose();
      for (const entry of Object.values(state))
        for (const v of Object.values(entry)) if (v instanceof Tensor) v.dispose();
    }
    const scalerState = (meta.optimizer as { gradScaler?: GradScalerState | null } | undefined)?.gradScaler;
    if (o.optimizer.lossScaler && scalerState) o.optimizer.lossScaler.loadStateDict(scalerState);
    o.scheduler.loadStateDict(meta.scheduler as OptimizerParamSchedulerState);
    o.log(`loaded checkpoint ${ckpt.dir} at ${at}${loadRng ? '' : ' without its RNG state'}`);
    return {
      iteration: training.iteration,
      consumedSamples: training.consumedSamples,
      skippedIterations: training.skippedIterations,
      ...(training.consumedValidSamples !== undefined
        ? { consumedValidSamples: training.consumedValidSamples }
        : {}),
    };
  } finally {
    ckpt.close();
  }
}

export { LATEST_ITERATION_FILE, readLatestIteration };
