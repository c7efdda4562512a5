// The architecture registry: built-ins and plugin packages register specs through the same call,
// and parseHfConfig dispatches a config.json on its `architectures` field.
import { readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { ConvertError } from '../errors.js';
import type { TransformerConfig } from '../transformer-config.js';
import type { ArchitectureSpec } from './types.js';

const registry = new Map<string, ArchitectureSpec>();

/** Registers a spec under each of its architecture names; re-registering a name needs `replace`. */
export function registerArchitecture<H>(spec: ArchitectureSpec<H>, opts: { replace?: boolean } = {}): void {
  if (spec.architectures.length === 0)
    throw new ConvertError('INVALID_ARGUMENT', 'an architecture spec needs at least one name');
  for (const name of spec.architectures) {
    if (registry.has(name) && !opts.replace) {
      throw new ConvertError(
        'INVALID_ARGUMENT',
        `architecture "${name}" is already registered (pass {replace: true} to override)`,
      );
    }
  }
  // The registry erases the config type; the spec only ever sees configs its own schema produced.
  for (const name of spec.architectures) registry.set(name, spec as ArchitectureSpec);
}

/** The spec registered for an HF architecture name; unknown → ConvertError('UNKNOWN_ARCHITECTURE'). */
export function getArchitectureSpec(name: string): ArchitectureSpec {
  const spec = registry.get(name);
  if (!spec) throw unknown([name]);
  return spec;
}

/** Registered architecture names, sorted. */
export function listArchitectures(): string[] {
  return [...registry.keys()].sort();
}

function unknown(names: string[], file?: string): ConvertError {
  return new ConvertError(
    'UNKNOWN_ARCHITECTURE',
    `unknown architecture ${names.map((n) => `"${n}"`).join(', ')}; known: ${listArchitectures().join(', ')}`,
    file,
  );
}

/** Result of parseHfConfig. */
export interface ParsedHfConfig {
  spec: ArchitectureSpec;
  /** The config as the spec's schema parsed it. */
  hfConfig: unknown;
  transformerConfig: TransformerConfig;
}

function readJson(path: string): unknown {
  let file = path;
  try {
    // A checkpoint directory stands for its config.json.
    if (statSync(path).isDirectory()) file = join(path, 'config.json');
  } catch {
    throw new ConvertError('MISSING_FILE', 'no such file or directory', path);
  }
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch {
    throw new ConvertError('MISSING_FILE', 'cannot read the file', file);
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new ConvertError('INVALID_CONFIG', `not valid JSON (${(e as Error).message})`, file);
  }
}

/**
 * Brings a config.json written by transformers 5 to the field names the specs read: it moves
 * `rope_theta` and the scaling settings into `rope_parameters`, so `rope_theta` / `rope_scaling`
 * are filled from there when absent. Mutates and returns `json`; parseHfConfig passes it a copy.
 */
export function normalizeHfConfig(json: Record<string, unknown>): Record<string, unknown> {
  const rp = json.rope_parameters;
  if (rp && typeof rp === 'object' && !Array.isArray(rp)) {
    const p = rp as Record<string, unknown>;
    if (json.rope_theta === undefined && p.rope_theta !== undefined) json.rope_theta = p.rope_theta;
    const kind = p.rope_type ?? p.type;
    if (json.rope_scaling == null && kind !== undefined && kind !== 'default') json.rope_scaling = { ...p };
  }
  return json;
}

/**
 * Parses an HF config.json (an object, or a path to the file or its directory) with the spec its
 * `architectures` names. Missing or wrong fields → ConvertError('INVALID_CONFIG') naming field and file.
 */
export function parseHfConfig(input: string | object, opts: { file?: string } = {}): ParsedHfConfig {
  const file = typeof input === 'string' ? (opts.file ?? input) : opts.file;
  const json = typeof input === 'string' ? readJson(input) : input;
  if (typeof json !== 'object' || json === null || Array.isArray(json)) {
    throw new ConvertError('INVALID_CONFIG', 'config.json must be a JSON object', file);
  }
  const archs = (json as { architectures?: unknown }).architectures;
  if (!Array.isArray(archs) || archs.length === 0 || !archs.every((a) => typeof a === 'string')) {
    // DeepSeek's inference/configs/*.json uses dim/n_layers and has no architectures field.
    const native = 'dim' in json && 'n_layers' in json;
    throw new ConvertError(
      'INVALID_CONFIG',
      native
        ? 'field "architectures" is missing: this is a DeepSeek native inference config (dim, n_layers, ...), not a Hugging Face config.json; use the model\'s HF config.json'
        : 'field "architectures" is missing or not a non-empty list of strings',
      file,
    );
  }
  const name = (archs as string[]).find((a) => registry.has(a));
  if (name === undefined) throw unknown(archs as string[], file);
  const spec = registry.get(name) as ArchitectureSpec;
  const r = spec.configSchema.safeParse(normalizeHfConfig({ ...(json as Record<string, unknown>) }));
  if (!r.success) {
    const msg = r.error.issues.map((i) => `field "${i.path.join('.') || '(root)'}": ${i.message}`).join('; ');
    throw new ConvertError('INVALID_CONFIG', `${name}: ${msg}`, file);
  }
  let transformerConfig: TransformerConfig;
  try {
    transformerConfig = spec.toTransformerConfig(r.data);
  } catch (e) {
    // Specs throw without knowing the file; attach it here.
    if (e instanceof ConvertError && !e.file && file)
      throw new ConvertError(e.code, `${name}: ${e.message}`, file);
    throw e;
  }
  return { spec, hfConfig: r.data, transformerConfig };
}

/** Names only of `spec.expectedHfTensors(cfg)`, in the same order. */
export function expectedHfTensorNames<H>(spec: ArchitectureSpec<H>, cfg: TransformerConfig): string[] {
  return spec.expectedHfTensors(cfg).map((t) => t.name);
}
