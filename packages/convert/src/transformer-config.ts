// TransformerConfig: the architecture-independent description of a decoder-only model, named after
// Megatron-Core's TransformerConfig (camelCase). Every architecture spec produces one from its HF
// config.json; the model builder, the resharder and the parameter counter read only this.
import { z } from 'zod';
import { ConvertError } from './errors.js';

/**
 * The largest values megapatch accepts, far above any published model. They keep a config with a
 * typo (or a hostile one) from allocating layer lists or plans that exhaust memory, and keep every
 * tensor's byte size a safe integer.
 */
export const CONFIG_LIMITS = {
  /** Decoder layers. */
  layers: 10_000,
  /** Hidden size, FFN sizes (dense, expert, shared expert) and MLA LoRA ranks. */
  width: 2 ** 22,
  /** Attention heads and query groups. */
  heads: 65_536,
  /** Head dimensions. */
  headDim: 65_536,
  /** Vocabulary size. */
  vocab: 2 ** 27,
  /** Routed experts (and expert groups, and experts per token). */
  experts: 65_536,
  /** numLayers × numExperts: every expert MLP is a handful of tensors in a conversion plan. */
  expertMlps: 2 ** 20,
  /** Multi-token-prediction layers. */
  mtpLayers: 64,
  /** Maximum sequence length. */
  positions: 2 ** 31 - 1,
  /** Elements of one tensor: at 8 bytes each its byte size stays below 2^53. */
  tensorElements: 2 ** 50,
} as const;

/**
 * A positive (or, with `zero`, non-negative) integer at most `max`; a larger value is named in the
 * error with the limit.
 */
export function limitedInt(max: number, opts: { zero?: boolean } = {}) {
  const int = z.number().int();
  return (opts.zero ? int.nonnegative() : int.positive()).max(max, {
    error: (iss) => `${iss.input} is larger than ${max}, the most megapatch accepts; correct it`,
  });
}

const L = CONFIG_LIMITS;

/** RoPE frequency scaling, one variant per HF `rope_scaling.rope_type` that megapatch implements. */
export const RopeScaling = z.discriminatedUnion('type', [
  z.object({ type: z.literal('none') }),
  z.object({ type: z.literal('linear'), factor: z.number().positive() }),
  z.object({
    type: z.literal('llama3'),
    factor: z.number().positive(),
    lowFreqFactor: z.number().positive(),
    highFreqFactor: z.number().positive(),
    originalMaxPositionEmbeddings: limitedInt(L.positions),
  }),
  z.object({
    type: z.literal('yarn'),
    factor: z.number().positive(),
    originalMaxPositionEmbeddings: limitedInt(L.positions),
    betaFast: z.number(),
    betaSlow: z.number(),
    mscale: z.number(),
    mscaleAllDim: z.number(),
  }),
  /**
   * LongRoPE (Phi-3 / Phi-3.5 128k): each frequency k divided by shortFactor[k] while a forward's
   * positions stay within originalMaxPositionEmbeddings, by longFactor[k] beyond (one entry per
   * rotary pair), cos and sin scaled by attentionFactor, as transformers computes it.
   */
  z.object({
    type: z.literal('longrope'),
    shortFactor: z.array(z.number().positive()).min(1).max(L.headDim),
    longFactor: z.array(z.number().positive()).min(1).max(L.headDim),
    originalMaxPositionEmbeddings: limitedInt(L.positions),
    attentionFactor: z.number().positive(),
  }),
]);
/** RoPE frequency scaling. */
export type RopeScaling = z.infer<typeof RopeScaling>;

/** Kind of the MLP in one decoder layer: a dense MLP or a mixture of experts. */
export const LayerKind = z.enum(['dense', 'moe']);
/** Kind of the MLP in one decoder layer. */
export type LayerKind = z.infer<typeof LayerKind>;

/** Mixture-of-experts settings (Megatron `num_moe_experts`, `moe_router_topk`, ...). */
export const MoeConfig = z.object({
  numExperts: limitedInt(L.experts),
  routerTopk: limitedInt(L.experts),
  moeFfnHiddenSize: limitedInt(L.width),
  /** Intermediate size of the (fused) shared expert MLP; 0 when there is none. */
  sharedExpertIntermediateSize: limitedInt(L.width, { zero: true }).default(0),
  /** Qwen2-MoE: a sigmoid gate (1×hidden) scales the shared expert output. */
  sharedExpertGate: z.boolean().default(false),
  scoreFunction: z.enum(['softmax', 'sigmoid']).default('softmax'),
  /** DeepSeek-V3 aux-loss-free balancing: a per-expert bias added to the routing scores. */
  expertBias: z.boolean().default(false),
  /** Expert groups (DeepSeek's `n_group`): a token's experts come from `groupTopk` of them. */
  numGroups: limitedInt(L.experts).default(1),
  groupTopk: limitedInt(L.experts).default(1),
  routedScalingFactor: z.number().positive().default(1),
  normTopkProb: z.boolean().default(false),
  /** One entry per decoder layer (Megatron's list form of `moe_layer_freq`). */
  layerPattern: z.array(LayerKind),
});
/** Mixture-of-experts settings. */
export type MoeConfig = z.infer<typeof MoeConfig>;

/** Multi-head latent attention (DeepSeek-V2/V3, Moonlight). */
export const MlaConfig = z.object({
  /** Rank of the query down-projection; null means a plain q projection (V2-Lite, Moonlight). */
  qLoraRank: limitedInt(L.width).nullable(),
  kvLoraRank: limitedInt(L.width),
  qkNopeHeadDim: limitedInt(L.headDim),
  qkRopeHeadDim: limitedInt(L.headDim),
  vHeadDim: limitedInt(L.headDim),
});
/** Multi-head latent attention settings. */
export type MlaConfig = z.infer<typeof MlaConfig>;

/** The architecture-independent model description every spec produces. */
export const TransformerConfig = z
  .object({
    numLayers: limitedInt(L.layers),
    hiddenSize: limitedInt(L.width),
    /** FFN size of the dense layers (all layers when there is no MoE). */
    ffnHiddenSize: limitedInt(L.width),
    numAttentionHeads: limitedInt(L.heads),
    numQueryGroups: limitedInt(L.heads),
    /** Head dimension; independent of hidden/heads (Qwen3, Llama-3.2 set it explicitly). */
    kvChannels: limitedInt(L.headDim),
    normalization: z.enum(['RMSNorm', 'LayerNorm']).default('RMSNorm'),
    layernormEpsilon: z.number().positive(),
    addQkvBias: z.boolean().default(false),
    qkLayernorm: z.boolean().default(false),
    rotaryBase: z.number().positive(),
    /**
     * Share of each head's channels that rotate (Megatron's rotary_percent, HF's
     * partial_rotary_factor, Phi-4-mini's 0.75): the first ⌊kvChannels · rotaryPercent⌋ channels of
     * every query and key head rotate, the rest pass through unchanged.
     */
    rotaryPercent: z.number().gt(0).max(1).default(1),
    ropeScaling: RopeScaling.default({ type: 'none' }),
    untieEmbeddingsAndOutputWeights: z.boolean(),
    vocabSize: limitedInt(L.vocab),
    makeVocabSizeDivisibleBy: limitedInt(65_536).default(128),
    maxPositionEmbeddings: limitedInt(L.positions),
    /**
     * Sliding-window attention in every layer (Mistral): query i sees key j iff 0 ≤ i − j < window.
     * Null: full causal attention.
     */
    slidingWindow: limitedInt(L.positions).nullable().default(null),
    moe: MoeConfig.nullable().default(null),
    mla: MlaConfig.nullable().default(null),
    mtpNumLayers: limitedInt(L.mtpLayers, { zero: true }).default(0),
  })
  .superRefine((c, ctx) => {
    // Grouped-query attention needs every group to own the same number of query heads.
    if (c.numAttentionHeads % c.numQueryGroups !== 0) {
      ctx.addIssue({
        code: 'custom',
        path: ['numQueryGroups'],
        message: `numAttentionHeads ${c.numAttentionHeads} is not a multiple of numQueryGroups ${c.numQueryGroups}`,
      });
    }
    if (c.moe && c.moe.layerPattern.length !== c.numLayers) {
      ctx.addIssue({
        code: 'custom',
        path: ['moe', 'layerPattern'],
        message: `has ${c.moe.layerPattern.length} entries, expected numLayers = ${c.numLayers}`,
      });
    }
    if (c.moe) checkMoe(c.moe, c.numLayers, ctx);
    checkRotary(c, ctx);
    for (const [what, n] of largestTensors(c)) {
      if (n > L.tensorElements) {
        ctx.addIssue({
          code: 'custom',
          path: ['hiddenSize'],
          message: `the ${what} tensor would hold ${n} elements, more than 2^50 (its byte size must stay a safe integer)`,
        });
      }
    }
  });
/**
 * The number of channels of each query/key head that rotate: MLA's qkRopeHeadDim, else
 * ⌊kvChannels · rotaryPercent⌋ (Megatron's and transformers' truncation).
 */
export function rotaryDim(c: Pick<TransformerConfig, 'kvChannels' | 'rotaryPercent' | 'mla'>): number {
  return c.mla ? c.mla.qkRopeHeadDim : Math.trunc(c.kvChannels * c.rotaryPercent);
}

/** A rotary dimension that pairs up, and longrope factor lists of one entry per rotating pair. */
function checkRotary(
  c: {
    kvChannels: number;
    rotaryPercent: number;
    mla: z.output<typeof MlaConfig> | null;
    ropeScaling: z.output<typeof RopeScaling>;
  },
  ctx: z.RefinementCtx,
): void {
  if (c.mla && c.rotaryPercent !== 1) {
    ctx.addIssue({
      code: 'custom',
      path: ['rotaryPercent'],
      message: `is ${c.rotaryPercent}; multi-latent attention rotates its own qkRopeHeadDim channels (give 1)`,
    });
    return;
  }
  const dim = rotaryDim(c);
  if (dim === 0 || dim % 2 !== 0) {
    ctx.addIssue({
      code: 'custom',
      path: ['rotaryPercent'],
      message: `${c.rotaryPercent} of kvChannels ${c.kvChannels} rotates ${dim} channels; RoPE needs a positive even number`,
    });
    return;
  }
  const rs = c.ropeScaling;
  if (rs.type !== 'longrope') return;
  for (const [name, list] of [
    ['shortFactor', rs.shortFactor],
    ['longFactor', rs.longFactor],
  ] as const) {
    if (list.length !== dim / 2) {
      ctx.addIssue({
        code: 'custom',
        path: ['ropeScaling', name],
        message: `has ${list.length} entries; ${dim} rotating channels need ${dim / 2} (one per pair)`,
      });
    }
  }
}

/** Routing that can work: groups of equal size, and no more experts asked for than can be reached. */
function checkMoe(m: z.output<typeof MoeConfig>, numLayers: number, ctx: z.RefinementCtx): void {
  const issue = (field: string, message: string) =>
    ctx.addIssue({ code: 'custom', path: ['moe', field], message });
  if (numLayers * m.numExperts > L.expertMlps) {
    issue(
      'numExperts',
      `numLayers ${numLayers} × numExperts ${m.numExperts} = ${numLayers * m.numExperts} expert MLPs, more than ${L.expertMlps}`,
    );
  }
  if (m.routerTopk > m.numExperts) {
    issue('routerTopk', `${m.routerTopk} is larger than numExperts ${m.numExperts}`);
  }
  if (m.numExperts % m.numGroups !== 0) {
    issue(
      'numGroups',
      `numExperts ${m.numExperts} is not a multiple of numGroups ${m.numGroups} (expert groups are of equal size)`,
    );
  } else if (m.groupTopk > m.numGroups) {
    issue('groupTopk', `${m.groupTopk} is larger than numGroups ${m.numGroups}`);
  } else {
    const reachable = m.groupTopk * (m.numExperts / m.numGroups);
    if (m.routerTopk > reachable) {
      issue(
        'routerTopk',
        `${m.routerTopk} is larger than groupTopk × numExperts / numGroups = ${reachable}, the experts a token can reach`,
      );
    }
  }
  if (m.sharedExpertGate && m.sharedExpertIntermediateSize === 0) {
    issue('sharedExpertGate', 'is set, but there is no shared expert (sharedExpertIntermediateSize is 0)');
  }
}

/** Element counts of the largest tensors a config implies, by name. */
function largestTensors(c: {
  hiddenSize: number;
  ffnHiddenSize: number;
  numAttentionHeads: number;
  numQueryGroups: number;
  kvChannels: number;
  vocabSize: number;
  makeVocabSizeDivisibleBy: number;
  moe: z.output<typeof MoeConfig> | null;
  mla: z.output<typeof MlaConfig> | null;
}): [string, number][] {
  const h = c.hiddenSize;
  const heads = c.numAttentionHeads;
  const vocab = Math.ceil(c.vocabSize / c.makeVocabSizeDivisibleBy) * c.makeVocabSizeDivisibleBy;
  const out: [string, number][] = [
    ['embedding (padded vocabSize × hiddenSize)', vocab * h],
    ['linear_fc1 (2 × ffnHiddenSize × hiddenSize)', 2 * c.ffnHiddenSize * h],
  ];
  if (c.mla) {
    const m = c.mla;
    out.push(
      [
        'linear_q_proj (numAttentionHeads × (qkNopeHeadDim + qkRopeHeadDim) × hiddenSize or qLoraRank)',
        heads * (m.qkNopeHeadDim + m.qkRopeHeadDim) * Math.max(h, m.qLoraRank ?? 0),
      ],
      [
        'linear_kv_up_proj (numAttentionHeads × (qkNopeHeadDim + vHeadDim) × kvLoraRank)',
        heads * (m.qkNopeHeadDim + m.vHeadDim) * m.kvLoraRank,
      ],
      ['linear_proj (hiddenSize × numAttentionHeads × vHeadDim)', h * heads * m.vHeadDim],
    );
  } else {
    out.push([
      'linear_qkv ((numAttentionHeads + 2 × numQueryGroups) × kvChannels × hiddenSize)',
      (heads + 2 * c.numQueryGroups) * c.kvChannels * h,
    ]);
  }
  if (c.moe) {
    out.push(['expert linear_fc1 (2 × moeFfnHiddenSize × hiddenSize)', 2 * c.moe.moeFfnHiddenSize * h]);
  }
  return out;
}

/** The architecture-independent model description every spec produces (defaults applied). */
export type TransformerConfig = z.infer<typeof TransformerConfig>;
/** What a spec may hand to `makeTransformerConfig` (defaults not yet applied). */
export type TransformerConfigInput = z.input<typeof TransformerConfig>;

/** Validates a TransformerConfig, applying defaults; a bad field is a ConvertError('INVALID_CONFIG'). */
export function makeTransformerConfig(input: TransformerConfigInput, file?: string): TransformerConfig {
  const r = TransformerConfig.safeParse(input);
  if (!r.success) {
    const msg = r.error.issues.map((i) => `TransformerConfig.${i.path.join('.')}: ${i.message}`).join('; ');
    throw new ConvertError('INVALID_CONFIG', msg, file);
  }
  return r.data;
}

/**
 * Per-layer MoE pattern from DeepSeek's `first_k_dense_replace` / `moe_layer_freq` (layer i is MoE
 * when i >= firstKDense and i % freq == 0) or Qwen's `decoder_sparse_step` / `mlp_only_layers`
 * (layer i is MoE when it is not listed and (i + 1) % step == 0).
 */
export function moeLayerPattern(
  numLayers: number,
  opts: { firstKDense?: number; freq?: number; sparseStep?: number; denseLayers?: readonly number[] },
): LayerKind[] {
  if (!Number.isSafeInteger(numLayers) || numLayers < 0 || numLayers > L.layers) {
    throw new ConvertError(
      'INVALID_CONFIG',
      `numLayers ${numLayers} must be an integer from 0 to ${L.layers}, the most megapatch accepts`,
    );
  }
  const dense = new Set(opts.denseLayers ?? []);
  const out: LayerKind[] = [];
  for (let i = 0; i < numLayers; i++) {
    let moe = !dense.has(i) && i >= (opts.firstKDense ?? 0);
    if (opts.freq !== undefined) moe &&= i % opts.freq === 0;
    if (opts.sparseStep !== undefined) moe &&= (i + 1) % opts.sparseStep === 0;
    out.push(moe ? 'moe' : 'dense');
  }
  return out;
}

/** Megatron's padded vocabulary: the next multiple of divisibleBy × TP (so every TP shard is equal). */
export function paddedVocabSize(vocabSize: number, divisibleBy = 128, tp = 1): number {
  if (!Number.isInteger(vocabSize) || vocabSize <= 0 || !(divisibleBy > 0) || !(tp > 0)) {
    throw new ConvertError('INVALID_ARGUMENT', `paddedVocabSize(${vocabSize}, ${divisibleBy}, ${tp})`);
  }
  const m = divisibleBy * tp;
  return Math.ceil(vocabSize / m) * m;
}

/** Parameters of one decoder layer, by part. */
export interface LayerParameterCount {
  kind: LayerKind;
  attention: number;
  /** Input norm, pre-MLP norm. */
  norms: number;
  /** Dense MLP, or all experts + shared expert + router (+ gates, expert bias). */
  mlp: number;
  /** The MLP parameters a single token passes through (top-k experts, shared expert, router). */
  mlpActive: number;
  total: number;
  activePerToken: number;
}

/** Parameter count of a model, counting exactly the tensors an HF checkpoint of it holds. */
export interface ParameterCount {
  /** All parameters excluding MTP modules (the figure model cards publish). */
  total: number;
  /** Parameters used per token, excluding MTP (embedding and output layer counted in full). */
  activePerToken: number;
  embedding: number;
  /** 0 when tied to the embedding. */
  outputLayer: number;
  finalNorm: number;
  perLayer: LayerParameterCount[];
  /** Multi-token-prediction modules as stored in the HF checkpoint (incl. their embedding/head copies). */
  mtp: number;
  totalWithMtp: number;
}

function normSize(cfg: TransformerConfig, dim: number): number {
  // LayerNorm carries a bias next to its weight; RMSNorm does not.
  return cfg.normalization === 'LayerNorm' ? 2 * dim : dim;
}

function attentionParams(cfg: TransformerConfig): number {
  const h = cfg.hiddenSize;
  const heads = cfg.numAttentionHeads;
  if (cfg.mla) {
    const m = cfg.mla;
    const qHead = m.qkNopeHeadDim + m.qkRopeHeadDim;
    const q =
      m.qLoraRank === null
        ? h * heads * qHead
        : h * m.qLoraRank + normSize(cfg, m.qLoraRank) + m.qLoraRank * heads * qHead;
    const kv =
      h * (m.kvLoraRank + m.qkRopeHeadDim) +
      normSize(cfg, m.kvLoraRank) +
      m.kvLoraRank * heads * (m.qkNopeHeadDim + m.vHeadDim);
    return q + kv + heads * m.vHeadDim * h;
  }
  const d = cfg.kvChannels;
  const qkvOut = (heads + 2 * cfg.numQueryGroups) * d;
  const bias = cfg.addQkvBias ? qkvOut : 0;
  const qkNorm = cfg.qkLayernorm ? 2 * normSize(cfg, d) : 0;
  return h * qkvOut + bias + qkNorm + heads * d * h;
}

function layerCount(cfg: TransformerConfig, kind: LayerKind): LayerParameterCount {
  const h = cfg.hiddenSize;
  const attention = attentionParams(cfg);
  const norms = 2 * normSize(cfg, h);
  let mlp: number;
  let mlpActive: number;
  const moe = cfg.moe;
  if (kind === 'moe' && moe) {
    // SwiGLU experts: gate, up (h → f) and down (f → h).
    const expert = 3 * h * moe.moeFfnHiddenSize;
    const shared = 3 * h * moe.sharedExpertIntermediateSize + (moe.sharedExpertGate ? h : 0);
    const router = h * moe.numExperts + (moe.expertBias ? moe.numExperts : 0);
    mlp = moe.numExperts * expert + shared + router;
    mlpActive = moe.routerTopk * expert + shared + router;
  } else {
    mlp = 3 * h * cfg.ffnHiddenSize;
    mlpActive = mlp;
  }
  const total = attention + norms + mlp;
  return { kind, attention, norms, mlp, mlpActive, total, activePerToken: attention + norms + mlpActive };
}

/** Counts parameters from the config alone, matching what the HF checkpoint stores. */
export function parameterCount(cfg: TransformerConfig): ParameterCount {
  const h = cfg.hiddenSize;
  const embedding = cfg.vocabSize * h;
  const outputLayer = cfg.untieEmbeddingsAndOutputWeights ? cfg.vocabSize * h : 0;
  const finalNorm = normSize(cfg, h);
  const perLayer: LayerParameterCount[] = [];
  for (let i = 0; i < cfg.numLayers; i++)
    perLayer.push(layerCount(cfg, cfg.moe ? (cfg.moe.layerPattern[i] ?? 'dense') : 'dense'));
  const sum = (f: (l: LayerParameterCount) => number) => perLayer.reduce((a, l) => a + f(l), 0);
  const fixed = embedding + outputLayer + finalNorm;
  // An HF MTP layer (DeepSeek-V3 `model.layers.{L}`) stores its own embedding and head copies, enorm,
  // hnorm, eh_proj (2h → h), the shared head norm and one full decoder layer of the last layer's kind.
  const lastKind: LayerKind = cfg.moe ? (cfg.moe.layerPattern[cfg.numLayers - 1] ?? 'dense') : 'dense';
  const mtpOne = 2 * cfg.vocabSize * h + 3 * normSize(cfg, h) + 2 * h * h + layerCount(cfg, lastKind).total;
  const total = fixed + sum((l) => l.total);
  const mtp = cfg.mtpNumLayers * mtpOne;
  return {
    total,
    activePerToken: fixed + sum((l) => l.activePerToken),
    embedding,
    outputLayer,
    finalNorm,
    perLayer,
    mtp,
    totalWithMtp: total + mtp,
  };
}
