// `megapatch data samples`: the training samples Megatron-LM would build from an indexed dataset,
// printed as JSON lines, for users debugging their data mix.
import { dirname, join } from 'node:path';
import { GPTDataset, IndexedDataset } from '@megapatch/data';
import { defineCommand } from 'citty';
import { z } from 'zod';

const SamplesOptions = z.object({
  dataPath: z.string().min(1, 'is required (a dataset prefix, without .bin/.idx)'),
  split: z.string().default('969,30,1'),
  seqLength: z.coerce.number().int().positive(),
  seed: z.coerce.number().int().min(0).default(1234),
  trainSamples: z.coerce.number().int().positive(),
  start: z.coerce.number().int().min(0).default(0),
  count: z.coerce.number().int().positive().default(1),
  cacheDir: z.string().optional(),
});
export type SamplesOptions = z.input<typeof SamplesOptions>;

/** Yields the JSON lines `megapatch data samples` prints: {"index", "tokens", "labels"}. */
export function* trainingSamples(options: SamplesOptions): Generator<string> {
  const o = SamplesOptions.parse(options);
  const dataset = IndexedDataset.open(o.dataPath);
  try {
    const gpt = GPTDataset.build({
      dataset,
      split: 'train',
      splitString: o.split,
      sequenceLength: o.seqLength,
      numSamples: o.trainSamples,
      seed: o.seed,
      // Megatron's default location: next to the data, under cache/GPTDataset_indices
      cacheDir: o.cacheDir ?? join(dirname(o.dataPath), 'cache', 'GPTDataset_indices'),
      resetPositionIds: false,
      resetAttentionMask: false,
      eodMaskLoss: false,
      eodTokenId: -1,
    });
    const end = Math.min(o.start + o.count, gpt.length);
    for (let i = o.start; i < end; i++) {
      const s = gpt.getItem(i);
      yield JSON.stringify({ index: i, tokens: Array.from(s.tokens), labels: Array.from(s.labels) });
    }
  } finally {
    dataset.close();
  }
}

const samples = defineCommand({
  meta: { name: 'samples', description: 'Print training samples as Megatron-LM builds them, as JSON lines' },
  args: {
    'data-path': {
      type: 'string',
      description: 'indexed dataset prefix (<prefix>.bin / <prefix>.idx)',
      required: true,
    },
    split: { type: 'string', description: 'Megatron split string', default: '969,30,1' },
    'seq-length': { type: 'string', description: 'tokens per sample', required: true },
    seed: { type: 'string', description: 'random seed', default: '1234' },
    'train-samples': {
      type: 'string',
      description: 'training samples requested (sets the epochs)',
      required: true,
    },
    start: { type: 'string', description: 'first sample to print', default: '0' },
    count: { type: 'string', description: 'number of samples to print', default: '1' },
    'cache-dir': { type: 'string', description: 'where index files are cached' },
  },
  run({ args }) {
    const parsed = SamplesOptions.safeParse({
      dataPath: args['data-path'],
      split: args.split,
      seqLength: args['seq-length'],
      seed: args.seed,
      trainSamples: args['train-samples'],
      start: args.start,
      count: args.count,
      cacheDir: args['cache-dir'],
    });
    if (!parsed.success) {
      const issues = parsed.error.issues.map(
        (i) => `  --${String(i.path[0]).replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}: ${i.message}`,
      );
      throw new Error(`megapatch data samples: invalid options\n${issues.join('\n')}`);
    }
    for (const line of trainingSamples(parsed.data)) process.stdout.write(`${line}\n`);
  },
});

export default defineCommand({
  meta: { name: 'data', description: 'Inspect training data' },
  subCommands: { samples },
});
