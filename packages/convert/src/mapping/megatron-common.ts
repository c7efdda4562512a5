// What the readers of both Megatron-LM checkpoint formats share: the saved args (the layout and the
// model's sizes, checked against config.json), the iteration folder, the local spec's norm names,
// and a TensorSource over the model's conversion plan.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { iterationDirName } from '../checkpoint/metadata.js';
import { ConvertError } from '../errors.js';
import type { SafetensorsDtype } from '../safetensors/dtype.js';
import { PyObject } from '../torch/pickle.js';
import { makeTransformerConfig, paddedVocabSize, type TransformerConfig } from '../transformer-config.js';
import type { TensorSource, TensorSourceInfo } from './convert.js';
import { type ConversionPlan, type MegatronTensorPlan, type ParallelLayout, resolveLayout } from './plan.js';

/** Megatron's tracker file at the root of a checkpoint folder. */
export const MEGATRON_TRACKER_FILE = 'latest_checkpointed_iteration.txt';

/** Transformer Engine's fused norm names and the local spec's separate modules. */
export const LOCAL_NORMS: readonly [string, string][] = [
  ['self_attention.linear_qkv.layer_norm_weight', 'input_layernorm.weight'],
  ['mlp.linear_fc1.layer_norm_weight', 'pre_mlp_layernorm.weight'],
  ['self_attention.linear_q_up_proj.layer_norm_weight', 'self_attention.q_layernorm.weight'],
  ['self_attention.linear_kv_up_proj.layer_norm_weight', 'self_attention.kv_layernorm.weight'],
];

export function num(v: unknown): number | undefined {
  return typeof v === 'number' ? v : typeof v === 'bigint' ? Number(v) : undefined;
}

/** The attributes of the pickled `argparse.Namespace` (empty when the file has none). */
export function argsOf(root: Map<unknown, unknown>): Map<string, unknown> {
  const a = root.get('args');
  if (a instanceof PyObject && a.state instanceof Map) return a.state as Map<string, unknown>;
  return new Map();
}

/**
 * The parallel layout Megatron's saved `args` record (virtual stages counted from `modelChunks`
 * when the args lack them) and the model of the HF config `cfg` with the args' vocabulary
 * rounding, checked against the args' sizes.
 */
export function megatronModelOfArgs(
  args: Map<string, unknown>,
  cfg: TransformerConfig,
  hfConfig: string,
  file: string,
  modelChunks = 0,
): { layout: ParallelLayout; model: TransformerConfig } {
  const a = (k: string) => num(args.get(k));
  const vpp = a('virtual_pipeline_model_parallel_size') ?? (modelChunks > 0 ? modelChunks : 1);
  const layout = resolveLayout({
    tp: a('tensor_model_parallel_size') ?? 1,
    pp: a('pipeline_model_parallel_size') ?? 1,
    ep: a('expert_model_parallel_size') ?? 1,
    ...(a('expert_tensor_parallel_size') !== undefined ? { etp: a('expert_tensor_parallel_size') } : {}),
    ...(vpp > 1 ? { vpp } : {}),
    ...(a('decoder_first_pipeline_num_layers') !== undefined
      ? { decoderFirstPipelineNumLayers: a('decoder_first_pipeline_num_layers') }
      : {}),
    ...(a('decoder_last_pipeline_num_layers') !== undefined
      ? { decoderLastPipelineNumLayers: a('decoder_last_pipeline_num_layers') }
      : {}),
    ...(typeof args.get('pipeline_model_parallel_layout') === 'string'
      ? { pipelineModelParallelLayout: args.get('pipeline_model_parallel_layout') as string }
      : {}),
  });
  // the model as the HF config describes it, with Megatron's vocabulary padding
  const divisible = a('make_vocab_size_divisible_by');
  const model =
    divisible === undefined ? cfg : makeTransformerConfig({ ...cfg, makeVocabSizeDivisibleBy: divisible });
  for (const [k, v] of [
    ['num_layers', model.numLayers],
    ['hidden_size', model.hiddenSize],
    ['num_attention_heads', model.numAttentionHeads],
    ['padded_vocab_size', paddedVocabSize(model.vocabSize, model.makeVocabSizeDivisibleBy, layout.tp)],
  ] as const) {
    if (a(k) !== undefined && a(k) !== v) {
      throw new ConvertError(
        'SHAPE_MISMATCH',
        `args.${k} is ${a(k)}, ${hfConfig} implies ${v}: the checkpoint is not of this model`,
        file,
      );
    }
  }
  // the share of each head RoPE rotated in training (shapes agree either way); MLA rotates its own
  const rotary = a('rotary_percent');
  if (rotary !== undefined && model.mla === null && rotary !== model.rotaryPercent) {
    throw new ConvertError(
      'INVALID_CONFIG',
      `args.rotary_percent is ${rotary}, ${hfConfig} implies ${model.rotaryPercent} (partial_rotary_factor): the checkpoint was trained rotating another share of each head than the model rotates`,
      file,
    );
  }
  return { layout, model };
}

/** Resolves a Megatron checkpoint path (root with the tracker file, or an `iter_*` / `release` folder). */
export function megatronIterationDir(dir: string, iteration: number | undefined): string {
  if (!fs.existsSync(dir)) throw new ConvertError('MISSING_FILE', 'no such Megatron checkpoint folder', dir);
  if (/^(iter_\d{7}|release)$/.test(path.basename(dir))) return dir;
  if (iteration !== undefined) return path.join(dir, iterationDirName(iteration));
  const tracker = path.join(dir, MEGATRON_TRACKER_FILE);
  if (!fs.existsSync(tracker)) {
    throw new ConvertError(
      'MISSING_FILE',
      `no ${MEGATRON_TRACKER_FILE}: pass a Megatron checkpoint root, an iter_NNNNNNN folder, or the iteration`,
      dir,
    );
  }
  const text = fs.readFileSync(tracker, 'utf8').trim();
  if (text === 'release') return path.join(dir, 'release');
  if (!/^\d+$/.test(text)) {
    throw new ConvertError(
      'INVALID_FORMAT',
      `holds "${text.slice(0, 40)}", not an iteration or "release"`,
      tracker,
    );
  }
  return path.join(dir, iterationDirName(Number(text)));
}

/**
 * What both Megatron views share: the model's conversion plan (the megapatch tensors, Megatron-Core
 * names with global indices) and the dtype each tensor is stored in.
 */
export abstract class MegatronPlanView implements TensorSource {
  abstract readonly plan: ConversionPlan;
  /** The parallel layout the model was trained with. */
  abstract readonly layout: ParallelLayout;
  /** Training iteration recorded in the checkpoint. */
  abstract readonly iteration: number;
  /** The `args` Megatron saved (attribute name → value). */
  abstract readonly args: Map<string, unknown>;
  /** The folder read (`iter_NNNNNNN` or `release`). */
  abstract readonly dir: string;
  protected readonly dtypes = new Map<string, SafetensorsDtype>();
  private byName?: Map<string, MegatronTensorPlan>;

  tensorNames(): string[] {
    return this.plan.tensors.map((t) => t.name);
  }

  info(name: string): TensorSourceInfo {
    const t = this.tensor(name);
    return { dtype: this.dtypes.get(name) as SafetensorsDtype, globalShape: t.globalShape };
  }

  protected tensor(name: string): MegatronTensorPlan {
    this.byName ??= new Map(this.plan.tensors.map((t) => [t.name, t]));
    const t = this.byName.get(name);
    if (!t) throw new ConvertError('MISSING_TENSOR', `no tensor ${name} in this model`, this.dir);
    return t;
  }

  /** The error for stored tensors the model does not have. */
  protected notPartOfModel(extra: readonly string[], file: string): ConvertError {
    return new ConvertError(
      'UNEXPECTED_TENSOR',
      `${extra.slice(0, 3).join(', ')}${extra.length > 3 ? ` and ${extra.length - 3} more` : ''} are not part of ${this.plan.spec.architectures[0]} as config.json describes it`,
      file,
    );
  }

  abstract readSlice(name: string, offsets: readonly number[], shape: readonly number[]): Uint8Array;
  abstract close(): void;
}
