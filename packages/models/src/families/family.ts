// Model families: what a Hugging Face architecture needs from the model beyond its
// TransformerConfig. Built-in families and plugin packages register through the same call; the
// converter's architecture spec (its config schema and weight rules) is the other half of a family.
import { ModelError } from '../errors.js';

/** The gated activation of the MLP: act(gate) · up. */
export type GatedActivation = 'swiglu' | 'geglu-tanh' | 'geglu';

/** What a family changes in GPTModel. Every field is optional; the defaults are Llama's. */
export interface ModelFamily {
  /** A short name (`llama`, `qwen`, `deepseek`, `gemma`...). */
  name: string;
  /** HF architecture names (`config.json` `architectures`) this family builds. */
  architectures: string[];
  /** One line for `megapatch model info` and the docs. */
  description?: string;
  /** MLP activation (default swiglu: silu(gate) · up). */
  activation?: GatedActivation;
  /** Norms scale by (1 + weight), the stored weight centred on 0 (Gemma; TE's zero_centered_gamma). */
  zeroCenteredGamma?: boolean;
  /** Multiplies the embedding output (Gemma: √hidden), rounded to the activation dtype as HF does. */
  embeddingMultiplier?: (hiddenSize: number) => number;
}

const families = new Map<string, ModelFamily>();

/** Registers a family under each of its architectures; replacing one needs `{replace: true}`. */
export function registerModelFamily(family: ModelFamily, opts: { replace?: boolean } = {}): void {
  if (!family.name || family.architectures.length === 0) {
    throw new ModelError('INVALID_ARGUMENT', 'a model family needs a name and at least one architecture');
  }
  for (const a of family.architectures) {
    const had = families.get(a);
    if (had && !opts.replace && had !== family) {
      throw new ModelError(
        'INVALID_ARGUMENT',
        `architecture "${a}" already belongs to model family "${had.name}" (pass {replace: true} to override)`,
      );
    }
  }
  for (const a of family.architectures) families.set(a, family);
}

/** The family of an HF architecture; an unknown one is an UNKNOWN_FAMILY error listing the known. */
export function getModelFamily(architecture: string): ModelFamily {
  const f = families.get(architecture);
  if (!f) {
    throw new ModelError(
      'UNKNOWN_FAMILY',
      `no model family builds "${architecture}"; known: ${[...families.keys()].sort().join(', ')} ` +
        '(a plugin package can add one: --plugin <package>)',
    );
  }
  return f;
}

/** Registered families, one entry per family. */
export function listModelFamilies(): ModelFamily[] {
  return [...new Set(families.values())].sort((a, b) => a.name.localeCompare(b.name));
}

/** The default family: Llama's choices (SwiGLU, plain norms, unscaled embeddings). */
export const DEFAULT_FAMILY: ModelFamily = { name: 'default', architectures: [] };
