// Loading and saving GPTModel weights. A source is a megapatch checkpoint saved in any layout or a
// Hugging Face folder read through the converter's plan; either way each rank reads only the
// slices of the logical Megatron tensors that its parameters hold.
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  Checkpoint,
  CheckpointWriter,
  type ConversionPlan,
  castElements,
  DTYPE_SIZE,
  getArchitectureSpec,
  HF_FILES_DIR,
  HfMegatronView,
  LATEST_ITERATION_FILE,
  makeTransformerConfig,
  megatronCheckpointDir,
  megatronCheckpointError,
  openMegatronCheckpoint,
  type Partition,
  planConversion,
  type SafetensorsDtype,
  type TensorSource,
  type TransformerConfig,
} from '@megapatch/convert';
import { type DType, fromTypedArray, noGrad, type Tensor } from '@megapatch/tensor';
import { ModelError } from './errors.js';
import { GPTModel, type GPTModelOptions } from './gpt-model.js';

const ST_DTYPE: Partial<Record<DType, SafetensorsDtype>> = {
  float32: 'F32',
  bfloat16: 'BF16',
  float16: 'F16',
  float64: 'F64',
};

/** Where one local parameter comes from: a box (or two, for [gate; up]) of a logical tensor. */
export interface ParameterSlice {
  /** Name in the module tree (the stage's local layer indices, local expert indices). */
  local: string;
  /** Logical tensor name in checkpoints (global layer and expert indices). */
  name: string;
  partition: Partition;
  /** Row/column boxes to read, concatenated along dim 0 in order. */
  boxes: { offsets: number[]; shape: number[] }[];
  /** Rows of the parameter beyond the stored tensor (vocabulary padding), left zero. */
  globalShape: number[];
}

/** The opened weights of a model: a source of logical tensors with its config and architecture. */
export interface OpenedWeights {
  source: TensorSource;
  config: TransformerConfig;
  architecture: string;
  kind: 'hf' | 'megapatch' | 'megatron';
  /** Folder with the tokenizer files (the HF folder, or the checkpoint's `huggingface/`). */
  tokenizerDir: string | null;
}

/** Whether a folder holds tokenizer files. */
function hasTokenizer(dir: string): boolean {
  return ['tokenizer.json', 'tokenizer.model', 'tokenizer_config.json'].some((f) =>
    fs.existsSync(path.join(dir, f)),
  );
}

/** Whether `dir` is a megapatch checkpoint root (or iteration directory). */
function isMegapatchCheckpoint(dir: string): boolean {
  return (
    fs.existsSync(path.join(dir, LATEST_ITERATION_FILE)) || fs.existsSync(path.join(dir, 'metadata.json'))
  );
}

/** A Megatron checkpoint error, with the other route: reading it in place with its HF config. */
function withHfConfigHint(message: string): string {
  return `${message}, or read it as it is with the HF config (hfConfig; --hf-dir on the command line)`;
}

/**
 * Opens an HF folder, a megapatch checkpoint, or (with `hfConfig`, the HF config.json or folder that
 * describes the model) a Megatron-LM checkpoint in the torch or torch_dist format, as logical
 * Megatron tensors.
 */
export function openWeights(
  dir: string,
  opts: { iteration?: number; verifyChecksums?: boolean; hfConfig?: string } = {},
): OpenedWeights {
  if (!fs.existsSync(dir)) throw new ModelError('INVALID_ARGUMENT', `no such model directory: ${dir}`);
  if (opts.hfConfig !== undefined) {
    if (megatronCheckpointDir(dir, opts.iteration) === null) {
      throw new ModelError(
        'INVALID_ARGUMENT',
        `${dir} is not a Megatron-LM checkpoint (torch or torch_dist format); hfConfig is only for those`,
      );
    }
    const view = openMegatronCheckpoint(dir, opts.hfConfig, {
      ...(opts.iteration !== undefined ? { iteration: opts.iteration } : {}),
    });
    const hfDir = fs.statSync(opts.hfConfig).isDirectory() ? opts.hfConfig : path.dirname(opts.hfConfig);
    return {
      source: view,
      config: view.plan.config,
      architecture: view.plan.spec.architectures[0],
      kind: 'megatron',
      tokenizerDir: hasTokenizer(hfDir) ? hfDir : null,
    };
  }
  if (isMegapatchCheckpoint(dir)) {
    const iterDir = fs.existsSync(path.join(dir, 'metadata.json'));
    const root = iterDir ? path.dirname(dir) : dir;
    const iteration = iterDir
      ? Number(/iter_(\d+)$/.exec(path.basename(dir))?.[1] ?? Number.NaN)
      : opts.iteration;
    let ckpt: Checkpoint;
    try {
      ckpt = Checkpoint.open(root, {
        ...(iteration === undefined || Number.isNaN(iteration) ? {} : { iteration }),
        verifyChecksums: opts.verifyChecksums ?? true,
      });
    } catch (e) {
      // a Megatron-LM checkpoint has the same tracker file: say it can be read with its HF config
      if (megatronCheckpointDir(dir, opts.iteration) !== null) {
        throw new ModelError('INVALID_ARGUMENT', withHfConfigHint((e as Error).message));
      }
      throw e;
    }
    const architecture = ckpt.metadata.architecture;
    if (!architecture) {
      ckpt.close();
      throw new ModelError(
        'INVALID_INPUT',
        `${dir}: metadata.json names no architecture, so the model cannot be built`,
      );
    }
    const config = makeTransformerConfig(ckpt.metadata.modelConfig as never, 'metadata.json');
    const hf = path.join(ckpt.dir, HF_FILES_DIR);
    return {
      source: ckpt,
      config,
      architecture,
      kind: 'megapatch',
      tokenizerDir: fs.existsSync(hf) ? hf : null,
    };
  }
  if (!fs.existsSync(path.join(dir, 'config.json'))) {
    const megatron = megatronCheckpointError(dir);
    if (megatron) throw new ModelError('INVALID_ARGUMENT', withHfConfigHint(megatron.message));
    throw new ModelError(
      'INVALID_ARGUMENT',
      `${dir} is neither a Hugging Face folder (no config.json) nor a megapatch checkpoint (no ${LATEST_ITERATION_FILE})`,
    );
  }
  const view = HfMegatronView.open(dir);
  return {
    source: view,
    config: view.config,
    architecture: view.architecture,
    kind: 'hf',
    tokenizerDir: dir,
  };
}

/** Partition of every logical tensor, from the architecture's conversion plan at layout 1. */
function partitions(
  architecture: string,
  config: TransformerConfig,
): Map<string, ConversionPlan['tensors'][number]> {
  const plan = planConversion(getArchitectureSpec(architecture), config, {});
  return new Map(plan.tensors.map((t) => [t.name, t]));
}

/**
 * Logical (checkpoint) name of a local parameter: the pipeline stage's local decoder / MTP layer
 * index -> global, local expert index -> global.
 */
export function logicalName(model: GPTModel, local: string): string {
  let name = local;
  const layer = /^(decoder|mtp)\.layers\.(\d+)(\..*)$/.exec(name);
  if (layer) {
    const globals = layer[1] === 'decoder' ? model.stage.layers : model.stage.mtpLayers;
    name = `${layer[1]}.layers.${globals[Number(layer[2])]}${layer[3]}`;
  }
  const m = /^(.*\.local_experts\.)(\d+)(\..*)$/.exec(name);
  if (!m) return name;
  const perRank = (model.config.moe?.numExperts ?? 0) / model.epGroup.size;
  return `${m[1]}${model.epGroup.rank * perRank + Number(m[2])}${m[3]}`;
}

/** The boxes of the logical tensor that parameter `p` of this rank holds. */
export function parameterSlices(model: GPTModel, architecture: string): ParameterSlice[] {
  const plans = partitions(architecture, model.config);
  const out: ParameterSlice[] = [];
  for (const [local, p] of model.namedParameters()) out.push(sliceOf(model, plans, local, p.shape));
  for (const [local, b] of model.namedBuffers()) out.push(sliceOf(model, plans, local, b.shape));
  return out;
}

function sliceOf(
  model: GPTModel,
  plans: Map<string, ConversionPlan['tensors'][number]>,
  local: string,
  shape: readonly number[],
): ParameterSlice {
  const name = logicalName(model, local);
  const plan = plans.get(name);
  if (!plan) {
    throw new ModelError(
      'MISSING_TENSOR',
      `parameter ${local} has no tensor ${name} in the architecture's plan`,
    );
  }
  const expert = plan.expert !== undefined;
  const group = expert ? model.etpGroup : model.tpGroup;
  const r = group.rank;
  const n = group.size;
  const g = [...plan.globalShape];
  const full = (o0: number, rows: number) => ({
    offsets: [o0, ...g.slice(1).map(() => 0)],
    shape: [rows, ...g.slice(1)],
  });
  let boxes: ParameterSlice['boxes'];
  switch (plan.partition) {
    case 'replicate':
      boxes = [{ offsets: g.map(() => 0), shape: g }];
      break;
    case 'split0':
    case 'qkv':
      // QKV rows are grouped per query group, so a rank's groups are one contiguous run.
      boxes = [full((r * g[0]) / n, g[0] / n)];
      break;
    case 'split1':
      boxes = [{ offsets: [0, (r * g[1]) / n], shape: [g[0], g[1] / n] }];
      break;
    case 'gate_up': {
      const f = g[0] / 2;
      boxes = [full((r * f) / n, f / n), full(f + (r * f) / n, f / n)];
      break;
    }
    case 'vocab': {
      // The model pads to its own multiple; rows past the stored ones (padding) stay zero.
      const rows = shape[0];
      boxes = [full(r * rows, rows)];
      break;
    }
  }
  return { local, name, partition: plan.partition, boxes, globalShape: g };
}

/** Bytes of a box clipped to the stored rows (zeros beyond them), in the stored dtype. */
function readBox(src: TensorSource, name: string, box: { offsets: number[]; shape: number[] }): Uint8Array {
  const info = src.info(name);
  const stored = info.globalShape;
  const rowElems = box.shape.slice(1).reduce((a, b) => a * b, 1);
  const have = Math.max(0, Math.min(box.shape[0], stored[0] - box.offsets[0]));
  if (have === box.shape[0]) return src.readSlice(name, box.offsets, box.shape);
  const sizeOf = DTYPE_SIZE[info.dtype];
  const out = new Uint8Array(box.shape[0] * rowElems * sizeOf);
  if (have > 0) out.set(src.readSlice(name, box.offsets, [have, ...box.shape.slice(1)]));
  return out;
}

/**
 * Copies the weights of `weights` into `model` (each parameter's own slice), casting to the
 * parameter's dtype. The source must describe the same architecture and config.
 */
export function loadWeights(model: GPTModel, weights: OpenedWeights): void {
  checkSameModel(model.config, weights.config, weights.architecture);
  const slices = parameterSlices(model, weights.architecture);
  const tensors = new Map<string, Tensor>([...model.namedParameters(), ...model.namedBuffers()]);
  const have = new Set(weights.source.tensorNames());
  for (const s of slices) {
    if (!have.has(s.name)) {
      throw new ModelError('MISSING_TENSOR', `the weights have no tensor ${s.name} (parameter ${s.local})`);
    }
    const info = weights.source.info(s.name);
    const p = tensors.get(s.local) as Tensor;
    const want = ST_DTYPE[p.dtype];
    if (!want) throw new ModelError('UNSUPPORTED', `parameter ${s.local} has dtype ${p.dtype}`);
    if (s.partition !== 'vocab' && info.globalShape.join(',') !== s.globalShape.join(',')) {
      throw new ModelError(
        'SHAPE_MISMATCH',
        `tensor ${s.name} has shape [${info.globalShape}], the model expects [${s.globalShape}]`,
      );
    }
    const parts = s.boxes.map((b) => readBox(weights.source, s.name, b));
    const bytes = parts.length === 1 ? parts[0] : concatBytes(parts);
    const cast = castElements(bytes, info.dtype, want, s.name);
    const t =
      want === 'BF16' || want === 'F16'
        ? fromTypedArray(new Uint16Array(cast.buffer, cast.byteOffset, cast.byteLength / 2), p.shape, {
            dtype: p.dtype,
          })
        : want === 'F64'
          ? fromTypedArray(
              new Float64Array(cast.buffer.slice(cast.byteOffset, cast.byteOffset + cast.byteLength)),
              p.shape,
            )
          : fromTypedArray(
              new Float32Array(cast.buffer.slice(cast.byteOffset, cast.byteOffset + cast.byteLength)),
              p.shape,
            );
    noGrad(() => p.copy_(t));
    t.dispose();
  }
}

function concatBytes(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((a, p) => a + p.byteLength, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.byteLength;
  }
  return out;
}

const CONFIG_KEYS: (keyof TransformerConfig)[] = [
  'numLayers',
  'hiddenSize',
  'ffnHiddenSize',
  'numAttentionHeads',
  'numQueryGroups',
  'kvChannels',
  'vocabSize',
  'addQkvBias',
  'qkLayernorm',
  'normalization',
  'untieEmbeddingsAndOutputWeights',
  'mtpNumLayers',
];

/** Refuses weights of another model: names the first config field that differs. */
function checkSameModel(model: TransformerConfig, stored: TransformerConfig, architecture: string): void {
  for (const k of CONFIG_KEYS) {
    if (JSON.stringify(model[k]) !== JSON.stringify(stored[k])) {
      throw new ModelError(
        'WRONG_ARCHITECTURE',
        `the weights are a ${architecture} with ${k} = ${JSON.stringify(stored[k])}, the model has ${JSON.stringify(model[k])}`,
      );
    }
  }
  for (const k of ['moe', 'mla'] as const) {
    if (JSON.stringify(model[k]) !== JSON.stringify(stored[k])) {
      throw new ModelError(
        'WRONG_ARCHITECTURE',
        `the weights are a ${architecture} whose ${k} settings differ from the model's`,
      );
    }
  }
}

/** Options of {@link loadModel}. */
export interface LoadModelOptions extends Omit<GPTModelOptions, 'performInitialization'> {
  /** Iteration of a megapatch checkpoint (default: the latest). */
  iteration?: number;
  /** Check piece checksums of a megapatch checkpoint (default true). */
  verifyChecksums?: boolean;
  /** Expected HF architecture: another one is refused with a clear error. */
  architecture?: string;
  /**
   * For a Megatron-LM checkpoint (torch or torch_dist format) as `dir`: the Hugging Face
   * config.json (or its folder) that describes the model, whose tokenizer files are used too.
   */
  hfConfig?: string;
}

/** A model with its weights and where they came from. */
export interface LoadedModel {
  model: GPTModel;
  config: TransformerConfig;
  architecture: string;
  kind: 'hf' | 'megapatch' | 'megatron';
  tokenizerDir: string | null;
}

/**
 * Builds the model described by `dir` (a Hugging Face folder, a megapatch checkpoint in any
 * layout, or a Megatron-LM checkpoint with `hfConfig`) for this rank's layout, pipeline stage
 * included, and loads its weights: each rank reads only the slices its own parameters hold; no
 * intermediate files are written.
 */
export function loadModel(dir: string, opts: LoadModelOptions = {}): LoadedModel {
  const weights = openWeights(dir, opts);
  try {
    if (opts.architecture && opts.architecture !== weights.architecture) {
      throw new ModelError(
        'WRONG_ARCHITECTURE',
        `${dir} holds a ${weights.architecture}, expected a ${opts.architecture}`,
      );
    }
    const model = new GPTModel(weights.config, {
      family: weights.architecture,
      ...opts,
      performInitialization: false,
    });
    try {
      loadWeights(model, weights);
    } catch (e) {
      model.dispose();
      throw e;
    }
    return {
      model,
      config: weights.config,
      architecture: weights.architecture,
      kind: weights.kind,
      tokenizerDir: weights.tokenizerDir,
    };
  } finally {
    weights.source.close();
  }
}

/** Options of {@link saveModel}. */
export interface SaveModelOptions {
  /** HF architecture recorded in the checkpoint (it selects the spec that exports it). */
  architecture: string;
  /** Iteration (default 0). */
  iteration?: number;
  /** Files copied into `<iter>/huggingface/` (config.json, tokenizer files), by name -> path. */
  huggingfaceFiles?: Record<string, string>;
  consumedSamples?: number;
}

/**
 * Writes the model as a megapatch checkpoint (logical tensors with global shapes, atomically).
 * Single process (TP = EP = 1) for now; distributed saving comes with the trainer.
 */
export function saveModel(model: GPTModel, root: string, opts: SaveModelOptions): string {
  if (model.tpGroup.size > 1 || model.epGroup.size > 1 || model.pipeline.stages.length > 1) {
    throw new ModelError('UNSUPPORTED', 'saveModel writes single-process models (tp = ep = pp = 1) for now');
  }
  const slices = parameterSlices(model, opts.architecture);
  const tensors = new Map<string, Tensor>([...model.namedParameters(), ...model.namedBuffers()]);
  const files = Object.keys(opts.huggingfaceFiles ?? {}).sort();
  const tokenizerFiles = files.filter((f) =>
    /tokeniz|vocab|merges|special_tokens|chat_template|\.model$/i.test(f),
  );
  const writer = new CheckpointWriter(root, opts.iteration ?? 0, {
    layout: { tp: 1, pp: 1, ep: 1, etp: 1, dp: 1 },
    modelConfig: model.config as unknown as Record<string, unknown>,
    architecture: opts.architecture,
    consumedSamples: opts.consumedSamples ?? 0,
    huggingface: { files: [] },
    ...(tokenizerFiles.length > 0 ? { tokenizer: { files: tokenizerFiles } } : {}),
  });
  try {
    for (const f of files)
      writer.addFile(f, fs.readFileSync((opts.huggingfaceFiles as Record<string, string>)[f]));
    for (const s of slices) {
      const t = tensors.get(s.local) as Tensor;
      const dtype = ST_DTYPE[t.dtype] as SafetensorsDtype;
      const fixed = s.name.endsWith('router.expert_bias') ? 'F32' : dtype;
      const bytes = t.contiguous().toBytes();
      const data = fixed === dtype ? bytes : castElements(bytes, dtype, fixed, s.name);
      writer.addPiece(s.name, {
        dtype: fixed,
        globalShape: s.partition === 'vocab' ? [...t.shape] : s.globalShape,
        offsets: s.globalShape.map(() => 0),
        shape: [...t.shape],
        data,
      });
    }
    writer.finalize();
  } catch (e) {
    writer.abort();
    throw e;
  }
  return root;
}
