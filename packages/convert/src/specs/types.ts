// Architecture specs and weight-mapping rules. Rules are plain data so a mapping engine (and a
// plugin) can read, print and check them without running per-tensor code.
import type { z } from 'zod';
import type { TransformerConfig } from '../transformer-config.js';

/** How an HF tensor lands in the Megatron model, as data the mapping engine interprets. */
export type WeightOp =
  /** Same full tensor on every rank that holds it (norms, router, MLA down-projections). */
  | { type: 'replicate' }
  /**
   * Vocabulary-parallel embedding or output layer: rows padded with zeros to a multiple of
   * `makeVocabSizeDivisibleBy` × TP, then split along dim 0 (the padding is dropped on export).
   */
  | { type: 'vocab' }
  /** Tensor-parallel split: dim 0 = column parallel (output rows), dim 1 = row parallel. */
  | { type: 'split'; dim: 0 | 1 }
  /**
   * One part of the fused QKV (weight or bias), interleaved per query group; `qkv`: an HF tensor
   * that packs all three as [q; k; v] (every query head, then the key heads, then the value heads:
   * Phi-3's `qkv_proj`), regrouped per query group.
   */
  | { type: 'qkv'; part: 'q' | 'k' | 'v' | 'qkv' }
  /**
   * One half of the fused SwiGLU fc1 ([gate; up], chunked per TP rank); `gate_up`: an HF tensor
   * that is already [gate; up] (Phi-3's `gate_up_proj`).
   */
  | { type: 'gate_up'; part: 'gate' | 'up' | 'gate_up' }
  /** An expert tensor: placed by expert parallelism, then split by expert-TP with `inner`. */
  | {
      type: 'expert';
      inner: { type: 'split'; dim: 0 | 1 } | { type: 'gate_up'; part: 'gate' | 'up' | 'gate_up' };
    }
  /** An HF copy of a tensor another rule already maps (MTP's embedding/head): checked, not stored. */
  | { type: 'duplicate' };

/**
 * One mapping rule. Placeholders: `{layer}` a decoder layer (0 ≤ i < numLayers, same index on both
 * sides); `{expert}` a global expert index; `{mtpLayer}` (HF side) = numLayers + `{mtp}` (Megatron side).
 */
export interface WeightRule {
  hf: string;
  megatron: string;
  op: WeightOp;
  /** The rule applies only to layers of this kind (the pre-MLP norm is fused in dense layers only). */
  layerKind?: 'dense' | 'moe';
  /** Megatron keeps this tensor in this dtype whatever the model dtype (the router's fp32 expert bias). */
  dtype?: 'F32';
}

/** Name and shape of one tensor of a Hugging Face checkpoint. */
export interface HfTensorShape {
  name: string;
  shape: number[];
}

/** One Hugging Face architecture: its config.json schema, its TransformerConfig and its weight rules. */
export interface ArchitectureSpec<H = unknown> {
  /** HF `architectures` names this spec handles. */
  architectures: string[];
  /** zod schema of the HF config.json. */
  configSchema: z.ZodType<H>;
  /** Builds the TransformerConfig from a parsed config (throws ConvertError on unsupported values). */
  toTransformerConfig(hfConfig: H): TransformerConfig;
  /** Rules covering every tensor of a checkpoint of this architecture exactly once. */
  weightRules: WeightRule[];
  /** Every tensor (name and shape) an HF checkpoint with this config holds, MTP layers included. */
  expectedHfTensors(cfg: TransformerConfig): HfTensorShape[];
}

const PLACEHOLDER = /\{(layer|expert|mtpLayer|mtp)\}/g;
const compiled = new WeakMap<WeightRule, { re: RegExp; keys: string[] }>();

function compile(rule: WeightRule): { re: RegExp; keys: string[] } {
  let c = compiled.get(rule);
  if (!c) {
    const keys: string[] = [];
    const src = rule.hf
      .split(PLACEHOLDER)
      .map((part, i) => {
        // split() with a capture group alternates literal text and placeholder names.
        if (i % 2 === 1) {
          keys.push(part);
          return '(0|[1-9][0-9]*)';
        }
        return part.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
      })
      .join('');
    c = { re: new RegExp(`^${src}$`), keys };
    compiled.set(rule, c);
  }
  return c;
}

function layerKindOf(cfg: TransformerConfig, layer: number): 'dense' | 'moe' {
  return cfg.moe ? (cfg.moe.layerPattern[layer] ?? 'dense') : 'dense';
}

/** Placeholder values if `hfName` matches `rule` for this config (ranges and layer kind checked), else null. */
export function matchWeightRule(
  rule: WeightRule,
  hfName: string,
  cfg: TransformerConfig,
): Record<string, number> | null {
  const { re, keys } = compile(rule);
  const m = re.exec(hfName);
  if (!m) return null;
  const b: Record<string, number> = {};
  keys.forEach((k, i) => {
    b[k] = Number(m[i + 1]);
  });
  let kindLayer: number | undefined;
  if (b.layer !== undefined) {
    if (b.layer >= cfg.numLayers) return null;
    kindLayer = b.layer;
  }
  if (b.mtpLayer !== undefined) {
    const mtp = b.mtpLayer - cfg.numLayers;
    if (mtp < 0 || mtp >= cfg.mtpNumLayers) return null;
    b.mtp = mtp;
    // An MTP block repeats the last decoder layer's structure.
    kindLayer = cfg.numLayers - 1;
  }
  if (b.expert !== undefined && (!cfg.moe || b.expert >= cfg.moe.numExperts)) return null;
  if (rule.layerKind && (kindLayer === undefined || layerKindOf(cfg, kindLayer) !== rule.layerKind))
    return null;
  return b;
}

/** Fills a rule's Megatron name from the placeholder values of a match. */
export function megatronName(rule: WeightRule, bindings: Record<string, number>): string {
  return rule.megatron.replace(PLACEHOLDER, (_, k: string) => String(bindings[k]));
}

/** All rules matching an HF tensor name (a complete spec yields exactly one). */
export function findWeightRules(
  rules: readonly WeightRule[],
  hfName: string,
  cfg: TransformerConfig,
): { rule: WeightRule; megatron: string }[] {
  const out: { rule: WeightRule; megatron: string }[] = [];
  for (const rule of rules) {
    const b = matchWeightRule(rule, hfName, cfg);
    if (b) out.push({ rule, megatron: megatronName(rule, b) });
  }
  return out;
}
