// Megatron-Core's distributed checkpoint format (`--ckpt-format torch_dist`, the default since
// Megatron-Core 0.7): `iter_NNNNNNN/` holds metadata.json (the backend), common.pt (a torch.save of
// args, iteration and the other unsharded state) and a PyTorch distributed checkpoint (.metadata
// and *.distcp) of the sharded state. Each model tensor is stored whole, independent of the
// parallel layout it was saved from: tensor-parallel shards are put together, [gate; up] of a
// gated MLP is stored gate-then-up over all ranks, and the decoder layers and experts become
// leading axes of one tensor per name (`decoder.layers.self_attention.linear_qkv.weight` of shape
// [num_layers, …], `decoder.layers.mlp.experts.experts.linear_fc1.weight` of shape [num_layers,
// num_experts, …]); models with mixed layers (MoE every k layers, dense first layers) keep one key
// per layer (`decoder.layers.<i>.…`), and with `singleton_local_shards` one per expert
// (`….experts.experts.<j>.…`, the gated fc1 as `_w` and `_v`). MTP layers are always keyed by
// their index. The importer reads such a folder as the global tensors of a megapatch checkpoint.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ConvertError } from '../errors.js';
import { numelOf } from '../safetensors/dtype.js';
import { parseHfConfig } from '../specs/registry.js';
import { DCP_METADATA_FILE, DcpCheckpoint } from '../torch/dcp.js';
import { TorchFile } from '../torch/torch-file.js';
import type { TransformerConfig } from '../transformer-config.js';
import type { TensorSource } from './convert.js';
import {
  argsOf,
  LOCAL_NORMS,
  MegatronPlanView,
  megatronIterationDir,
  megatronModelOfArgs,
  num,
} from './megatron-common.js';
import { type ConversionPlan, type ParallelLayout, planConversion } from './plan.js';

/** Megatron's backend description in a distributed checkpoint folder. */
export const MEGATRON_DIST_METADATA_FILE = 'metadata.json';
/** The torch.save file of a distributed checkpoint's unsharded state (args, iteration, …). */
export const MEGATRON_COMMON_FILE = 'common.pt';

/** Where a megapatch tensor is in the distributed checkpoint. */
interface DistSource {
  /** The key (or the `_w` and `_v` keys of a gated fc1 stored in halves). */
  readonly keys: readonly string[];
  /** Indices of the leading layer / expert axes. */
  readonly index: readonly number[];
}

/** A megapatch tensor name spelled with the local spec's norm modules. */
function localSpelling(rest: string): string {
  for (const [te, local] of LOCAL_NORMS) {
    if (rest === te || rest.endsWith(`.${te}`)) return rest.slice(0, rest.length - te.length) + local;
  }
  return rest;
}

/**
 * Where the megapatch tensor `name` (Megatron-Core name, global layer and expert indices) may be
 * stored, most likely first: stacked over layers (and experts), keyed per layer, keyed per expert.
 */
function candidates(name: string): DistSource[] {
  const layer = /^(decoder|mtp)\.layers\.(\d+)\.(.*)$/.exec(name);
  if (!layer) return [{ keys: [name], index: [] }];
  const [, block, gText, restTe] = layer;
  const g = Number(gText);
  const out: DistSource[] = [];
  for (const rest of new Set([restTe, localSpelling(restTe)])) {
    const expert = /^(.*\bexperts\.)local_experts\.(\d+)\.(.+)$/.exec(rest);
    const forms: DistSource[] = [];
    if (expert) {
      const [, pre, jText, tail] = expert;
      const j = Number(jText);
      if (block === 'decoder') forms.push({ keys: [`decoder.layers.${pre}experts.${tail}`], index: [g, j] });
      forms.push({ keys: [`${block}.layers.${g}.${pre}experts.${tail}`], index: [j] });
      forms.push({ keys: [`${block}.layers.${g}.${pre}experts.${j}.${tail}`], index: [] });
    } else {
      if (block === 'decoder') forms.push({ keys: [`decoder.layers.${rest}`], index: [g] });
      forms.push({ keys: [`${block}.layers.${g}.${rest}`], index: [] });
    }
    for (const f of forms) {
      out.push(f);
      // a gated fc1 saved with singleton_local_shards: its gate and up halves under two keys
      if (/\.linear_fc1\.(weight|bias)$/.test(f.keys[0])) {
        out.push({ keys: [`${f.keys[0]}_w`, `${f.keys[0]}_v`], index: f.index });
      }
    }
  }
  return out;
}

/** Reads metadata.json and checks that the folder is a torch_dist checkpoint megapatch reads. */
function checkBackend(dir: string): void {
  const file = path.join(dir, MEGATRON_DIST_METADATA_FILE);
  if (!fs.existsSync(file)) return; // a bare PyTorch distributed checkpoint
  let j: unknown;
  try {
    j = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    throw new ConvertError('CORRUPT_FILE', `is not JSON (${(e as Error).message})`, file);
  }
  const backend = j && typeof j === 'object' ? (j as Record<string, unknown>).sharded_backend : undefined;
  if (backend !== 'torch_dist') {
    throw new ConvertError(
      'UNSUPPORTED',
      `the sharded backend is ${JSON.stringify(backend)}; megapatch reads torch_dist and torch: convert it with Megatron (--ckpt-convert-format torch_dist)`,
      file,
    );
  }
}

/**
 * A Megatron-Core torch_dist checkpoint, read as the global tensors of a megapatch checkpoint of
 * the same model ({@link TensorSource}): each slice is cut from the stored chunks it overlaps.
 */
export class MegatronDistView extends MegatronPlanView {
  /** Training iteration recorded in common.pt. */
  readonly iteration: number;
  /** The `args` Megatron saved (attribute name → value). */
  readonly args: Map<string, unknown>;
  /** The parallel layout the model was trained with (from the args). */
  readonly layout: ParallelLayout;
  readonly plan: ConversionPlan;
  /** The folder read (`iter_NNNNNNN` or `release`). */
  readonly dir: string;
  private readonly dcp: DcpCheckpoint;
  private readonly sources = new Map<string, DistSource>();

  private constructor(dir: string, cfg: TransformerConfig, hfConfig: string) {
    super();
    this.dir = dir;
    checkBackend(dir);
    const commonFile = path.join(dir, MEGATRON_COMMON_FILE);
    if (!fs.existsSync(commonFile)) {
      throw new ConvertError(
        'MISSING_FILE',
        `no ${MEGATRON_COMMON_FILE} (Megatron's args and iteration): not a Megatron torch_dist checkpoint`,
        dir,
      );
    }
    let root: unknown;
    {
      using common = TorchFile.open(commonFile);
      root = common.root;
    }
    if (!(root instanceof Map)) {
      throw new ConvertError(
        'INVALID_FORMAT',
        'does not hold a dict: not a Megatron checkpoint file',
        commonFile,
      );
    }
    this.args = argsOf(root);
    this.iteration = num(root.get('iteration')) ?? 0;
    const { layout, model } = megatronModelOfArgs(this.args, cfg, hfConfig, commonFile);
    this.layout = layout;
    // Stored tensors are whole; only the vocabulary padding depends on the layout (its TP size).
    this.plan = planConversion(parseHfConfig(hfConfig).spec, model, { tp: layout.tp, etp: layout.etp });
    this.dcp = DcpCheckpoint.open(dir);
    try {
      this.resolve();
    } catch (e) {
      this.close();
      throw e;
    }
  }

  /**
   * Opens `dir` (a checkpoint root with `latest_checkpointed_iteration.txt`, or an `iter_*`
   * folder) for the model of the Hugging Face config `hfConfig` (config.json or its folder).
   */
  static open(dir: string, hfConfig: string, opts: { iteration?: number } = {}): MegatronDistView {
    const iterDir = megatronIterationDir(dir, opts.iteration);
    if (!fs.existsSync(path.join(iterDir, DCP_METADATA_FILE))) {
      throw new ConvertError(
        'MISSING_FILE',
        `no ${DCP_METADATA_FILE}: not a Megatron torch_dist checkpoint`,
        iterDir,
      );
    }
    return new MegatronDistView(iterDir, parseHfConfig(hfConfig).transformerConfig, hfConfig);
  }

  /** Finds each planned tensor's key, checks its size and dtype, and that no model tensor is left over. */
  private resolve(): void {
    const metaFile = path.join(this.dir, DCP_METADATA_FILE);
    const uses = new Map<string, { lead: number; n: number }>(); // key → its leading axes, tensors read from it
    for (const t of this.plan.tensors) {
      const all = candidates(t.name);
      const src = all.find((c) => c.keys.every((k) => this.dcp.tensors.has(k)));
      if (!src) {
        throw new ConvertError(
          'MISSING_TENSOR',
          `no ${all[0].keys[0]}${all[0].index.length > 0 ? `[${all[0].index.join(', ')}]` : ''} (megapatch ${t.name})`,
          metaFile,
        );
      }
      const halves = src.keys.length;
      const want = [...t.globalShape];
      if (halves > 1) want[0] /= halves;
      for (const k of src.keys) {
        const stored = this.dcp.tensors.get(k)!;
        const inner = stored.size.slice(src.index.length);
        if (
          stored.size.length !== src.index.length + want.length ||
          inner.join(',') !== want.join(',') ||
          src.index.some((i, d) => i >= stored.size[d])
        ) {
          throw new ConvertError(
            'SHAPE_MISMATCH',
            `${k} has size [${stored.size.join(',')}], the model implies [${src.index.length > 0 ? '…, ' : ''}${want.join(',')}] (megapatch ${t.name})`,
            metaFile,
          );
        }
        const d = this.dtypes.get(t.name);
        if (d && d !== stored.dtype) {
          throw new ConvertError('INVALID_FORMAT', `${src.keys.join(' and ')} differ in dtype`, metaFile);
        }
        this.dtypes.set(t.name, stored.dtype);
        const u = uses.get(k) ?? { lead: src.index.length, n: 0 };
        u.n++;
        uses.set(k, u);
      }
      this.sources.set(t.name, src);
    }
    const extra = [...this.dcp.tensors.keys()].filter((k) => !uses.has(k) && !k.startsWith('optimizer.'));
    if (extra.length > 0) {
      throw this.notPartOfModel(extra, metaFile);
    }
    // a stacked key is read at every layer / expert index it holds
    for (const [k, u] of uses) {
      const stored = this.dcp.tensors.get(k)!;
      const lead = numelOf(stored.size.slice(0, u.lead));
      if (u.n !== lead) {
        throw new ConvertError(
          'SHAPE_MISMATCH',
          `${k} has size [${stored.size.join(',')}]: ${lead} layers or experts stored, the model reads ${u.n}`,
          metaFile,
        );
      }
    }
  }

  /** The box [offsets, offsets + shape) of a global tensor, row-major bytes, from the stored chunks. */
  readSlice(name: string, offsets: readonly number[], shape: readonly number[]): Uint8Array {
    const t = this.tensor(name);
    const src = this.sources.get(name)!;
    const lead = src.index.map(() => 1);
    const box = (key: string, o: readonly number[], s: readonly number[]) =>
      this.dcp.readBox(key, [...src.index, ...o], [...lead, ...s]);
    if (src.keys.length === 1) return box(src.keys[0], offsets, shape);
    // gate rows [0, half) from `_w`, up rows [half, 2 half) from `_v`
    const half = t.globalShape[0] / 2;
    const r0 = offsets[0];
    const r1 = offsets[0] + shape[0];
    const parts: Uint8Array[] = [];
    if (r0 < half)
      parts.push(box(src.keys[0], [r0, ...offsets.slice(1)], [Math.min(r1, half) - r0, ...shape.slice(1)]));
    if (r1 > half) {
      const a = Math.max(r0, half);
      parts.push(box(src.keys[1], [a - half, ...offsets.slice(1)], [r1 - a, ...shape.slice(1)]));
    }
    if (parts.length === 1) return parts[0];
    const out = new Uint8Array(parts[0].byteLength + parts[1].byteLength);
    out.set(parts[0]);
    out.set(parts[1], parts[0].byteLength);
    return out;
  }

  close(): void {
    this.dcp?.close();
  }
}
