// Flags shared by several commands, one vocabulary everywhere (layout sizes with Megatron's long
// names, dtypes), and the zod validation that turns flag strings into typed, bounded options.
import * as os from 'node:os';
import { z } from 'zod';
import type { OptionSpec, OptionValues } from './command.js';
import { UsageError } from './errors.js';
import type { Io } from './io.js';

/** `--tp`, `--pp`, `--ep`, `--etp` with Megatron's names as aliases. */
export const layoutOptions = {
  tp: {
    type: 'string',
    value: 'N',
    description: 'tensor-parallel size',
    default: '1',
    aliases: ['tensor-model-parallel-size'],
  },
  pp: {
    type: 'string',
    value: 'N',
    description: 'pipeline-parallel size',
    default: '1',
    aliases: ['pipeline-model-parallel-size'],
  },
  ep: {
    type: 'string',
    value: 'N',
    description: 'expert-parallel size',
    default: '1',
    aliases: ['expert-model-parallel-size'],
  },
  etp: {
    type: 'string',
    value: 'N',
    description: 'expert tensor-parallel size (default: the tensor-parallel size)',
    aliases: ['expert-tensor-parallel-size'],
  },
} as const satisfies Record<string, OptionSpec>;

/** `--dtype`, with Megatron's `--bf16` / `--fp16` switches as presets. */
export const dtypeOption = {
  type: 'string',
  value: 'bf16|fp16|fp32',
  description: 'cast floating-point weights to this dtype (bfloat16, float16, float32 are accepted too)',
  presets: { bf16: 'bf16', fp16: 'fp16' },
} as const satisfies OptionSpec;

/** `--overwrite`. */
export const overwriteOption = {
  type: 'boolean',
  description: 'replace an existing output that megapatch wrote (never anything else)',
} as const satisfies OptionSpec;

/** The dtype names every command accepts, and the canonical short name of each. */
const DTYPE_NAMES: Record<string, 'bf16' | 'fp16' | 'fp32'> = {
  bf16: 'bf16',
  bfloat16: 'bf16',
  fp16: 'fp16',
  float16: 'fp16',
  half: 'fp16',
  fp32: 'fp32',
  float32: 'fp32',
  float: 'fp32',
};

/** A dtype flag: bf16 | fp16 | fp32 (or their long names), as the short name. */
export const Dtype = z.string().transform((s, ctx) => {
  const d = DTYPE_NAMES[s.toLowerCase()];
  if (!d)
    ctx.addIssue({
      code: 'custom',
      message: `must be bf16, fp16 or fp32 (or bfloat16, float16, float32), got '${s}'`,
    });
  return d ?? 'fp32';
});

/** An integer flag between `min` and `max`. */
export function int(min: number, max: number) {
  return z
    .string()
    .trim()
    .regex(/^[-+]?\d+$|^[-+]?\d+(\.\d+)?e\+?\d+$/i, 'must be an integer')
    .transform(Number)
    .pipe(
      z
        .number()
        .refine(Number.isSafeInteger, 'must be an integer')
        .refine((n) => n >= min, `must be >= ${min}`)
        .refine((n) => n <= max, `must be <= ${max.toLocaleString('en-US')}`),
    );
}

/** The upper bound of a parallel size flag: far above any real cluster, far below a typo's 1e9. */
export const MAX_PARALLEL = 1 << 16;

/** Layout fields of the zod schemas. */
export const layoutSchema = {
  tp: int(1, MAX_PARALLEL),
  pp: int(1, MAX_PARALLEL),
  ep: int(1, MAX_PARALLEL),
  etp: int(1, MAX_PARALLEL).optional(),
};

const kebab = (s: string) => s.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);
const camel = (s: string) => s.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase());

/**
 * Validates flag values (keyed by flag name) with `schema` (keyed by camelCase name); every bad
 * flag goes into one UsageError line: `--tp: must be >= 1; --dtype: must be bf16, ...`.
 */
export function parseOptions<S extends z.ZodType>(
  schema: S,
  values: OptionValues,
  command: string,
): z.output<S> {
  const raw: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(values)) raw[camel(k)] = v;
  const parsed = schema.safeParse(raw);
  if (parsed.success) return parsed.data;
  const issues = parsed.error.issues.map((i) => `--${kebab(String(i.path[0] ?? ''))}: ${i.message}`);
  throw new UsageError([...new Set(issues)].join('; '), command);
}

/** The cores this process may use. */
export function availableCores(): number {
  return typeof os.availableParallelism === 'function' ? os.availableParallelism() : os.cpus().length;
}

/** `--workers N` capped at the available cores, with a warning when capped. */
export function capWorkers(io: Io, workers: number): number {
  const cores = availableCores();
  if (workers <= cores) return workers;
  io.warn(`--workers ${workers} is more than the ${cores} available cores; using ${cores}`);
  return cores;
}
