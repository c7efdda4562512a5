// The streaming converters: Hugging Face folder -> megapatch checkpoint, megapatch checkpoint ->
// Hugging Face folder, and megapatch -> megapatch in another layout. Each walks a ConversionPlan
// tensor by tensor and row chunk by row chunk, so peak memory stays near one chunk (64 MiB by
// default) whatever the model size, and every output file appears atomically.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { HF_FILES_DIR, iterationDirName } from '../checkpoint/metadata.js';
import { Checkpoint, type CheckpointOpenOptions } from '../checkpoint/reader.js';
import {
  CheckpointStreamWriter,
  type CheckpointWriterOptions,
  type PlannedTensor,
} from '../checkpoint/writer.js';
import { ConvertError } from '../errors.js';
import { DTYPE_SIZE, type SafetensorsDtype } from '../safetensors/dtype.js';
import {
  checkShardFileName,
  planShards,
  SAFETENSORS_INDEX_FILE,
  shardFileName,
  writeSafetensorsIndex,
} from '../safetensors/sharded.js';
import { SafetensorsWriter, type TensorSpec } from '../safetensors/writer.js';
import { getArchitectureSpec, parseHfConfig } from '../specs/registry.js';
import { makeTransformerConfig, type TransformerConfig } from '../transformer-config.js';
import { castElements, dequantizeFp8Blocks, isFloatDtype } from './dtype-cast.js';
import { type HfWeights, openHfWeights, PYTORCH_INDEX_FILE } from './hf-weights.js';
import { editJsonObject } from './json-edit.js';
import {
  checkCheckpointTarget,
  checkExportTarget,
  checkOutputApart,
  HF_EXPORT_MARKER_FILE,
  type HfExportMarker,
} from './output-guard.js';
import { type ConversionPlan, type MegatronTensorPlan, type ParallelLayout, planConversion } from './plan.js';
import { checkStored } from './verify.js';

/** Dtypes a conversion can write. */
export type ModelDtype = 'BF16' | 'F16' | 'F32';

/** Progress of a conversion, reported after every chunk. */
export interface ConversionProgress {
  /** Tensor being written. */
  readonly tensor: string;
  /** Bytes written so far and in all. */
  readonly doneBytes: number;
  readonly totalBytes: number;
}

/** What a conversion did. */
export interface ConversionSummary {
  /** Output directory. */
  readonly output: string;
  /** Tensors written. */
  readonly tensors: number;
  /** Parameters (elements, vocabulary padding excluded). */
  readonly parameters: number;
  /** Tensor bytes written. */
  readonly bytes: number;
  /** Files written (tensor files only). */
  readonly files: number;
  readonly seconds: number;
  /** Side files carried over (config, tokenizer, remote code). */
  readonly carried: string[];
}

/** Options shared by the three conversions. */
export interface CommonConvertOptions {
  /** Cast every floating-point tensor to this dtype (tensors Megatron keeps in fp32 stay fp32). */
  readonly dtype?: ModelDtype;
  /** Bytes read and written per step (default 64 MiB); peak memory is a few times this. */
  readonly chunkBytes?: number;
  /**
   * Replace an existing output (default: refuse), but only one megapatch produced: a megapatch
   * checkpoint iteration, or a folder it exported (it holds `.megapatch-export.json`).
   */
  readonly overwrite?: boolean;
  readonly onProgress?: (p: ConversionProgress) => void;
  /**
   * Stops the conversion: checked before anything is created and after every chunk (the
   * converter yields to the event loop there, so a SIGINT handler can abort it). Every temporary
   * is removed and `signal.reason` is thrown unchanged; the previous output stays as it was.
   */
  readonly signal?: AbortSignal;
}

/** Options of {@link convertHfToMegapatch}. */
export interface HfToMegapatchOptions extends CommonConvertOptions {
  /** Hugging Face folder: config.json and safetensors (single or sharded), or PyTorch pickles (pytorch_model.bin or sharded). */
  readonly hfDir: string;
  /** Root directory of the megapatch checkpoint to write. */
  readonly output: string;
  /** Target layout (default all 1, etp = tp). */
  readonly layout?: Partial<ParallelLayout>;
  /** Megatron's `--make-vocab-size-divisible-by` (default 128). */
  readonly makeVocabSizeDivisibleBy?: number;
  /** Iteration recorded (default 0). */
  readonly iteration?: number;
}

/** Options of {@link convertMegapatchToHf}. */
export interface MegapatchToHfOptions extends CommonConvertOptions {
  /** Root directory of the megapatch checkpoint. */
  readonly input: string;
  /** Hugging Face folder to write. */
  readonly output: string;
  /** Iteration to export (default: latest). */
  readonly iteration?: number;
  /** Largest shard file (default '5GB', as transformers). */
  readonly maxShardSize?: number | string;
  /** Check each piece's SHA-256 before using it (default true; see {@link CheckpointOpenOptions}). */
  readonly verifyChecksums?: boolean;
}

/** Options of {@link reshardCheckpoint}. */
export interface ReshardOptions extends CommonConvertOptions {
  readonly input: string;
  readonly output: string;
  readonly layout: Partial<ParallelLayout>;
  readonly iteration?: number;
  /** Check each piece's SHA-256 before using it (default true; see {@link CheckpointOpenOptions}). */
  readonly verifyChecksums?: boolean;
}

/** @internal */
export const DEFAULT_CHUNK = 64 << 20;
const WEIGHT_FILE = /\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx|npz)$/i;
/** @internal */
export const TOKENIZER_FILE =
  /(tokeniz|vocab|merges|special_tokens|added_tokens|chat_template|spiece|sentencepiece|\.tiktoken$|\.model$)/i;
const TORCH_DTYPE: Record<ModelDtype, string> = { BF16: 'bfloat16', F16: 'float16', F32: 'float32' };

const numel = (shape: readonly number[]) => shape.reduce((a, b) => a * b, 1);
const tick = () => new Promise<void>((r) => setImmediate(r));

/** Between chunks: stops once `signal` is aborted, and gives the event loop a turn. */
/** @internal */
export async function pause(signal: AbortSignal | undefined): Promise<void> {
  signal?.throwIfAborted();
  await tick();
  signal?.throwIfAborted();
}

/**
 * Checks ahead, asynchronously (interruptible, yielding between chunks), the checksums of a
 * stored tensor whose pieces are too big to be read in one chunk; smaller pieces are checked by
 * the reads themselves, which hash the bytes they read.
 */
async function verifyBigPieces(
  ckpt: Checkpoint,
  name: string,
  chunkBytes: number,
  signal: AbortSignal | undefined,
): Promise<void> {
  const t = ckpt.info(name);
  if (ckpt.verifyChecksums && t.pieces.some((p) => numel(p.shape) * DTYPE_SIZE[t.dtype] > chunkBytes)) {
    await ckpt.verifyTensor(name, { signal });
  }
}

/** Bytes of one row (everything after dim 0) of a tensor. */
/** @internal */
export function rowBytesOf(shape: readonly number[], dtype: SafetensorsDtype): number {
  return numel(shape.slice(1)) * DTYPE_SIZE[dtype];
}

/** Counts written bytes and reports progress. */
/** @internal */
export class Progress {
  done = 0;
  constructor(
    readonly total: number,
    private readonly cb?: (p: ConversionProgress) => void,
  ) {}
  add(tensor: string, n: number): void {
    this.done += n;
    this.cb?.({ tensor, doneBytes: this.done, totalBytes: this.total });
  }
}

/**
 * Appends the rows [a, a + n) of a tensor (`data`, full rows) to each piece that overlaps them,
 * cutting columns for pieces split along dim 1.
 */
function emitRows(
  write: (piece: number, chunk: Uint8Array) => void,
  pieces: readonly { offsets: readonly number[]; shape: readonly number[] }[],
  globalShape: readonly number[],
  esz: number,
  a: number,
  n: number,
  data: Uint8Array,
): void {
  const rowBytes = numel(globalShape.slice(1)) * esz;
  pieces.forEach((p, k) => {
    const p0 = p.shape.length === 0 ? 0 : p.offsets[0];
    const pn = p.shape.length === 0 ? 1 : p.shape[0];
    const lo = Math.max(a, p0);
    const hi = Math.min(a + n, p0 + pn);
    if (hi <= lo) return;
    const rows = data.subarray((lo - a) * rowBytes, (hi - a) * rowBytes);
    if (p.shape.length < 2 || p.shape[1] === globalShape[1]) {
      write(k, rows);
      return;
    }
    const inner = numel(globalShape.slice(2)) * esz;
    const c0 = p.offsets[1] * inner;
    const cb = p.shape[1] * inner;
    const out = new Uint8Array((hi - lo) * cb);
    for (let r = 0; r < hi - lo; r++)
      out.set(rows.subarray(r * rowBytes + c0, r * rowBytes + c0 + cb), r * cb);
    write(k, out);
  });
}

/** The summary of a conversion that wrote a megapatch checkpoint. */
/**
 * @internal Streams each planned tensor, read from `source` by row chunks in its stored dtype
 * (`from`), cast to the planned dtype, into the writer's pieces; `before` runs before a tensor.
 */
export async function streamTensors(
  writer: CheckpointStreamWriter,
  planned: readonly PlannedTensor[],
  source: TensorSource,
  from: ReadonlyMap<string, SafetensorsDtype>,
  progress: Progress,
  chunkBytes: number,
  signal: AbortSignal | undefined,
  before?: (name: string) => Promise<void>,
): Promise<void> {
  for (const t of planned) {
    const src = from.get(t.name) as SafetensorsDtype;
    const rows = t.globalShape.length === 0 ? 1 : t.globalShape[0];
    const step = Math.max(1, Math.floor(chunkBytes / Math.max(1, rowBytesOf(t.globalShape, src))));
    const write = (k: number, chunk: Uint8Array) => {
      writer.write(t.name, k, chunk);
      progress.add(t.name, chunk.byteLength);
    };
    await before?.(t.name);
    for (let a = 0; a < rows; a += step) {
      const n = Math.min(step, rows - a);
      const data = castElements(readStoredRows(source, t.name, a, n), src, t.dtype, t.name);
      emitRows(write, writer.pieces(t.name), t.globalShape, DTYPE_SIZE[t.dtype], a, n, data);
      await pause(signal);
    }
    await pause(signal);
  }
}

/** @internal Parameters of a plan: its tensors' elements, vocabulary padding excluded. */
export function planParameters(plan: ConversionPlan): number {
  return plan.tensors.reduce(
    (n, t) => n + t.rows.reduce((a, r) => a + (r.source ? r.count : 0), 0) * numel(t.globalShape.slice(1)),
    0,
  );
}

/** @internal */
export function summaryOf(
  output: string,
  planned: readonly PlannedTensor[],
  parameters: number,
  bytes: number,
  t0: number,
  carried: string[],
): ConversionSummary {
  const files = new Set(
    planned.flatMap((t) => t.pieces.map((p) => `${p.rank.tp}/${p.rank.pp}/${p.rank.ep}`)),
  );
  return {
    output,
    tensors: planned.length,
    parameters,
    bytes,
    files: files.size,
    seconds: (performance.now() - t0) / 1000,
    carried,
  };
}

/** Block-scale quantization from an HF config (`quantization_config.weight_block_size`). */
function fp8BlockSize(rawConfig: Record<string, unknown>): [number, number] | null {
  const q = rawConfig.quantization_config as { weight_block_size?: unknown } | undefined;
  const b = q?.weight_block_size;
  if (Array.isArray(b) && b.length === 2 && b.every((x) => Number.isSafeInteger(x) && x > 0)) {
    return [b[0] as number, b[1] as number];
  }
  return null;
}

/** Reads HF rows in a requested dtype, dequantizing FP8 block-scaled weights on the way. */
class HfSource {
  private readonly scales = new Map<string, Float32Array>();
  constructor(
    readonly st: HfWeights,
    private readonly blockSize: [number, number] | null,
  ) {}

  isFp8(name: string): boolean {
    const d = this.st.info(name).dtype;
    return d === 'F8_E4M3' || d === 'F8_E5M2';
  }

  rows(name: string, start: number, count: number, to: SafetensorsDtype): Uint8Array {
    const info = this.st.info(name);
    const raw = info.shape.length === 0 ? this.st.read(name) : this.st.readRows(name, start, count);
    if ((info.dtype === 'F8_E4M3' || info.dtype === 'F8_E5M2') && this.st.has(`${name}_scale_inv`)) {
      if (!this.blockSize) {
        throw new ConvertError(
          'INVALID_CONFIG',
          `tensor ${name} has block scales but config.json has no quantization_config.weight_block_size`,
          info.file,
        );
      }
      if (to !== 'BF16' && to !== 'F16' && to !== 'F32') {
        throw new ConvertError(
          'UNSUPPORTED',
          `tensor ${name}: FP8 weights are dequantized to BF16, F16 or F32, not ${to}`,
        );
      }
      const cols = numel(info.shape.slice(1));
      return dequantizeFp8Blocks({
        data: raw.data,
        dtype: info.dtype,
        rowStart: start,
        rows: count,
        cols,
        scaleInv: this.scale(name),
        scaleShape: [...this.st.info(`${name}_scale_inv`).shape] as [number, number],
        blockSize: this.blockSize,
        to,
      });
    }
    return castElements(raw.data, info.dtype, to, name);
  }

  private scale(name: string): Float32Array {
    let s = this.scales.get(name);
    if (!s) {
      const t = this.st.read(`${name}_scale_inv`);
      const f32 = castElements(t.data, t.dtype, 'F32', `${name}_scale_inv`);
      s = new Float32Array(f32.buffer.slice(f32.byteOffset, f32.byteOffset + f32.byteLength));
      this.scales.set(name, s);
    }
    return s;
  }
}

/** The dtype a Megatron tensor is written in. */
function outDtype(
  t: MegatronTensorPlan,
  sourceDtypes: SafetensorsDtype[],
  requested: ModelDtype | undefined,
): SafetensorsDtype {
  if (t.fixedDtype) return t.fixedDtype;
  if (requested) return requested;
  const unique = [...new Set(sourceDtypes.map((d) => (d === 'F8_E4M3' || d === 'F8_E5M2' ? 'BF16' : d)))];
  if (unique.length !== 1) {
    throw new ConvertError(
      'INVALID_ARGUMENT',
      `Megatron tensor ${t.name} fuses HF tensors of dtypes ${unique.join(', ')}; pass a dtype to cast them to one`,
    );
  }
  return unique[0];
}

/** Top-level side files of an HF folder worth carrying: everything but weights and hidden files. */
/** @internal */
export function sideFiles(hfDir: string): string[] {
  return fs
    .readdirSync(hfDir, { withFileTypes: true })
    .filter((e) => e.isFile() && !e.name.startsWith('.') && !WEIGHT_FILE.test(e.name))
    .filter((e) => e.name !== SAFETENSORS_INDEX_FILE && e.name !== PYTORCH_INDEX_FILE)
    .map((e) => e.name)
    .sort();
}

/** Checks the HF folder holds exactly the plan's tensors (plus FP8 scales and a tied lm_head copy). */
function checkHfTensors(
  plan: ConversionPlan,
  src: HfSource,
  hfDir: string,
  blockSize: [number, number] | null,
) {
  const st = src.st;
  const label = path.basename(hfDir);
  const expected = new Set<string>();
  for (const t of plan.hfTensors) {
    expected.add(t.name);
    if (!st.has(t.name)) {
      throw new ConvertError(
        'MISSING_TENSOR',
        `tensor ${t.name} is missing (expected by ${plan.spec.architectures[0]} with this config.json)`,
        label,
      );
    }
    const info = st.info(t.name);
    if (info.shape.join(',') !== t.shape.join(',')) {
      throw new ConvertError(
        'SHAPE_MISMATCH',
        `tensor ${t.name} has shape [${info.shape.join(',')}], config.json implies [${t.shape.join(',')}]`,
        info.file,
      );
    }
    if (!isFloatDtype(info.dtype)) {
      throw new ConvertError(
        'UNSUPPORTED',
        `tensor ${t.name} has dtype ${info.dtype}, not a floating-point type`,
        info.file,
      );
    }
    if (src.isFp8(t.name)) {
      const scale = `${t.name}_scale_inv`;
      if (!st.has(scale)) {
        throw new ConvertError('UNSUPPORTED', `FP8 tensor ${t.name} has no ${scale} block scales`, info.file);
      }
      const [b0, b1] = blockSize ?? [128, 128];
      const want = [Math.ceil(t.shape[0] / b0), Math.ceil(numel(t.shape.slice(1)) / b1)];
      const got = st.info(scale).shape;
      if (got.join(',') !== want.join(',')) {
        throw new ConvertError(
          'SHAPE_MISMATCH',
          `tensor ${scale} has shape [${got.join(',')}], blocks of [${b0},${b1}] need [${want.join(',')}]`,
          st.info(scale).file,
        );
      }
      expected.add(scale);
    }
  }
  const tiedHead = !plan.config.untieEmbeddingsAndOutputWeights && st.has('lm_head.weight');
  if (tiedHead) expected.add('lm_head.weight');
  const extra = st.keys().filter((k) => !expected.has(k));
  if (extra.length > 0) {
    throw new ConvertError(
      'UNEXPECTED_TENSOR',
      `${extra.length} tensor(s) not described by ${plan.spec.architectures[0]} with this config.json: ` +
        `${extra.slice(0, 5).join(', ')}${extra.length > 5 ? ', ...' : ''}`,
      label,
    );
  }
  return tiedHead;
}

/** Checks that HF tensor `copy` holds the same bytes as `primary` (streamed in chunks). */
async function checkSameBytes(
  st: HfWeights,
  copy: string,
  primary: string,
  chunkBytes: number,
  why: string,
  signal: AbortSignal | undefined,
): Promise<void> {
  const a = st.info(copy);
  const b = st.info(primary);
  const rows = a.shape[0] ?? 1;
  const differ = () =>
    new ConvertError(
      'UNSUPPORTED',
      `tensor ${copy} differs from ${primary}: ${why}, so converting would lose it`,
      a.file,
    );
  if (a.dtype !== b.dtype || a.shape.join(',') !== b.shape.join(',')) throw differ();
  const step = Math.max(1, Math.floor(chunkBytes / Math.max(1, rowBytesOf(a.shape, a.dtype))));
  for (let r = 0; r < rows; r += step) {
    const n = Math.min(step, rows - r);
    const x = st.readRows(copy, r, n).data;
    const y = st.readRows(primary, r, n).data;
    if (Buffer.compare(x, y) !== 0) throw differ();
    await pause(signal);
  }
}

/** Converts a Hugging Face folder into a megapatch checkpoint with the given layout. */
export async function convertHfToMegapatch(opts: HfToMegapatchOptions): Promise<ConversionSummary> {
  const t0 = performance.now();
  opts.signal?.throwIfAborted();
  const chunkBytes = opts.chunkBytes ?? DEFAULT_CHUNK;
  checkOutputApart(opts.output, opts.hfDir);
  const parsed = parseHfConfig(opts.hfDir);
  const rawConfig = JSON.parse(fs.readFileSync(path.join(opts.hfDir, 'config.json'), 'utf8'));
  let cfg = parsed.transformerConfig;
  if (opts.makeVocabSizeDivisibleBy !== undefined) {
    cfg = makeTransformerConfig({ ...cfg, makeVocabSizeDivisibleBy: opts.makeVocabSizeDivisibleBy });
  }
  const st = openHfWeights(opts.hfDir);
  if (cfg.mtpNumLayers > 0 && !st.keys().some((k) => k.startsWith(`model.layers.${cfg.numLayers}.`))) {
    // transformers' own save_pretrained drops DeepSeek-V3's MTP layers: convert without them.
    cfg = makeTransformerConfig({ ...cfg, mtpNumLayers: 0 });
  }
  let plan: ConversionPlan;
  try {
    plan = planConversion(parsed.spec, cfg, opts.layout);
    checkCheckpointTarget(path.join(opts.output, iterationDirName(opts.iteration ?? 0)), opts.overwrite);
  } catch (e) {
    st.close();
    throw e;
  }
  const iteration = opts.iteration ?? 0;
  const blockSize = fp8BlockSize(rawConfig);
  try {
    const src = new HfSource(st, blockSize);
    const tiedHead = checkHfTensors(plan, src, opts.hfDir, blockSize);
    for (const d of plan.duplicates) {
      await checkSameBytes(st, d.hf, d.primary, chunkBytes, `megapatch keeps one ${d.megatron}`, opts.signal);
    }
    if (tiedHead) {
      await checkSameBytes(
        st,
        'lm_head.weight',
        'model.embed_tokens.weight',
        chunkBytes,
        'config.json ties them',
        opts.signal,
      );
    }
    const dtypes = new Map<string, SafetensorsDtype>();
    // HF dtypes of tensors held in a fixed Megatron dtype, so the export gives them back as they were.
    const hfDtypes: Record<string, SafetensorsDtype> = {};
    const planned: PlannedTensor[] = plan.tensors.map((t) => {
      const srcDtypes = t.rows.filter((r) => r.source !== null).map((r) => st.info(r.source as string).dtype);
      const dtype = outDtype(t, srcDtypes, opts.dtype);
      dtypes.set(t.name, dtype);
      for (const r of t.rows) {
        const d = r.source === null ? null : st.info(r.source).dtype;
        if (t.fixedDtype && r.source !== null && d && d !== dtype && !src.isFp8(r.source))
          hfDtypes[r.source] = d;
      }
      return { name: t.name, dtype, globalShape: t.globalShape, pieces: t.pieces };
    });
    const total = planned.reduce((s, t) => s + numel(t.globalShape) * DTYPE_SIZE[t.dtype], 0);
    const progress = new Progress(total, opts.onProgress);
    const files = sideFiles(opts.hfDir);
    const layout = plan.layout;
    const options: CheckpointWriterOptions = {
      layout: { ...layout, dp: 1 },
      modelConfig: cfg as unknown as Record<string, unknown>,
      architecture: plan.spec.architectures[0],
      huggingface: { files: [], ...(Object.keys(hfDtypes).length > 0 ? { dtypes: hfDtypes } : {}) },
      ...(files.some((f) => TOKENIZER_FILE.test(f))
        ? { tokenizer: { files: files.filter((f) => TOKENIZER_FILE.test(f)) } }
        : {}),
    };
    const writer = new CheckpointStreamWriter(opts.output, iteration, options, planned);
    try {
      for (const f of files) writer.addFile(f, fs.readFileSync(path.join(opts.hfDir, f)));
      for (const t of plan.tensors) {
        const dtype = dtypes.get(t.name) as SafetensorsDtype;
        const esz = DTYPE_SIZE[dtype];
        const rowBytes = rowBytesOf(t.globalShape, dtype);
        const step = Math.max(1, Math.floor(chunkBytes / Math.max(1, rowBytes)));
        const write = (k: number, chunk: Uint8Array) => {
          writer.write(t.name, k, chunk);
          progress.add(t.name, chunk.byteLength);
        };
        for (const run of t.rows) {
          for (let r = 0; r < run.count; r += step) {
            const n = Math.min(step, run.count - r);
            const data =
              run.source === null
                ? new Uint8Array(n * rowBytes)
                : src.rows(run.source, run.sourceStart + r, n, dtype);
            emitRows(write, writer.pieces(t.name), t.globalShape, esz, run.start + r, n, data);
            await pause(opts.signal);
          }
        }
        await pause(opts.signal);
      }
      writer.finalize();
    } catch (e) {
      writer.abort();
      throw e;
    }
    const parameters = planParameters(plan);
    return summaryOf(opts.output, planned, parameters, total, t0, files);
  } finally {
    st.close();
  }
}

/** Opens a megapatch checkpoint with its spec and TransformerConfig. */
/** @internal */
export function openWithSpec(
  input: string,
  iteration: number | undefined,
  verifyChecksums: boolean | undefined,
) {
  const ckpt = Checkpoint.open(input, {
    ...(iteration === undefined ? {} : { iteration }),
    verifyChecksums: verifyChecksums ?? true,
  });
  const arch = ckpt.metadata.architecture;
  if (!arch) {
    ckpt.close();
    throw new ConvertError(
      'INVALID_FORMAT',
      'metadata.json has no "architecture": the checkpoint does not say which HF architecture it maps to',
      'metadata.json',
    );
  }
  let cfg: TransformerConfig;
  try {
    cfg = makeTransformerConfig(ckpt.metadata.modelConfig as never, 'metadata.json');
    return { ckpt, spec: getArchitectureSpec(arch), cfg };
  } catch (e) {
    ckpt.close();
    throw e;
  }
}

/** Reads rows [a, a + n) of a stored tensor, zero rows past its end (vocabulary padding). */
function readStoredRows(ckpt: TensorSource, name: string, a: number, n: number): Uint8Array {
  const shape = ckpt.info(name).globalShape;
  if (shape.length === 0) return ckpt.readSlice(name, [], []);
  return readPaddedBox(ckpt, name, [a, ...shape.slice(1).map(() => 0)], [n, ...shape.slice(1)]);
}

/**
 * @internal The box [offsets, offsets + shape) of a stored tensor (rank >= 1), zero rows past its
 * end: the vocabulary padding of a larger multiple.
 */
export function readPaddedBox(
  src: TensorSource,
  name: string,
  offsets: readonly number[],
  shape: readonly number[],
): Uint8Array {
  const info = src.info(name);
  const have = Math.max(0, Math.min(shape[0], info.globalShape[0] - offsets[0]));
  if (have === shape[0]) return src.readSlice(name, offsets, shape);
  const out = new Uint8Array(numel(shape) * DTYPE_SIZE[info.dtype]);
  if (have > 0) out.set(src.readSlice(name, offsets, [have, ...shape.slice(1)]));
  return out;
}

/** Moves a finished temporary folder to `target`, replacing an existing one only at the very end. */
/** @internal */
export function commitDir(tmp: string, target: string): void {
  const old = `${target}.old-${process.pid}`;
  const had = fs.existsSync(target);
  if (had) fs.renameSync(target, old);
  fs.renameSync(tmp, target);
  if (had) fs.rmSync(old, { recursive: true, force: true });
}

/**
 * config.json as exported: the dtype written, and no FP8 quantization section once dequantized.
 * Only those members change; everything else keeps its exact text (`0.0` stays `0.0`).
 */
export function exportedHfConfig(text: string, dtype: SafetensorsDtype | null): string {
  const json = JSON.parse(text) as Record<string, unknown>;
  const set: Record<string, unknown> = {};
  if (dtype === 'BF16' || dtype === 'F16' || dtype === 'F32') {
    // transformers 5 writes `dtype`, older versions `torch_dtype`.
    if ('dtype' in json) set.dtype = TORCH_DTYPE[dtype];
    if ('torch_dtype' in json || !('dtype' in json)) set.torch_dtype = TORCH_DTYPE[dtype];
    for (const k of Object.keys(set)) if (json[k] === set[k]) delete set[k];
  }
  return editJsonObject(text, { set, remove: ['quantization_config'] });
}

/** Exports a megapatch checkpoint (any layout) as a Hugging Face folder with sharded safetensors. */
export async function convertMegapatchToHf(opts: MegapatchToHfOptions): Promise<ConversionSummary> {
  const t0 = performance.now();
  opts.signal?.throwIfAborted();
  const chunkBytes = opts.chunkBytes ?? DEFAULT_CHUNK;
  checkOutputApart(opts.output, opts.input);
  const { ckpt, spec, cfg } = openWithSpec(opts.input, opts.iteration, opts.verifyChecksums);
  try {
    const plan = planConversion(spec, cfg, {});
    checkExportTarget(opts.output, opts.overwrite);
    const stored = new Map(plan.tensors.map((t) => [t.name, checkStored(ckpt, t)]));
    return await writeHfFolder(
      {
        source: ckpt,
        plan,
        stored,
        recorded: ckpt.metadata.huggingface?.dtypes ?? {},
        sideFiles: (dir, dtypes) => carryBack(ckpt, dir, dtypes),
        marker: { checkpoint: path.resolve(opts.input), iteration: ckpt.iteration },
        beforeRead: (name) => verifyBigPieces(ckpt, name, chunkBytes, opts.signal),
      },
      { ...opts, chunkBytes },
      t0,
    );
  } finally {
    ckpt.close();
  }
}

/** What {@link writeHfFolder} reads: the Megatron tensors of a plan, and the HF side files. */
/** @internal */
export interface HfExportSource {
  readonly source: TensorSource;
  readonly plan: ConversionPlan;
  /** The dtype each Megatron tensor is stored in. */
  readonly stored: ReadonlyMap<string, SafetensorsDtype>;
  /** HF dtypes to write back per HF tensor (a BF16 expert bias kept in F32 by Megatron). */
  readonly recorded: Readonly<Record<string, SafetensorsDtype>>;
  /** Writes the side files (config.json for the dtypes written, tokenizer, …) into `dir`; returns their names. */
  sideFiles(dir: string, dtypes: SafetensorsDtype[]): string[];
  readonly marker: HfExportMarker['source'];
  /** Called before a Megatron tensor's rows are read (checksums of big pieces). */
  beforeRead?(name: string): Promise<void>;
}

/**
 * Writes the HF tensors of `src.plan` (sharded safetensors + index, side files, the export marker)
 * to a temporary folder renamed to `opts.output` when complete.
 */
/** @internal */
export async function writeHfFolder(
  src: HfExportSource,
  opts: {
    output: string;
    dtype?: ModelDtype;
    maxShardSize?: number | string;
    chunkBytes: number;
    signal?: AbortSignal;
    onProgress?: (p: ConversionProgress) => void;
  },
  t0: number,
): Promise<ConversionSummary> {
  const { plan } = src;
  // HF tensor -> the Megatron rows it is made of.
  const runs = new Map<string, { megatron: string; start: number; count: number; sourceStart: number }[]>();
  for (const t of plan.tensors) {
    for (const r of t.rows) {
      if (r.source === null) continue;
      const list = runs.get(r.source) ?? [];
      list.push({ megatron: t.name, start: r.start, count: r.count, sourceStart: r.sourceStart });
      runs.set(r.source, list);
    }
  }
  for (const d of plan.duplicates) {
    runs.set(d.hf, [{ megatron: d.megatron, start: 0, count: d.shape[0], sourceStart: 0 }]);
  }
  const fixed = new Map(plan.tensors.filter((t) => t.fixedDtype).map((t) => [t.name, t.fixedDtype]));
  const specs: (TensorSpec & { runs: NonNullable<ReturnType<typeof runs.get>>; from: SafetensorsDtype })[] =
    plan.hfTensors.map((h) => {
      const list = (runs.get(h.name) ?? []).sort((a, b) => a.sourceStart - b.sourceStart);
      const from = src.stored.get(list[0].megatron) as SafetensorsDtype;
      const dtype = src.recorded[h.name] ?? fixed.get(list[0].megatron) ?? opts.dtype ?? from;
      return { name: h.name, dtype, shape: h.shape, runs: list, from };
    });
  const shards = planShards(specs, opts.maxShardSize ?? '5GB', { format: 'pt' });
  const total = specs.reduce((s, t) => s + numel(t.shape) * DTYPE_SIZE[t.dtype], 0);
  const progress = new Progress(total, opts.onProgress);
  const tmp = `${path.resolve(opts.output)}.tmp-${process.pid}`;
  fs.rmSync(tmp, { recursive: true, force: true });
  fs.mkdirSync(tmp, { recursive: true });
  try {
    const weightMap = new Map<string, string>();
    for (let i = 0; i < shards.length; i++) {
      const file = checkShardFileName(
        shards.length === 1 ? 'model.safetensors' : shardFileName(i + 1, shards.length),
      );
      const w = new SafetensorsWriter(path.join(tmp, file), shards[i], { metadata: { format: 'pt' } });
      try {
        for (const s of w.order as typeof specs) {
          const rowBytesFrom = rowBytesOf(s.shape, s.from);
          const step = Math.max(1, Math.floor(opts.chunkBytes / Math.max(1, rowBytesFrom)));
          for (const run of s.runs) {
            await src.beforeRead?.(run.megatron);
            for (let r = 0; r < run.count; r += step) {
              const n = Math.min(step, run.count - r);
              const raw = readStoredRows(src.source, run.megatron, run.start + r, n);
              const data = castElements(raw, s.from, s.dtype, s.name);
              w.write(s.name, data);
              progress.add(s.name, data.byteLength);
              await pause(opts.signal);
            }
          }
          weightMap.set(s.name, file);
          await pause(opts.signal);
        }
        w.finish();
      } catch (e) {
        w.abort();
        throw e;
      }
    }
    if (shards.length > 1) writeSafetensorsIndex(tmp, weightMap, total);
    const dtypes = [...new Set(specs.filter((s) => s.shape.length > 1).map((s) => s.dtype))];
    const carried = src.sideFiles(tmp, dtypes);
    const marker: HfExportMarker = {
      format: 'megapatch-hf-export',
      version: 1,
      files: fs.readdirSync(tmp).sort(),
      source: src.marker,
    };
    fs.writeFileSync(path.join(tmp, HF_EXPORT_MARKER_FILE), `${JSON.stringify(marker, null, 2)}\n`);
    opts.signal?.throwIfAborted();
    commitDir(tmp, path.resolve(opts.output));
    return {
      output: opts.output,
      tensors: specs.length,
      parameters: specs.reduce((a, s) => a + numel(s.shape), 0),
      bytes: total,
      files: shards.length,
      seconds: (performance.now() - t0) / 1000,
      carried,
    };
  } catch (e) {
    fs.rmSync(tmp, { recursive: true, force: true });
    throw e;
  }
}

/** Writes config.json for the dtypes written (one: its name; several: unchanged) and copies the other side files. */
/** @internal */
export function writeSideFiles(
  fromDir: string,
  files: readonly string[],
  dir: string,
  dtypes: SafetensorsDtype[],
) {
  for (const f of files) {
    const from = path.join(fromDir, f);
    if (f === 'config.json') {
      fs.writeFileSync(
        path.join(dir, f),
        exportedHfConfig(fs.readFileSync(from, 'utf8'), dtypes.length === 1 ? dtypes[0] : null),
      );
    } else {
      fs.copyFileSync(from, path.join(dir, f));
    }
  }
}

/** Copies the checkpoint's HF side files into `dir`, with config.json updated for the dtype written. */
function carryBack(ckpt: Checkpoint, dir: string, dtypes: SafetensorsDtype[]): string[] {
  const files = ckpt.metadata.huggingface?.files ?? [];
  const from = path.join(ckpt.dir, HF_FILES_DIR);
  for (const f of files) {
    if (!fs.existsSync(path.join(from, f))) {
      throw new ConvertError(
        'MISSING_FILE',
        `side file ${HF_FILES_DIR}/${f} listed in metadata.json is missing`,
        f,
      );
    }
  }
  writeSideFiles(from, files, dir, dtypes);
  return [...files];
}

/** Rewrites a megapatch checkpoint into another TP/PP/EP layout (and optionally another dtype). */
export async function reshardCheckpoint(opts: ReshardOptions): Promise<ConversionSummary> {
  const t0 = performance.now();
  opts.signal?.throwIfAborted();
  const chunkBytes = opts.chunkBytes ?? DEFAULT_CHUNK;
  checkOutputApart(opts.output, opts.input);
  const { ckpt, spec, cfg } = openWithSpec(opts.input, opts.iteration, opts.verifyChecksums);
  try {
    const plan = planConversion(spec, cfg, opts.layout);
    checkCheckpointTarget(path.join(opts.output, path.basename(ckpt.dir)), opts.overwrite);
    const from = new Map<string, SafetensorsDtype>();
    const planned: PlannedTensor[] = plan.tensors.map((t) => {
      const stored = checkStored(ckpt, t);
      from.set(t.name, stored);
      const dtype = t.fixedDtype ?? (opts.dtype && isFloatDtype(stored) ? opts.dtype : stored);
      return { name: t.name, dtype, globalShape: t.globalShape, pieces: t.pieces };
    });
    // Tensors the model plan does not know (other state) are kept whole, on the first rank.
    const known = new Set(planned.map((t) => t.name));
    for (const name of ckpt.tensorNames()) {
      if (known.has(name)) continue;
      const info = ckpt.info(name);
      from.set(name, info.dtype);
      planned.push({
        name,
        dtype: info.dtype,
        globalShape: info.globalShape,
        pieces: [
          {
            rank: { tp: 0, pp: 0, ep: 0 },
            offsets: info.globalShape.map(() => 0),
            shape: [...info.globalShape],
          },
        ],
      });
    }
    const total = planned.reduce((s, t) => s + numel(t.globalShape) * DTYPE_SIZE[t.dtype], 0);
    const progress = new Progress(total, opts.onProgress);
    const m = ckpt.metadata;
    const options: CheckpointWriterOptions = {
      layout: { ...plan.layout, dp: m.layout.dp },
      modelConfig: m.modelConfig,
      consumedSamples: m.consumedSamples,
      ...(m.architecture ? { architecture: m.architecture } : {}),
      ...(m.huggingface ? { huggingface: m.huggingface } : {}),
      ...(m.tokenizer ? { tokenizer: m.tokenizer } : {}),
      ...(m.optimizer !== undefined ? { optimizer: m.optimizer } : {}),
      ...(m.scheduler !== undefined ? { scheduler: m.scheduler } : {}),
      ...(m.rng !== undefined ? { rng: m.rng } : {}),
      ...(m.dataLoader !== undefined ? { dataLoader: m.dataLoader } : {}),
    };
    const writer = new CheckpointStreamWriter(opts.output, m.iteration, options, planned);
    try {
      for (const f of m.huggingface?.files ?? []) {
        writer.addFile(f, fs.readFileSync(path.join(ckpt.dir, HF_FILES_DIR, f)));
      }
      await streamTensors(writer, planned, ckpt, from, progress, chunkBytes, opts.signal, (name) =>
        verifyBigPieces(ckpt, name, chunkBytes, opts.signal),
      );
      writer.finalize();
    } catch (e) {
      writer.abort();
      throw e;
    }
    const parameters = planned.reduce((n, t) => n + numel(t.globalShape), 0);
    return summaryOf(opts.output, planned, parameters, total, t0, [...(m.huggingface?.files ?? [])]);
  } finally {
    ckpt.close();
  }
}

/** Dtype and global shape of one logical tensor of a {@link TensorSource}. */
export interface TensorSourceInfo {
  readonly dtype: SafetensorsDtype;
  readonly globalShape: readonly number[];
}

/**
 * Logical Megatron-named tensors that can be read by box: a megapatch checkpoint
 * ({@link Checkpoint}) or a Hugging Face folder seen through its conversion plan
 * ({@link HfMegatronView}). A model loader reads only the slices its rank holds.
 */
export interface TensorSource {
  tensorNames(): string[];
  info(name: string): TensorSourceInfo;
  readSlice(name: string, offsets: readonly number[], shape: readonly number[]): Uint8Array;
  close(): void;
}

/**
 * A Hugging Face folder read as the Megatron tensors of its conversion plan (layout 1, vocabulary
 * padded to makeVocabSizeDivisibleBy), without writing anything: each slice is assembled from the
 * HF rows it needs (fused QKV, [gate; up], vocabulary padding, FP8 dequantization), so loading a
 * model straight from an HF folder streams only this rank's shard.
 */
export class HfMegatronView implements TensorSource {
  private readonly byName: Map<string, { plan: MegatronTensorPlan; dtype: SafetensorsDtype }>;

  private constructor(
    readonly hfDir: string,
    readonly plan: ConversionPlan,
    private readonly src: HfSource,
    dtypes: Map<string, SafetensorsDtype>,
  ) {
    this.byName = new Map(
      plan.tensors.map((t) => [t.name, { plan: t, dtype: dtypes.get(t.name) as SafetensorsDtype }]),
    );
  }

  /** Opens and checks an HF folder (every tensor present with the shape config.json implies). */
  static open(hfDir: string, opts: { makeVocabSizeDivisibleBy?: number } = {}): HfMegatronView {
    const parsed = parseHfConfig(hfDir);
    const rawConfig = JSON.parse(fs.readFileSync(path.join(hfDir, 'config.json'), 'utf8'));
    let cfg = parsed.transformerConfig;
    if (opts.makeVocabSizeDivisibleBy !== undefined) {
      cfg = makeTransformerConfig({ ...cfg, makeVocabSizeDivisibleBy: opts.makeVocabSizeDivisibleBy });
    }
    const st = openHfWeights(hfDir);
    try {
      if (cfg.mtpNumLayers > 0 && !st.keys().some((k) => k.startsWith(`model.layers.${cfg.numLayers}.`))) {
        cfg = makeTransformerConfig({ ...cfg, mtpNumLayers: 0 });
      }
      const plan = planConversion(parsed.spec, cfg, {});
      const blockSize = fp8BlockSize(rawConfig);
      const src = new HfSource(st, blockSize);
      checkHfTensors(plan, src, hfDir, blockSize);
      const dtypes = new Map<string, SafetensorsDtype>();
      for (const t of plan.tensors) {
        const srcDtypes = t.rows
          .filter((r) => r.source !== null)
          .map((r) => st.info(r.source as string).dtype);
        dtypes.set(t.name, outDtype(t, srcDtypes, undefined));
      }
      return new HfMegatronView(hfDir, plan, src, dtypes);
    } catch (e) {
      st.close();
      throw e;
    }
  }

  /** The TransformerConfig of the folder (MTP layers dropped when its weights lack them). */
  get config(): TransformerConfig {
    return this.plan.config;
  }

  /** The HF architecture name. */
  get architecture(): string {
    return this.plan.spec.architectures[0];
  }

  tensorNames(): string[] {
    return [...this.byName.keys()].sort();
  }

  info(name: string): TensorSourceInfo {
    const t = this.byName.get(name);
    if (!t)
      throw new ConvertError(
        'MISSING_TENSOR',
        `no Megatron tensor ${JSON.stringify(name)} in this model`,
        path.basename(this.hfDir),
      );
    return { dtype: t.dtype, globalShape: t.plan.globalShape };
  }

  /** The box `offsets`/`shape` of Megatron tensor `name` (1-D or 2-D), in {@link HfMegatronView.info}'s dtype. */
  readSlice(name: string, offsets: readonly number[], shape: readonly number[]): Uint8Array {
    this.info(name); // names a missing tensor
    const { plan, dtype } = this.byName.get(name) as { plan: MegatronTensorPlan; dtype: SafetensorsDtype };
    const g = plan.globalShape;
    if (g.length > 2 || offsets.length !== g.length || shape.length !== g.length) {
      throw new ConvertError(
        'INVALID_ARGUMENT',
        `readSlice(${name}): a box of rank ${g.length} needed (1-D or 2-D tensors)`,
      );
    }
    for (let d = 0; d < g.length; d++) {
      if (offsets[d] < 0 || shape[d] < 0 || offsets[d] + shape[d] > g[d]) {
        throw new ConvertError(
          'INVALID_ARGUMENT',
          `readSlice(${name}): box [${offsets}]+[${shape}] is outside [${g}]`,
        );
      }
    }
    const esz = DTYPE_SIZE[dtype];
    const cols = g.length === 2 ? g[1] : 1;
    const c0 = g.length === 2 ? offsets[1] : 0;
    const cn = g.length === 2 ? shape[1] : 1;
    const a = offsets[0];
    const n = shape[0];
    const out = new Uint8Array(n * cn * esz);
    for (const run of plan.rows) {
      const lo = Math.max(a, run.start);
      const hi = Math.min(a + n, run.start + run.count);
      if (hi <= lo || run.source === null) continue;
      const data = this.src.rows(run.source, run.sourceStart + (lo - run.start), hi - lo, dtype);
      for (let r = 0; r < hi - lo; r++) {
        out.set(data.subarray((r * cols + c0) * esz, (r * cols + c0 + cn) * esz), (lo - a + r) * cn * esz);
      }
    }
    return out;
  }

  close(): void {
    this.src.st.close();
  }
}
