// Pipeline stages with Megatron-Core's semantics: which global decoder layers, MTP layers,
// embedding and loss each (pipeline rank, virtual stage) holds. Three ways to cut: an even split,
// uneven first/last ranks (--decoder-first/last-pipeline-num-layers, the rest split evenly over
// the middle ranks) and an explicit --pipeline-model-parallel-layout string such as
// "E|t*5|t*6|t,m,L". Pure: the converter, the model builder and the schedules share it.
import { ConvertError } from './errors.js';

/**
 * A symbol of a pipeline layout string: `E` embedding, `t` decoder ("transformer") layer,
 * `m` MTP layer, `L` loss (the output layer).
 */
export type PipelineLayoutSymbol = 'E' | 't' | 'm' | 'L';

/** How the decoder is cut beyond the pipeline size: Megatron's uneven-stage settings. */
export interface PipelineSplit {
  /**
   * Virtual pipeline stages (model chunks) per pipeline rank, Megatron's
   * `--num-virtual-stages-per-pipeline-rank` (default 1; a layout string implies it).
   */
  readonly vpp?: number;
  /** Decoder layers on the first pipeline rank (`--decoder-first-pipeline-num-layers`). */
  readonly decoderFirstPipelineNumLayers?: number;
  /** Decoder layers on the last pipeline rank (`--decoder-last-pipeline-num-layers`). */
  readonly decoderLastPipelineNumLayers?: number;
  /**
   * `--pipeline-model-parallel-layout`: pp × vpp stages separated by `|`, in the order
   * `vpStage * pp + ppRank`, each a run of {@link PipelineLayoutSymbol}s; `x*N` repeats a symbol,
   * `(...)*N` a group, commas are cosmetic (e.g. `"E|t*5|t*6|t,m,L"`, `"Et|(tt|)*30mL"`).
   */
  readonly pipelineModelParallelLayout?: string;
}

/** What {@link pipelineStages} needs: the model's layer counts and the pipeline settings. */
export interface PipelineStagesInput extends PipelineSplit {
  /** Decoder layers of the model. */
  readonly numLayers: number;
  /** Multi-token-prediction layers (default 0). */
  readonly mtpNumLayers?: number;
  /** Pipeline-parallel size. */
  readonly pp: number;
}

/** What one (pipeline rank, virtual stage) holds. */
export interface PipelineStage {
  /** Pipeline-parallel rank. */
  readonly ppRank: number;
  /** Virtual stage (model chunk) on that rank, Megatron's `vp_stage`: 0 … vpp − 1. */
  readonly vpStage: number;
  /** Global decoder layer indices (0-based), ascending and contiguous. */
  readonly layers: readonly number[];
  /** Global MTP layer indices (0-based). */
  readonly mtpLayers: readonly number[];
  /** Holds the embedding (only the first stage). */
  readonly embedding: boolean;
  /** Holds the loss, i.e. the output layer (only the last stage). */
  readonly loss: boolean;
}

/** The stages of a pipeline, in model order. */
export interface PipelineStages {
  readonly pp: number;
  /** Virtual stages per rank (1 without interleaving). */
  readonly vpp: number;
  /** Every stage in model order: `stages[vpStage * pp + ppRank]`. */
  readonly stages: readonly PipelineStage[];
  /** For each decoder layer, the index of its stage in `stages`. */
  readonly layerStage: readonly number[];
  /** For each MTP layer, the index of its stage in `stages`. */
  readonly mtpStage: readonly number[];
  /**
   * Index of the stage holding the final layernorm: with MTP layers Megatron puts it next to the
   * last decoder layer, otherwise on the loss stage.
   */
  readonly finalLayernormStage: number;
}

const SYMBOLS: readonly string[] = ['E', 't', 'm', 'L'];
/** A layout string expanding past this many symbols is a typo, not a model. */
const MAX_LAYOUT_SYMBOLS = 1 << 20;

function invalid(message: string): ConvertError {
  return new ConvertError('INVALID_ARGUMENT', message);
}

function checkCount(name: string, v: number | undefined, min: number, hint: string): void {
  if (v !== undefined && (!Number.isSafeInteger(v) || v < min)) {
    throw invalid(`${name}=${v} must be an integer >= ${min}${hint}`);
  }
}

/**
 * Expands a layout string into its stages, as Megatron's `parse_str_to_list`: commas dropped,
 * `(...)*N` then `x*N` unrolled, stages split at `|`. Throws on a symbol other than E, t, m, L.
 */
export function expandPipelineLayout(layout: string): PipelineLayoutSymbol[][] {
  const q = JSON.stringify(layout);
  let size = 0;
  const repeat = (s: string, n: string) => {
    const times = Number(n);
    size += s.length * times;
    if (size > MAX_LAYOUT_SYMBOLS) {
      throw invalid(`pipelineModelParallelLayout ${q} expands to more than ${MAX_LAYOUT_SYMBOLS} symbols`);
    }
    return s.repeat(times);
  };
  const text = layout
    .replaceAll(',', '')
    .replace(/\(([^)]+)\)\*(\d+)/g, (_, s: string, n: string) => repeat(s, n))
    .replace(/(.)\*(\d+)/g, (_, s: string, n: string) => repeat(s, n));
  return text.split('|').map((stage, i) => {
    for (const c of stage) {
      if (!SYMBOLS.includes(c)) {
        throw invalid(
          `pipelineModelParallelLayout ${q}: unknown symbol ${JSON.stringify(c)} in stage ${i} ` +
            `(${JSON.stringify(stage)}); use E (embedding), t (decoder layer), m (MTP layer), L (loss), ` +
            `'|' between stages, x*N and (...)*N to repeat`,
        );
      }
    }
    return [...stage] as PipelineLayoutSymbol[];
  });
}

/**
 * Checks the pipeline settings that do not depend on the model and returns them normalized:
 * `vpp` present only when above 1 (derived from a layout string), the other settings only when set.
 */
export function resolvePipelineSplit(pp: number, split: PipelineSplit = {}): PipelineSplit {
  checkCount('pp', pp, 1, '');
  checkCount('vpp', split.vpp, 1, '');
  const first = split.decoderFirstPipelineNumLayers;
  const last = split.decoderLastPipelineNumLayers;
  const unset = ' (leave it unset for an even split)';
  checkCount('decoderFirstPipelineNumLayers', first, 1, unset);
  checkCount('decoderLastPipelineNumLayers', last, 1, unset);
  const layout = split.pipelineModelParallelLayout;
  let vpp = split.vpp ?? 1;
  if (layout !== undefined) {
    if (typeof layout !== 'string' || layout === '') {
      throw invalid('pipelineModelParallelLayout must be a non-empty string such as "E|t*5|t*6|t,m,L"');
    }
    if (first !== undefined || last !== undefined) {
      throw invalid(
        'pipelineModelParallelLayout cannot be combined with decoderFirstPipelineNumLayers / ' +
          'decoderLastPipelineNumLayers (the layout already places every layer); use one or the other',
      );
    }
    const n = expandPipelineLayout(layout).length;
    if (n % pp !== 0) {
      throw invalid(
        `pipelineModelParallelLayout ${JSON.stringify(layout)} has ${n} stages, not a multiple of pp=${pp} ` +
          "(it needs pp × vpp stages separated by '|')",
      );
    }
    if (split.vpp !== undefined && split.vpp !== n / pp) {
      throw invalid(
        `vpp=${split.vpp} conflicts with pipelineModelParallelLayout ${JSON.stringify(layout)}: ` +
          `its ${n} stages at pp=${pp} make vpp=${n / pp}; drop vpp or fix the layout`,
      );
    }
    vpp = n / pp;
  }
  if (vpp > 1 && pp < 2) {
    throw invalid(`vpp=${vpp} needs pp >= 2 (virtual stages interleave over the pipeline ranks)`);
  }
  return {
    ...(vpp > 1 ? { vpp } : {}),
    ...(first !== undefined ? { decoderFirstPipelineNumLayers: first } : {}),
    ...(last !== undefined ? { decoderLastPipelineNumLayers: last } : {}),
    ...(layout !== undefined ? { pipelineModelParallelLayout: layout } : {}),
  };
}

/** Per stage (model order): its symbols, decoder layers counted as `t`, as a layout string would give. */
function stagesFromLayout(
  layout: string,
  pp: number,
  vpp: number,
  numLayers: number,
  mtp: number,
): PipelineLayoutSymbol[][] {
  const stages = expandPipelineLayout(layout);
  const q = `pipelineModelParallelLayout ${JSON.stringify(layout)}`;
  const flat = stages.flat();
  const count = (s: PipelineLayoutSymbol) => flat.filter((x) => x === s).length;
  // Megatron builds the embedding on the first stage and the loss on the last whatever the string
  // says, so they must be there (an empty first or last stage would move them).
  if (stages[0][0] !== 'E' || count('E') !== 1) {
    throw invalid(
      `${q}: must start with 'E' (the embedding, first symbol of the first stage) and hold it once`,
    );
  }
  if (stages[stages.length - 1].at(-1) !== 'L' || count('L') !== 1) {
    throw invalid(`${q}: must end with 'L' (the loss, last symbol of the last stage) and hold it once`);
  }
  if (count('t') !== numLayers) {
    throw invalid(`${q}: has ${count('t')} 't' (decoder layers) but the model has numLayers ${numLayers}`);
  }
  if (count('m') !== mtp) {
    throw invalid(
      `${q}: has ${count('m')} 'm' (MTP layers) but the model has mtpNumLayers ${mtp}` +
        (mtp === 0 ? "; remove the 'm'" : ''),
    );
  }
  const firstMtp = flat.indexOf('m');
  if (firstMtp >= 0 && flat.indexOf('t', firstMtp) >= 0) {
    throw invalid(`${q}: a 't' (decoder layer) follows an 'm'; MTP layers come after every decoder layer`);
  }
  stages.forEach((s, i) => {
    if (!s.includes('m')) return;
    const vpStage = Math.floor(i / pp);
    if (vpStage !== vpp - 1) {
      throw invalid(
        `${q}: stage ${i} (pp rank ${i % pp}, virtual stage ${vpStage}) holds 'm'; MTP layers must be ` +
          `in the last virtual stage (${vpp - 1}) of their pipeline rank`,
      );
    }
    if (s.filter((x) => x === 'm').length !== mtp) {
      throw invalid(`${q}: all ${mtp} MTP layers must be in one stage`);
    }
  });
  return stages;
}

/** Decoder layers per pipeline rank with Megatron's uneven first/last ranks (or an even split). */
function layersPerRank(numLayers: number, pp: number, vpp: number, split: PipelineSplit): number[] {
  const first = split.decoderFirstPipelineNumLayers;
  const last = split.decoderLastPipelineNumLayers;
  if (first === undefined && last === undefined) {
    if (numLayers % pp !== 0) {
      throw invalid(
        `pp=${pp} does not divide numLayers ${numLayers} (each pipeline stage holds the same number ` +
          'of layers); set decoderFirstPipelineNumLayers / decoderLastPipelineNumLayers or ' +
          'pipelineModelParallelLayout for uneven stages',
      );
    }
    const per = numLayers / pp;
    if (per % vpp !== 0) {
      throw invalid(
        `vpp=${vpp} does not divide the ${per} layers of each pipeline rank (numLayers ${numLayers} / pp ${pp})`,
      );
    }
    return Array.from({ length: pp }, () => per);
  }
  const middleStages = pp - (first === undefined ? 0 : 1) - (last === undefined ? 0 : 1);
  if (middleStages < 0) {
    throw invalid(
      'decoderFirstPipelineNumLayers and decoderLastPipelineNumLayers together need pp >= 2 ' +
        `(got pp=${pp})`,
    );
  }
  const middle = numLayers - (first ?? 0) - (last ?? 0);
  const given = [
    first === undefined ? '' : `decoderFirstPipelineNumLayers=${first}`,
    last === undefined ? '' : `decoderLastPipelineNumLayers=${last}`,
  ]
    .filter(Boolean)
    .join(' + ');
  if (middle < 0) throw invalid(`${given} is more than numLayers ${numLayers}`);
  if (middle > 0 !== middleStages > 0) {
    throw invalid(
      `${given} leaves ${middle} of numLayers ${numLayers} for ${middleStages} middle pipeline ` +
        `rank(s) at pp=${pp}; ${middleStages === 0 ? 'the first and last ranks must hold every layer' : 'every middle rank needs layers'}`,
    );
  }
  if (middleStages > 0 && middle % middleStages !== 0) {
    throw invalid(
      `${given} leaves ${middle} layers for ${middleStages} middle pipeline ranks at pp=${pp}, ` +
        'which do not split evenly; change the first/last counts',
    );
  }
  const per = middleStages > 0 ? middle / middleStages : 0;
  const counts = Array.from({ length: pp }, (_, r) => {
    if (r === pp - 1 && last !== undefined) return last;
    if (r === 0 && first !== undefined) return first;
    return per;
  });
  counts.forEach((n, r) => {
    if (n % vpp !== 0) {
      const what =
        r === 0 && first !== undefined ? 'first' : r === pp - 1 && last !== undefined ? 'last' : 'middle';
      throw invalid(
        `vpp=${vpp} does not divide the ${n} layers of the ${what} pipeline rank (${r}); ${given}`,
      );
    }
  });
  return counts;
}

/**
 * The stages of a `pp` × `vpp` pipeline of a model with `numLayers` decoder layers and
 * `mtpNumLayers` MTP layers, as Megatron-Core builds them: decoder layers are numbered
 * consecutively in stage order (`vpStage * pp + ppRank`); without a layout string the embedding
 * is on the first stage and the loss and the MTP layers on the last. Throws INVALID_ARGUMENT with
 * the fix when the settings cannot cut this model.
 */
export function pipelineStages(input: PipelineStagesInput): PipelineStages {
  const { numLayers, pp } = input;
  const mtp = input.mtpNumLayers ?? 0;
  checkCount('numLayers', numLayers, 0, '');
  checkCount('mtpNumLayers', mtp, 0, '');
  const split = resolvePipelineSplit(pp, input);
  const vpp = split.vpp ?? 1;
  const n = pp * vpp;
  let symbols: PipelineLayoutSymbol[][];
  if (split.pipelineModelParallelLayout !== undefined) {
    symbols = stagesFromLayout(split.pipelineModelParallelLayout, pp, vpp, numLayers, mtp);
  } else {
    const perRank = layersPerRank(numLayers, pp, vpp, split);
    symbols = Array.from({ length: n }, (_, i) => {
      const s = Array.from({ length: perRank[i % pp] / vpp }, (): PipelineLayoutSymbol => 't');
      if (i === 0) s.unshift('E');
      if (i === n - 1) s.push(...Array.from({ length: mtp }, (): PipelineLayoutSymbol => 'm'), 'L');
      return s;
    });
  }
  const layerStage: number[] = [];
  const mtpStage: number[] = [];
  const stages = symbols.map((s, i): PipelineStage => {
    const layers: number[] = [];
    const mtpLayers: number[] = [];
    for (const c of s) {
      if (c === 't') {
        layers.push(layerStage.length);
        layerStage.push(i);
      } else if (c === 'm') {
        mtpLayers.push(mtpStage.length);
        mtpStage.push(i);
      }
    }
    return {
      ppRank: i % pp,
      vpStage: Math.floor(i / pp),
      layers,
      mtpLayers,
      embedding: s.includes('E'),
      loss: s.includes('L'),
    };
  });
  const finalLayernormStage = mtp > 0 && numLayers > 0 ? layerStage[numLayers - 1] : n - 1;
  return { pp, vpp, stages, layerStage, mtpStage, finalLayernormStage };
}
