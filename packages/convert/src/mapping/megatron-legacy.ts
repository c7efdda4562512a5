// Megatron-LM's legacy checkpoint format (`--ckpt-format torch`): one torch.save file per model
// parallel rank, `iter_NNNNNNN/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`, each a dict with the
// training `args`, `checkpoint_version`, `iteration` and that rank's model state dict (`model`, or
// `model0` … for virtual pipeline stages) under Megatron-Core names with local layer and expert
// indices. The importer reads those files as the global tensors of the megapatch checkpoint; the
// exporter writes a megapatch checkpoint as those files, in any layout. Only the model moves: the
// optimizer and RNG states are not translated (load with `--finetune`, or `--no-load-optim
// --no-load-rng`).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { iterationDirName, MEGATRON_RANK_DIR, megatronCheckpointFormat } from '../checkpoint/metadata.js';
import {
  CheckpointStreamWriter,
  type CheckpointWriterOptions,
  type PlannedTensor,
} from '../checkpoint/writer.js';
import { ConvertError } from '../errors.js';
import { DTYPE_SIZE, numelOf, type SafetensorsDtype } from '../safetensors/dtype.js';
import { parseHfConfig } from '../specs/registry.js';
import { DcpCheckpoint } from '../torch/dcp.js';
import { PyFloat, PyGlobal, PyObject } from '../torch/pickle.js';
import { TorchFile, TorchFileWriter, TorchTensor, type TorchTensorRef } from '../torch/torch-file.js';
import { paddedVocabSize, type TransformerConfig } from '../transformer-config.js';
import {
  type CommonConvertOptions,
  type ConversionSummary,
  commitDir,
  DEFAULT_CHUNK,
  openWithSpec,
  Progress,
  pause,
  planParameters,
  readPaddedBox,
  rowBytesOf,
  sideFiles,
  streamTensors,
  summaryOf,
  type TensorSource,
  TOKENIZER_FILE,
  writeHfFolder,
  writeSideFiles,
} from './convert.js';
import { castElements, isFloatDtype } from './dtype-cast.js';
import { type HfWeights, openHfWeights } from './hf-weights.js';
import {
  argsOf,
  LOCAL_NORMS,
  MEGATRON_TRACKER_FILE,
  MegatronPlanView,
  megatronIterationDir,
  megatronModelOfArgs,
  num,
} from './megatron-common.js';
import { MEGATRON_COMMON_FILE, MegatronDistView } from './megatron-dist.js';
import { checkCheckpointTarget, checkExportTarget, checkOutputApart } from './output-guard.js';
import {
  type ConversionPlan,
  type MegatronTensorPlan,
  type ParallelLayout,
  type PlannedPiece,
  planConversion,
  resolveLayout,
} from './plan.js';

/** The file each model-parallel rank saves in the legacy format. */
export const MEGATRON_RANK_FILE = 'model_optim_rng.pt';

/** How module names are spelled in the state dict (Megatron's `--transformer-impl`, `--moe-grouped-gemm`). */
export interface MegatronNaming {
  /**
   * `transformer_engine` (default): the input and pre-MLP norms are fused into the following linear
   * (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`); `local`: separate
   * `input_layernorm` / `pre_mlp_layernorm` / `q_layernorm` / `kv_layernorm` modules.
   */
  readonly transformerImpl?: 'transformer_engine' | 'local';
  /** Experts as TEGroupedMLP (`experts.linear_fc1.weight<j>`) instead of SequentialMLP (`experts.local_experts.<j>.…`). */
  readonly moeGroupedGemm?: boolean;
}

/** `mp_rank_TT[_PPP][_EEE]`: the rank folder name Megatron's `get_checkpoint_name` gives. */
export function megatronRankDirName(
  rank: { tp: number; pp: number; ep: number },
  layout: { pp: number; ep: number },
) {
  let s = `mp_rank_${String(rank.tp).padStart(2, '0')}`;
  if (layout.pp > 1) s += `_${String(rank.pp).padStart(3, '0')}`;
  if (layout.ep > 1) s += `_${String(rank.ep).padStart(3, '0')}`;
  return s;
}

/** Where a megapatch tensor lives in one rank's file: the model chunk key and its local name. */
interface LocalPlace {
  readonly chunk: string;
  readonly name: string;
}

function chunkKey(vpStage: number, vpp: number): string {
  return vpp > 1 ? `model${vpStage}` : 'model';
}

/**
 * The local state-dict name of a planned tensor on EP rank `ep`: decoder and MTP layer indices
 * made local to their pipeline stage, expert indices local to their EP rank, then spelled for
 * `naming`.
 */
function localPlace(
  plan: ConversionPlan,
  t: MegatronTensorPlan,
  ep: number,
  naming: MegatronNaming,
): LocalPlace {
  const pipe = plan.pipeline;
  const last = pipe.stages.length - 1;
  let stage = t.name.startsWith('embedding.') ? 0 : last;
  let name = t.name;
  const layer = /^(decoder|mtp)\.layers\.(\d+)\.(.*)$/.exec(name);
  if (layer) {
    const g = Number(layer[2]);
    const mtp = layer[1] === 'mtp';
    stage = (mtp ? pipe.mtpStage : pipe.layerStage)[g];
    const first = (mtp ? pipe.stages[stage].mtpLayers : pipe.stages[stage].layers)[0];
    let rest = layer[3];
    const expert = /^(.*\bmlp\.experts\.)local_experts\.(\d+)\.(linear_fc[12])\.weight$/.exec(rest);
    if (expert) {
      const perRank = (plan.config.moe?.numExperts ?? 0) / plan.layout.ep;
      const j = Number(expert[2]) - ep * perRank;
      rest = naming.moeGroupedGemm
        ? `${expert[1]}${expert[3]}.weight${j}`
        : `${expert[1]}local_experts.${j}.${expert[3]}.weight`;
    }
    if (naming.transformerImpl === 'local') {
      for (const [te, local] of LOCAL_NORMS) {
        if (rest === te || rest.endsWith(`.${te}`)) rest = rest.slice(0, rest.length - te.length) + local;
      }
    }
    name = `${layer[1]}.layers.${g - first}.${rest}`;
  } else if (t.name.startsWith('decoder.final_layernorm.')) {
    stage = pipe.finalLayernormStage;
  }
  return { chunk: chunkKey(pipe.stages[stage].vpStage, pipe.vpp), name };
}

/** The pieces of `t` one rank's file holds, in their local order (stacked along dim 0). */
function rankPieces(t: MegatronTensorPlan, tp: number, ep: number): PlannedPiece[] {
  if (t.expert !== undefined) return t.pieces.filter((p) => p.rank.ep === ep && p.rank.tp === tp);
  if (t.partition === 'replicate') return t.pieces;
  return t.pieces.filter((p) => p.rank.tp === tp);
}

/** One tensor of a rank file: its plan, this rank's pieces, where it sits, and whether it is a copy. */
interface FileTensor {
  readonly t: MegatronTensorPlan;
  readonly pieces: PlannedPiece[];
  readonly at: LocalPlace;
  /**
   * A copy Megatron keeps of the word embeddings on a later stage: as `output_layer.weight` on the
   * loss stage of a tied model, as `embedding.word_embeddings.weight` on a stage with MTP layers.
   */
  readonly copy: boolean;
}

/** The tensors of the rank file (tp, pp, ep), in plan order, Megatron's embedding copies last. */
function fileTensors(
  plan: ConversionPlan,
  tp: number,
  pp: number,
  ep: number,
  naming: MegatronNaming,
): FileTensor[] {
  const out: FileTensor[] = [];
  for (const t of plan.tensors) {
    if (t.stage !== pp) continue;
    const pieces = rankPieces(t, tp, ep);
    if (pieces.length > 0) out.push({ t, pieces, at: localPlace(plan, t, ep, naming), copy: false });
  }
  const emb = plan.tensors.find((t) => t.name === 'embedding.word_embeddings.weight');
  if (!emb) return out;
  const { stages, vpp } = plan.pipeline;
  stages.forEach((s) => {
    if (s.ppRank !== pp || s.embedding) return;
    const chunk = chunkKey(s.vpStage, vpp);
    const pieces = rankPieces(emb, tp, ep);
    if (s.loss && !plan.config.untieEmbeddingsAndOutputWeights) {
      out.push({ t: emb, pieces, at: { chunk, name: 'output_layer.weight' }, copy: true });
    }
    if (s.mtpLayers.length > 0) {
      out.push({ t: emb, pieces, at: { chunk, name: 'embedding.word_embeddings.weight' }, copy: true });
    }
  });
  return out;
}

function localShape(pieces: readonly PlannedPiece[]): number[] {
  const s = [...pieces[0].shape];
  for (const p of pieces.slice(1)) s[0] += p.shape[0];
  return s;
}

/**
 * `over` on top of `base` (sizes), for the model `cfg`: a new TP size brings its own expert TP
 * (Megatron's default, etp = tp) unless `over` sets one; the pipeline split is `over`'s alone.
 */
function mergedLayout(
  base: { tp: number; pp: number; ep: number; etp?: number },
  over: Partial<ParallelLayout> | undefined,
  cfg: TransformerConfig,
): ParallelLayout {
  const o = over ?? {};
  const etp = o.etp ?? (o.tp !== undefined || !cfg.moe ? undefined : base.etp);
  return resolveLayout({
    tp: base.tp,
    pp: base.pp,
    ep: base.ep,
    ...o,
    ...(etp !== undefined ? { etp } : {}),
  });
}

function checkExpertTp(layout: ParallelLayout, cfg: TransformerConfig): void {
  if (cfg.moe && layout.etp !== layout.tp) {
    throw new ConvertError(
      'UNSUPPORTED',
      `expert tensor parallel size ${layout.etp} differs from tp=${layout.tp}: the legacy torch format is read and written with etp = tp only`,
    );
  }
}

// ---------------------------------------------------------------------------------------------
// Reading

/**
 * A Megatron legacy (`torch` format) checkpoint, read as the global tensors of a megapatch
 * checkpoint of the same model ({@link TensorSource}): each slice is gathered from the rank files
 * that hold it, reading only the rows it needs.
 */
export class MegatronLegacyView extends MegatronPlanView {
  /** Training iteration recorded in the files. */
  readonly iteration: number;
  /** The `args` Megatron saved (attribute name → value). */
  readonly args: Map<string, unknown>;
  readonly plan: ConversionPlan;
  readonly naming: Required<MegatronNaming>;
  /** The layout of the rank files (from the args). */
  get layout(): ParallelLayout {
    return this.plan.layout;
  }
  /** The folder read (`iter_NNNNNNN` or `release`). */
  readonly dir: string;
  private readonly files = new Map<string, TorchFile>();
  private readonly chunks = new Map<string, Map<string, Map<string, TorchTensor>>>();

  private constructor(dir: string, cfg: TransformerConfig, hfConfig: string) {
    super();
    this.dir = dir;
    try {
      const ranks = fs
        .readdirSync(dir)
        .map((n) => MEGATRON_RANK_DIR.exec(n))
        .filter((m): m is RegExpExecArray => m !== null);
      if (ranks.length === 0) {
        throw new ConvertError(
          'MISSING_FILE',
          'no mp_rank_* folders: not a Megatron torch-format checkpoint',
          dir,
        );
      }
      const first = this.open(ranks.map((m) => m[0]).sort()[0]);
      const root = first.root as Map<unknown, unknown>;
      this.args = argsOf(root);
      // virtual stages: from args, else from the model chunks saved (model0, model1, …)
      const chunks = [...root.keys()].filter((k) => typeof k === 'string' && /^model\d+$/.test(k)).length;
      const { layout, model } = megatronModelOfArgs(this.args, cfg, hfConfig, first.file, chunks);
      this.iteration = num(root.get('iteration')) ?? 0;
      checkExpertTp(layout, model);
      this.plan = planConversion(parseHfConfig(hfConfig).spec, model, layout);
      const want = new Set<string>();
      for (let tp = 0; tp < layout.tp; tp++)
        for (let pp = 0; pp < layout.pp; pp++)
          for (let ep = 0; ep < layout.ep; ep++) want.add(megatronRankDirName({ tp, pp, ep }, layout));
      const have = new Set(ranks.map((m) => m[0]));
      const missing = [...want].filter((n) => !have.has(n));
      if (missing.length > 0) {
        throw new ConvertError(
          'MISSING_FILE',
          `args say tp=${layout.tp} pp=${layout.pp} ep=${layout.ep}, but ${missing.slice(0, 3).join(', ')}${missing.length > 3 ? ', …' : ''} is missing`,
          dir,
        );
      }
      const grouped = [...this.chunkTensors(0, 0, 0).values()].some((m) =>
        [...m.keys()].some((k) => /\.experts\.linear_fc[12]\.weight\d+$/.test(k)),
      );
      // local spec: the plan has norms TE fuses into a linear, and the file has none of those names
      const fused = (k: string) => LOCAL_NORMS.some(([te]) => k.endsWith(te));
      const local =
        this.plan.tensors.some((t) => fused(t.name)) &&
        ![...this.chunkTensors(0, 0, 0).values()].some((m) => [...m.keys()].some(fused));
      this.naming = { transformerImpl: local ? 'local' : 'transformer_engine', moeGroupedGemm: grouped };
      this.checkNames();
    } catch (e) {
      this.close();
      throw e;
    }
  }

  /**
   * Opens `dir` (a checkpoint root with `latest_checkpointed_iteration.txt`, or an `iter_*`
   * folder) for the model of the Hugging Face config `hfConfig` (config.json or its folder).
   */
  static open(dir: string, hfConfig: string, opts: { iteration?: number } = {}): MegatronLegacyView {
    const iterDir = megatronIterationDir(dir, opts.iteration);
    if (!fs.existsSync(iterDir)) throw new ConvertError('MISSING_FILE', 'no such iteration folder', iterDir);
    const cfg = parseHfConfig(hfConfig).transformerConfig;
    return new MegatronLegacyView(iterDir, cfg, hfConfig);
  }

  private open(rankDir: string): TorchFile {
    let f = this.files.get(rankDir);
    if (!f) {
      const file = path.join(this.dir, rankDir, MEGATRON_RANK_FILE);
      if (!fs.existsSync(file))
        throw new ConvertError('MISSING_FILE', `no ${MEGATRON_RANK_FILE}`, path.join(this.dir, rankDir));
      f = TorchFile.open(file);
      if (!(f.root instanceof Map)) {
        f.close();
        throw new ConvertError(
          'INVALID_FORMAT',
          'does not hold a dict: not a Megatron checkpoint file',
          file,
        );
      }
      this.files.set(rankDir, f);
    }
    return f;
  }

  /** Model chunk key → (local name → tensor) of one rank's file, `_extra_state` entries left out. */
  private chunkTensors(tp: number, pp: number, ep: number): Map<string, Map<string, TorchTensor>> {
    const rankDir = megatronRankDirName({ tp, pp, ep }, this.plan.layout);
    let c = this.chunks.get(rankDir);
    if (c) return c;
    const f = this.open(rankDir);
    c = new Map();
    for (const [k, v] of f.root as Map<unknown, unknown>) {
      if (typeof k !== 'string' || !/^model\d*$/.test(k) || !(v instanceof Map)) continue;
      const m = new Map<string, TorchTensor>();
      for (const [name, t] of v) {
        if (typeof name !== 'string' || name.endsWith('_extra_state')) continue;
        if (t === null || typeof t !== 'object' || !('storageKey' in t)) {
          throw new ConvertError('INVALID_FORMAT', `${k}.${name} is not a tensor`, f.file);
        }
        m.set(name, t as TorchTensor);
      }
      c.set(k, m);
    }
    this.chunks.set(rankDir, c);
    return c;
  }

  /** Checks every rank file holds exactly its planned tensors with their local shapes and one dtype each. */
  private checkNames(): void {
    const { tp: TP, pp: PP, ep: EP } = this.plan.layout;
    for (let tp = 0; tp < TP; tp++)
      for (let pp = 0; pp < PP; pp++)
        for (let ep = 0; ep < EP; ep++) {
          const chunks = this.chunkTensors(tp, pp, ep);
          const file = path.join(
            this.dir,
            megatronRankDirName({ tp, pp, ep }, this.plan.layout),
            MEGATRON_RANK_FILE,
          );
          const seen = new Set<string>();
          for (const { t, pieces, at } of fileTensors(this.plan, tp, pp, ep, this.naming)) {
            const got = chunks.get(at.chunk)?.get(at.name);
            if (!got) {
              throw new ConvertError(
                'MISSING_TENSOR',
                `no ${at.chunk}.${at.name} (megapatch ${t.name})`,
                file,
              );
            }
            seen.add(`${at.chunk}/${at.name}`);
            const want = localShape(pieces);
            if (got.shape.join(',') !== want.join(',')) {
              throw new ConvertError(
                'SHAPE_MISMATCH',
                `${at.chunk}.${at.name} has shape [${got.shape.join(',')}], the model and layout imply [${want.join(',')}]`,
                file,
              );
            }
            const d = this.dtypes.get(t.name);
            if (d && d !== got.dtype) {
              throw new ConvertError(
                'INVALID_FORMAT',
                `${at.name} is ${got.dtype} here and ${d} on another rank`,
                file,
              );
            }
            this.dtypes.set(t.name, got.dtype);
          }
          const extra = [...chunks].flatMap(([c, m]) =>
            [...m.keys()].filter((n) => !seen.has(`${c}/${n}`)).map((n) => `${c}.${n}`),
          );
          if (extra.length > 0) {
            throw this.notPartOfModel(extra, file);
          }
        }
  }

  /** The box [offsets, offsets + shape) of a global tensor, row-major bytes, from the rank files. */
  readSlice(name: string, offsets: readonly number[], shape: readonly number[]): Uint8Array {
    const t = this.tensor(name);
    const dtype = this.dtypes.get(name) as SafetensorsDtype;
    const esz = DTYPE_SIZE[dtype];
    const rank = shape.length;
    if (rank === 0) return this.pieceRows(t, 0, 0, 1);
    const inner = numelOf(shape.slice(2)) * esz;
    const cols = rank > 1 ? shape[1] : 1;
    const out = new Uint8Array(numelOf(shape) * esz);
    const rowOut = cols * (rank > 1 ? inner : esz);
    t.pieces.forEach((p, k) => {
      const r0 = Math.max(offsets[0], p.offsets[0]);
      const r1 = Math.min(offsets[0] + shape[0], p.offsets[0] + p.shape[0]);
      if (r1 <= r0) return;
      const c0 = rank > 1 ? Math.max(offsets[1], p.offsets[1]) : 0;
      const c1 = rank > 1 ? Math.min(offsets[1] + shape[1], p.offsets[1] + p.shape[1]) : 1;
      if (c1 <= c0) return;
      const rows = this.pieceRows(t, k, r0 - p.offsets[0], r1 - r0);
      const pRow = rank > 1 ? p.shape[1] * inner : esz;
      for (let r = 0; r < r1 - r0; r++) {
        const src = rows.subarray(
          r * pRow + (rank > 1 ? (c0 - p.offsets[1]) * inner : 0),
          r * pRow + (rank > 1 ? (c1 - p.offsets[1]) * inner : esz),
        );
        out.set(src, (r0 - offsets[0] + r) * rowOut + (rank > 1 ? (c0 - offsets[1]) * inner : 0));
      }
    });
    return out;
  }

  /** Rows [a, a + n) of piece k of `t`, from the rank file that holds it. */
  private pieceRows(t: MegatronTensorPlan, k: number, a: number, n: number): Uint8Array {
    const p = t.pieces[k];
    const tp = t.partition === 'replicate' ? 0 : p.rank.tp;
    const ep = t.expert !== undefined ? p.rank.ep : 0;
    const at = localPlace(this.plan, t, ep, this.naming);
    const local = this.chunkTensors(tp, t.stage, ep).get(at.chunk)?.get(at.name) as TorchTensor;
    // rows of this rank's earlier pieces come first in its local tensor
    let base = 0;
    for (const q of rankPieces(t, tp, ep)) {
      if (q === p) break;
      base += q.shape[0];
    }
    const f = this.open(megatronRankDirName({ tp, pp: t.stage, ep }, this.plan.layout));
    if (local.shape.length === 0) return f.read(local);
    return f.readRows(local, base + a, n);
  }

  close(): void {
    for (const f of this.files.values()) f.close();
    this.files.clear();
    this.chunks.clear();
  }
}

/**
 * The iteration folder of the Megatron-LM checkpoint at `dir` (its root with the tracker file, or an
 * `iter_NNNNNNN` / `release` folder) in either format, or null when `dir` holds none.
 */
export function megatronCheckpointDir(dir: string, iteration?: number): string | null {
  let iterDir: string;
  try {
    iterDir = megatronIterationDir(dir, iteration);
  } catch {
    return null;
  }
  return megatronCheckpointFormat(iterDir) === null ? null : iterDir;
}

/**
 * A Megatron-LM checkpoint in either format (`torch`: {@link MegatronLegacyView}, `torch_dist`:
 * {@link MegatronDistView}), read as the global megapatch tensors of the model that `hfConfig`
 * (config.json or its folder) describes.
 */
export function openMegatronCheckpoint(
  dir: string,
  hfConfig: string,
  opts: { iteration?: number } = {},
): MegatronLegacyView | MegatronDistView {
  const iterDir = megatronIterationDir(dir, opts.iteration);
  if (!fs.existsSync(iterDir)) throw new ConvertError('MISSING_FILE', 'no such iteration folder', iterDir);
  return megatronCheckpointFormat(iterDir) === 'torch_dist'
    ? MegatronDistView.open(iterDir, hfConfig)
    : MegatronLegacyView.open(iterDir, hfConfig);
}

/** Options of {@link convertMegatronToMegapatch}. */
export interface MegatronToMegapatchOptions extends CommonConvertOptions {
  /**
   * Megatron checkpoint (`torch` or `torch_dist` format): its root (with
   * latest_checkpointed_iteration.txt) or an `iter_NNNNNNN` folder.
   */
  readonly input: string;
  /** Hugging Face folder of the model: config.json (required), tokenizer and generation files (kept). */
  readonly hfDir: string;
  /** Root directory of the megapatch checkpoint to write. */
  readonly output: string;
  /** Megatron iteration to read (default: the tracker's). */
  readonly iteration?: number;
  /** Layout of the megapatch checkpoint (default: the Megatron checkpoint's). */
  readonly layout?: Partial<ParallelLayout>;
}

/**
 * Megatron-LM checkpoint → megapatch checkpoint (the model weights; iteration and consumed samples
 * recorded), from either format: the legacy `torch` one ({@link MegatronLegacyView}) or
 * `torch_dist` ({@link MegatronDistView}), told apart by the iteration folder's files. Side files
 * come from `hfDir`, as for {@link convertHfToMegapatch}.
 */
export async function convertMegatronToMegapatch(
  opts: MegatronToMegapatchOptions,
): Promise<ConversionSummary> {
  const t0 = performance.now();
  opts.signal?.throwIfAborted();
  const chunkBytes = opts.chunkBytes ?? DEFAULT_CHUNK;
  checkOutputApart(opts.output, opts.input);
  const view = openMegatronCheckpoint(opts.input, opts.hfDir, {
    ...(opts.iteration !== undefined ? { iteration: opts.iteration } : {}),
  });
  try {
    const src = view.plan;
    const layout = opts.layout ? mergedLayout(view.layout, opts.layout, src.config) : view.layout;
    const plan = planConversion(src.spec, src.config, layout);
    if (view instanceof MegatronLegacyView) checkExpertTp(layout, src.config);
    checkCheckpointTarget(path.join(opts.output, iterationDirName(view.iteration)), opts.overwrite);
    const planned: PlannedTensor[] = plan.tensors.map((t) => {
      const stored = view.info(t.name).dtype;
      const dtype = t.fixedDtype ?? (opts.dtype && isFloatDtype(stored) ? opts.dtype : stored);
      return { name: t.name, dtype, globalShape: t.globalShape, pieces: t.pieces };
    });
    const total = planned.reduce((s, t) => s + numelOf(t.globalShape) * DTYPE_SIZE[t.dtype], 0);
    const progress = new Progress(total, opts.onProgress);
    const files = sideFiles(opts.hfDir);
    const consumed = num(view.args.get('consumed_train_samples'));
    const options: CheckpointWriterOptions = {
      layout: { ...layout, dp: 1 },
      modelConfig: src.config as unknown as Record<string, unknown>,
      architecture: src.spec.architectures[0],
      huggingface: { files: [] },
      ...(consumed !== undefined ? { consumedSamples: consumed } : {}),
      ...(files.some((f) => TOKENIZER_FILE.test(f))
        ? { tokenizer: { files: files.filter((f) => TOKENIZER_FILE.test(f)) } }
        : {}),
    };
    const writer = new CheckpointStreamWriter(opts.output, view.iteration, options, planned);
    try {
      for (const f of files) writer.addFile(f, fs.readFileSync(path.join(opts.hfDir, f)));
      const from = new Map(planned.map((t) => [t.name, view.info(t.name).dtype]));
      await streamTensors(writer, planned, view, from, progress, chunkBytes, opts.signal);
      writer.finalize();
    } catch (e) {
      writer.abort();
      throw e;
    }
    const parameters = planParameters(plan);
    return summaryOf(opts.output, planned, parameters, total, t0, files);
  } finally {
    view.close();
  }
}

/** A tensor of a Megatron checkpoint as stored: its name, dtype, shape and how many parts hold it. */
export interface MegatronStoredTensor {
  /** torch_dist: the key; torch: `<model chunk>.<local name>` of the rank files. */
  readonly name: string;
  readonly dtype: SafetensorsDtype;
  /** torch_dist: the global size; torch: the local shape in the first rank file that holds it. */
  readonly shape: readonly number[];
  /** torch_dist: chunks; torch: rank files. */
  readonly parts: number;
}

/** What a Megatron-LM checkpoint holds, read from its files without a model to check it against. */
export interface MegatronCheckpointInfo {
  readonly format: 'torch' | 'torch_dist';
  /** The iteration folder. */
  readonly dir: string;
  readonly iteration: number;
  /** The saved args (numbers, strings, booleans and null; other values as their text). */
  readonly args: Record<string, unknown>;
  /** The parallel layout the args record. */
  readonly layout: { tp: number; pp: number; ep: number; etp: number; vpp: number };
  readonly files: number;
  readonly bytes: number;
  /** The model's tensors (optimizer state and `_extra_state` entries left out). */
  readonly tensors: readonly MegatronStoredTensor[];
  /** Whether optimizer state is saved beside the model. */
  readonly optimizer: boolean;
}

/** Every file under `dir` with its size. */
function filesUnder(dir: string): number[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = path.join(dir, e.name);
    return e.isDirectory() ? filesUnder(p) : e.isFile() ? [fs.statSync(p).size] : [];
  });
}

/** A saved arg as plain data. */
function plainArg(v: unknown): unknown {
  if (v === null || ['number', 'string', 'boolean'].includes(typeof v)) return v;
  if (typeof v === 'bigint') return Number(v);
  if (v instanceof PyFloat) return v.value;
  if (v instanceof PyGlobal) return `${v.module}.${v.name}`;
  if (Array.isArray(v) && v.every((x) => x === null || ['number', 'string', 'boolean'].includes(typeof x)))
    return [...v];
  return String(v instanceof PyObject ? `${v.module}.${v.name}(...)` : v);
}

/**
 * Reads what the Megatron-LM checkpoint at `dir` (root or iteration folder, either format) holds:
 * the args, the layout, the files, and the model's tensors as stored.
 */
export function inspectMegatronCheckpoint(
  dir: string,
  opts: { iteration?: number } = {},
): MegatronCheckpointInfo {
  const iterDir = megatronCheckpointDir(dir, opts.iteration);
  if (iterDir === null) {
    throw new ConvertError(
      'INVALID_FORMAT',
      'is not a Megatron-LM checkpoint (torch or torch_dist format)',
      dir,
    );
  }
  const format = megatronCheckpointFormat(iterDir) as 'torch' | 'torch_dist';
  const sizes = filesUnder(iterDir);
  let root: Map<unknown, unknown>;
  let tensors: MegatronStoredTensor[];
  let optimizer: boolean;
  if (format === 'torch_dist') {
    const common = path.join(iterDir, MEGATRON_COMMON_FILE);
    if (!fs.existsSync(common)) throw new ConvertError('MISSING_FILE', `no ${MEGATRON_COMMON_FILE}`, iterDir);
    {
      using f = TorchFile.open(common);
      root = f.root instanceof Map ? f.root : new Map();
    }
    using dcp = DcpCheckpoint.open(iterDir);
    const keys = [...dcp.tensors.values()];
    optimizer = keys.some((t) => t.key.startsWith('optimizer.')) || root.has('optimizer');
    tensors = keys
      .filter((t) => !t.key.startsWith('optimizer.'))
      .map((t) => ({ name: t.key, dtype: t.dtype, shape: t.size, parts: t.chunks.length }));
  } else {
    const ranks = fs
      .readdirSync(iterDir)
      .filter((n) => MEGATRON_RANK_DIR.test(n))
      .sort();
    const byName = new Map<string, MegatronStoredTensor>();
    root = new Map();
    optimizer = false;
    for (const [i, rank] of ranks.entries()) {
      using f = TorchFile.open(path.join(iterDir, rank, MEGATRON_RANK_FILE));
      if (!(f.root instanceof Map)) throw new ConvertError('INVALID_FORMAT', 'does not hold a dict', f.file);
      if (i === 0) root = f.root;
      optimizer ||=
        f.root.get('optimizer') instanceof Map &&
        (f.root.get('optimizer') as Map<unknown, unknown>).has('state');
      for (const [k, v] of f.root) {
        if (typeof k !== 'string' || !/^model\d*$/.test(k) || !(v instanceof Map)) continue;
        for (const [n, t] of v) {
          if (typeof n !== 'string' || n.endsWith('_extra_state') || !(t instanceof TorchTensor)) continue;
          const name = `${k}.${n}`;
          const had = byName.get(name);
          byName.set(
            name,
            had ? { ...had, parts: had.parts + 1 } : { name, dtype: t.dtype, shape: t.shape, parts: 1 },
          );
        }
      }
    }
    tensors = [...byName.values()];
  }
  const argMap = argsOf(root);
  const args = Object.fromEntries([...argMap].map(([k, v]) => [k, plainArg(v)]));
  const a = (k: string) => num(argMap.get(k));
  const tp = a('tensor_model_parallel_size') ?? 1;
  return {
    format,
    dir: iterDir,
    iteration: num(root.get('iteration')) ?? 0,
    args,
    layout: {
      tp,
      pp: a('pipeline_model_parallel_size') ?? 1,
      ep: a('expert_model_parallel_size') ?? 1,
      etp: a('expert_tensor_parallel_size') ?? tp,
      vpp: a('virtual_pipeline_model_parallel_size') ?? 1,
    },
    files: sizes.length,
    bytes: sizes.reduce((x, y) => x + y, 0),
    tensors,
    optimizer,
  };
}

/** Options of {@link convertMegatronToHf}. */
export interface MegatronToHfOptions extends CommonConvertOptions {
  /** Megatron checkpoint (`torch` or `torch_dist` format): its root or an `iter_NNNNNNN` folder. */
  readonly input: string;
  /**
   * Hugging Face folder of the model: config.json (required) and the tokenizer and generation
   * files, copied; where it holds the weights too, each tensor is written in their dtype.
   */
  readonly hfDir: string;
  /** Hugging Face folder to write. */
  readonly output: string;
  /** Megatron iteration to read (default: the tracker's). */
  readonly iteration?: number;
  /** Largest shard file (default '5GB', as transformers). */
  readonly maxShardSize?: number | string;
}

/**
 * Megatron-LM checkpoint (either format) → Hugging Face folder (sharded safetensors), streaming
 * from the rank files or chunks without an intermediate megapatch checkpoint: Pai-Megatron-Patch's
 * mcore2hf. Side files come from `hfDir` (config.json written for the dtype exported).
 */
export async function convertMegatronToHf(opts: MegatronToHfOptions): Promise<ConversionSummary> {
  const t0 = performance.now();
  opts.signal?.throwIfAborted();
  checkOutputApart(opts.output, opts.input);
  checkOutputApart(opts.output, opts.hfDir);
  const view = openMegatronCheckpoint(opts.input, opts.hfDir, {
    ...(opts.iteration !== undefined ? { iteration: opts.iteration } : {}),
  });
  try {
    checkExportTarget(opts.output, opts.overwrite);
    const plan = planConversion(view.plan.spec, view.plan.config, {});
    const stored = new Map(plan.tensors.map((t) => [t.name, view.info(t.name).dtype]));
    // the HF folder's own dtypes, where it holds the weights (an F32 router bias among BF16 weights)
    const recorded: Record<string, SafetensorsDtype> = {};
    const weights = plan.hfTensors.length > 0 ? hfWeightDtypes(opts.hfDir) : new Map();
    for (const h of plan.hfTensors) {
      const d = weights.get(h.name);
      if (d && isFloatDtype(d) && !opts.dtype) recorded[h.name] = d;
    }
    const files = sideFiles(opts.hfDir);
    return await writeHfFolder(
      {
        source: view,
        plan,
        stored,
        recorded,
        sideFiles: (dir, dtypes) => {
          writeSideFiles(opts.hfDir, files, dir, dtypes);
          return files;
        },
        marker: { checkpoint: path.resolve(opts.input), iteration: view.iteration },
      },
      { ...opts, chunkBytes: opts.chunkBytes ?? DEFAULT_CHUNK },
      t0,
    );
  } finally {
    view.close();
  }
}

/** Name → dtype of the weights in `hfDir` (safetensors or PyTorch; empty when it holds none). */
function hfWeightDtypes(hfDir: string): Map<string, SafetensorsDtype> {
  let st: HfWeights;
  try {
    st = openHfWeights(hfDir);
  } catch (e) {
    if (e instanceof ConvertError && e.code === 'MISSING_FILE') return new Map();
    throw e;
  }
  try {
    return new Map(st.keys().map((k) => [k, st.info(k).dtype]));
  } finally {
    st.close();
  }
}

// ---------------------------------------------------------------------------------------------
// Writing

/** Options of {@link convertMegapatchToMegatron}. */
export interface MegapatchToMegatronOptions extends CommonConvertOptions, MegatronNaming {
  /** Root directory of the megapatch checkpoint. */
  readonly input: string;
  /** Megatron checkpoint root to write (`iter_NNNNNNN/mp_rank_*` and the tracker file). */
  readonly output: string;
  /** Iteration to export (default: latest). */
  readonly iteration?: number;
  /** Layout of the Megatron checkpoint (default: the megapatch checkpoint's). */
  readonly layout?: Partial<ParallelLayout>;
  /** Check each piece's SHA-256 before using it (default true). */
  readonly verifyChecksums?: boolean;
  /** `--seq-length` recorded in args (default: the model's max position embeddings, at most 4096). */
  readonly seqLength?: number;
}

const TORCH_DTYPE: Partial<Record<SafetensorsDtype, string>> = {
  BF16: 'bfloat16',
  F16: 'float16',
  F32: 'float32',
};

/** The training arguments Megatron checks and reads back from a checkpoint (`--use-checkpoint-args`). */
function megatronArgs(
  cfg: TransformerConfig,
  layout: ParallelLayout,
  naming: Required<MegatronNaming>,
  dtype: SafetensorsDtype,
  iteration: number,
  consumed: number,
  seqLength: number,
): PyObject {
  const moe = cfg.moe;
  const mla = cfg.mla;
  const rope = cfg.ropeScaling;
  const entries: [string, unknown][] = [
    ['num_layers', cfg.numLayers],
    ['hidden_size', cfg.hiddenSize],
    ['ffn_hidden_size', cfg.ffnHiddenSize],
    ['num_attention_heads', cfg.numAttentionHeads],
    ['group_query_attention', cfg.numQueryGroups !== cfg.numAttentionHeads],
    ['num_query_groups', cfg.numQueryGroups],
    ['kv_channels', cfg.kvChannels],
    ['max_position_embeddings', cfg.maxPositionEmbeddings],
    ['seq_length', seqLength],
    ['position_embedding_type', 'rope'],
    ['add_position_embedding', false],
    ['rotary_base', cfg.rotaryBase],
    ['rotary_percent', new PyFloat(cfg.rotaryPercent)],
    // RoPE scaling as Megatron's flags give it: Llama 3.1's (--use-rope-scaling), linear position
    // interpolation, MLA's YaRN (--rope-type yarn); longrope has no Megatron counterpart
    ['use_rope_scaling', rope.type === 'llama3'],
    ['rope_scaling_factor', new PyFloat(rope.type === 'llama3' ? rope.factor : 8)],
    ['rotary_seq_len_interpolation_factor', rope.type === 'linear' ? new PyFloat(rope.factor) : null],
    ['rope_type', mla ? (rope.type === 'yarn' ? 'yarn' : 'rope') : null],
    ['rotary_scaling_factor', new PyFloat(rope.type === 'yarn' ? rope.factor : 1)],
    ['mscale', new PyFloat(rope.type === 'yarn' ? rope.mscale : 1)],
    ['mscale_all_dim', new PyFloat(rope.type === 'yarn' ? rope.mscaleAllDim : 0)],
    ['normalization', cfg.normalization],
    ['norm_epsilon', new PyFloat(cfg.layernormEpsilon)],
    ['swiglu', true],
    ['add_bias_linear', false],
    ['add_qkv_bias', cfg.addQkvBias],
    ['qk_layernorm', cfg.qkLayernorm],
    ['untie_embeddings_and_output_weights', cfg.untieEmbeddingsAndOutputWeights],
    ['vocab_size', cfg.vocabSize],
    ['make_vocab_size_divisible_by', cfg.makeVocabSizeDivisibleBy],
    ['padded_vocab_size', paddedVocabSize(cfg.vocabSize, cfg.makeVocabSizeDivisibleBy, layout.tp)],
    ['tokenizer_type', 'HuggingFaceTokenizer'],
    ['tensor_model_parallel_size', layout.tp],
    ['pipeline_model_parallel_size', layout.pp],
    ['virtual_pipeline_model_parallel_size', (layout.vpp ?? 1) > 1 ? layout.vpp : null],
    ['decoder_first_pipeline_num_layers', layout.decoderFirstPipelineNumLayers ?? null],
    ['decoder_last_pipeline_num_layers', layout.decoderLastPipelineNumLayers ?? null],
    ['pipeline_model_parallel_layout', layout.pipelineModelParallelLayout ?? null],
    ['expert_model_parallel_size', layout.ep],
    ['expert_tensor_parallel_size', layout.etp],
    ['transformer_impl', naming.transformerImpl],
    ['moe_grouped_gemm', naming.moeGroupedGemm],
    ['num_experts', moe ? moe.numExperts : null],
    ['moe_router_topk', moe ? moe.routerTopk : 2],
    ['moe_ffn_hidden_size', moe ? moe.moeFfnHiddenSize : null],
    [
      'moe_shared_expert_intermediate_size',
      moe && moe.sharedExpertIntermediateSize > 0 ? moe.sharedExpertIntermediateSize : null,
    ],
    ['moe_router_score_function', moe ? moe.scoreFunction : 'softmax'],
    ['moe_router_enable_expert_bias', moe ? moe.expertBias : false],
    ['multi_latent_attention', mla !== null],
    ['q_lora_rank', mla ? mla.qLoraRank : null],
    ['kv_lora_rank', mla ? mla.kvLoraRank : 32],
    ['qk_head_dim', mla ? mla.qkNopeHeadDim : 128],
    ['qk_pos_emb_head_dim', mla ? mla.qkRopeHeadDim : 64],
    ['v_head_dim', mla ? mla.vHeadDim : 128],
    ['mtp_num_layers', cfg.mtpNumLayers > 0 ? cfg.mtpNumLayers : null],
    ['params_dtype', new PyGlobal('torch', TORCH_DTYPE[dtype] ?? 'float32')],
    ['bf16', dtype === 'BF16'],
    ['fp16', dtype === 'F16'],
    ['ckpt_format', 'torch'],
    ['use_dist_ckpt', false],
    ['iteration', iteration],
    ['consumed_train_samples', consumed],
    ['consumed_valid_samples', 0],
    ['skipped_train_samples', 0],
  ];
  return new PyObject('argparse', 'Namespace', [], new Map(entries));
}

/**
 * megapatch checkpoint → Megatron legacy (`--ckpt-format torch`) checkpoint, in the given layout:
 * one `model_optim_rng.pt` per (TP, PP, EP) rank with `args`, `checkpoint_version` 3.0,
 * `iteration` and the model state dict under local names. Written to a temporary folder and
 * renamed, then the tracker file is updated.
 */
export async function convertMegapatchToMegatron(
  opts: MegapatchToMegatronOptions,
): Promise<ConversionSummary> {
  const t0 = performance.now();
  opts.signal?.throwIfAborted();
  const chunkBytes = opts.chunkBytes ?? DEFAULT_CHUNK;
  checkOutputApart(opts.output, opts.input);
  const { ckpt, spec, cfg } = openWithSpec(opts.input, opts.iteration, opts.verifyChecksums);
  const iteration = ckpt.metadata.iteration;
  const target = path.join(opts.output, iterationDirName(iteration));
  const tmp = `${target}.tmp-${process.pid}`;
  let tmpMade = false;
  try {
    const have = ckpt.metadata.layout;
    const layout = mergedLayout(have, opts.layout, cfg);
    checkExpertTp(layout, cfg);
    const plan = planConversion(spec, cfg, layout);
    const naming: Required<MegatronNaming> = {
      transformerImpl: opts.transformerImpl ?? 'transformer_engine',
      moeGroupedGemm: opts.moeGroupedGemm ?? false,
    };
    if (fs.existsSync(target)) {
      const foreign = fs.readdirSync(target).filter((n) => !MEGATRON_RANK_DIR.test(n));
      if (!opts.overwrite || foreign.length > 0) {
        throw new ConvertError(
          'INVALID_ARGUMENT',
          opts.overwrite
            ? `holds ${foreign.slice(0, 3).join(', ')}, not only mp_rank_* folders; refusing to replace it`
            : 'exists; pass overwrite (--overwrite) to replace it',
          target,
        );
      }
    }
    const dtypes = new Map<string, { from: SafetensorsDtype; to: SafetensorsDtype }>();
    for (const t of plan.tensors) {
      const stored = ckpt.info(t.name).dtype;
      dtypes.set(t.name, {
        from: stored,
        to: t.fixedDtype ?? (opts.dtype && isFloatDtype(stored) ? opts.dtype : stored),
      });
    }
    const modelDtype = (opts.dtype ??
      dtypes.get('embedding.word_embeddings.weight')?.to ??
      'BF16') as SafetensorsDtype;
    const args = megatronArgs(
      cfg,
      layout,
      naming,
      modelDtype,
      iteration,
      ckpt.metadata.consumedSamples ?? 0,
      opts.seqLength ?? Math.min(cfg.maxPositionEmbeddings, 4096),
    );
    let total = 0;
    const ranks: { tp: number; pp: number; ep: number }[] = [];
    for (let tp = 0; tp < layout.tp; tp++)
      for (let pp = 0; pp < layout.pp; pp++)
        for (let ep = 0; ep < layout.ep; ep++) ranks.push({ tp, pp, ep });
    const work = ranks.map((r) => {
      const items = fileTensors(plan, r.tp, r.pp, r.ep, naming);
      for (const x of items) {
        total += numelOf(localShape(x.pieces)) * DTYPE_SIZE[dtypes.get(x.t.name)?.to as SafetensorsDtype];
      }
      return { r, items };
    });
    const progress = new Progress(total, opts.onProgress);
    fs.rmSync(tmp, { recursive: true, force: true });
    fs.mkdirSync(tmp, { recursive: true });
    tmpMade = true;
    for (const { r, items } of work) {
      const dir = path.join(tmp, megatronRankDirName(r, layout));
      fs.mkdirSync(dir);
      const w = new TorchFileWriter(path.join(dir, MEGATRON_RANK_FILE));
      try {
        const refs: TorchTensorRef[] = [];
        const chunks = new Map<string, Map<string, TorchTensorRef>>();
        for (let v = 0; v < plan.pipeline.vpp; v++) chunks.set(chunkKey(v, plan.pipeline.vpp), new Map());
        for (const x of items) {
          const ref = w.tensor(dtypes.get(x.t.name)?.to as SafetensorsDtype, localShape(x.pieces));
          refs.push(ref);
          chunks.get(x.at.chunk)?.set(x.at.name, ref);
        }
        const root = new Map<string, unknown>([
          ['args', args],
          ['checkpoint_version', new PyFloat(3)],
          ['iteration', iteration],
          ...[...chunks],
        ]);
        w.writeRoot(root);
        for (let i = 0; i < items.length; i++) {
          const { t, pieces } = items[i];
          const d = dtypes.get(t.name) as { from: SafetensorsDtype; to: SafetensorsDtype };
          for (const p of pieces) {
            if (p.shape.length === 0) {
              w.write(refs[i], castElements(ckpt.read(t.name), d.from, d.to, t.name));
              continue;
            }
            const step = Math.max(1, Math.floor(chunkBytes / Math.max(1, rowBytesOf(p.shape, d.from))));
            for (let a = 0; a < p.shape[0]; a += step) {
              const n = Math.min(step, p.shape[0] - a);
              const data = readPaddedBox(
                ckpt,
                t.name,
                [p.offsets[0] + a, ...p.offsets.slice(1)],
                [n, ...p.shape.slice(1)],
              );
              const out = castElements(data, d.from, d.to, t.name);
              w.write(refs[i], out);
              progress.add(t.name, out.byteLength);
              await pause(opts.signal);
            }
          }
        }
        w.finish();
      } catch (e) {
        w.abort();
        throw e;
      }
    }
    commitDir(tmp, target);
    tmpMade = false;
    const tracker = path.join(opts.output, MEGATRON_TRACKER_FILE);
    fs.writeFileSync(`${tracker}.tmp-${process.pid}`, String(iteration));
    fs.renameSync(`${tracker}.tmp-${process.pid}`, tracker);
    const parameters = planParameters(plan);
    return {
      output: opts.output,
      tensors: plan.tensors.length,
      parameters,
      bytes: total,
      files: ranks.length,
      seconds: (performance.now() - t0) / 1000,
      carried: [],
    };
  } finally {
    if (tmpMade) fs.rmSync(tmp, { recursive: true, force: true });
    ckpt.close();
  }
}
