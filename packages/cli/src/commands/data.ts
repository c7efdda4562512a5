// `megapatch data samples`: the training samples Megatron-LM would build from an indexed dataset,
// printed as JSON lines, for users debugging their data mix.

import { totalmem } from 'node:os';
import { dirname, join } from 'node:path';
import { estimateGptIndexBytes, GPTDataset, IndexedDataset } from '@megapatch/data';
import { z } from 'zod';
import { type Command, type CommandGroup, type OptionValues, withDefaults } from '../command.js';
import { UsageError } from '../errors.js';
import { formatBytes } from '../format.js';
import { type Io, memoryIo } from '../io.js';
import { int, parseOptions } from '../options.js';

const COMMAND = 'data samples';
/** Longer than any context window trained today (Megatron's seq-length is an int too). */
export const MAX_SEQ_LENGTH = 1 << 24;

const SamplesOptions = z.object({
  dataPath: z.string().min(1, 'is required (a dataset prefix, without .bin/.idx)'),
  split: z.string().min(1),
  seqLength: int(1, MAX_SEQ_LENGTH),
  // numpy's RandomState, which Megatron seeds, takes 32-bit seeds.
  seed: int(0, 2 ** 32 - 1),
  trainSamples: int(1, Number.MAX_SAFE_INTEGER),
  start: int(0, Number.MAX_SAFE_INTEGER),
  count: int(1, Number.MAX_SAFE_INTEGER),
  cacheDir: z.string().min(1).optional(),
});
export type SamplesOptions = z.output<typeof SamplesOptions>;

/**
 * Builds the training split as Megatron's GPTDataset does and calls `emit` with each requested
 * sample as a JSON line {"index", "tokens", "labels"}; yields to the event loop every few lines
 * so that an interrupt or a closed stdout stops it.
 */
export async function writeTrainingSamples(o: SamplesOptions, io: Io): Promise<number> {
  const dataset = IndexedDataset.open(o.dataPath);
  try {
    // Said here in the command's terms, before GPTDataset.build would refuse it in its own.
    const need = estimateGptIndexBytes({
      dataset,
      split: 'train',
      splitString: o.split,
      sequenceLength: o.seqLength,
      numSamples: o.trainSamples,
    });
    const limit = totalmem() / 2;
    if (need.totalBytes > limit) {
      throw new UsageError(
        `--train-samples ${o.trainSamples} needs ${formatBytes(need.totalBytes)} of sample indices ` +
          `(document ${formatBytes(need.documentIndexBytes)}, sample ${formatBytes(need.sampleIndexBytes)}, ` +
          `shuffle ${formatBytes(need.shuffleIndexBytes)}), more than half of this machine's memory ` +
          `(${formatBytes(limit)}); ask for fewer samples`,
        COMMAND,
      );
    }
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
      maxIndexBytes: limit,
    });
    if (o.start >= gpt.length) {
      throw new UsageError(
        `--start ${o.start} is past the end: the training split has ${gpt.length} samples (0 to ${gpt.length - 1})`,
        COMMAND,
      );
    }
    const end = Math.min(o.start + o.count, gpt.length);
    for (let i = o.start; i < end; i++) {
      const s = gpt.getItem(i);
      io.out.log(JSON.stringify({ index: i, tokens: Array.from(s.tokens), labels: Array.from(s.labels) }));
      if ((i - o.start) % 64 === 63) {
        await new Promise<void>((r) => setImmediate(r));
        io.throwIfStopped();
      }
    }
    return end - o.start;
  } finally {
    dataset.close();
  }
}

/** The JSON lines `megapatch data samples` prints, for flag values given as strings. */
export async function trainingSamples(args: OptionValues): Promise<string[]> {
  const io = memoryIo();
  await writeTrainingSamples(parseOptions(SamplesOptions, withDefaults(samples, args), COMMAND), io);
  return io.lines;
}

export const samples: Command = {
  name: COMMAND,
  summary: 'print training samples as Megatron-LM builds them, as JSON lines',
  description:
    "Builds the document, sample and shuffle indices of the training split exactly as Megatron's " +
    'GPTDataset does (cached next to the data, as Megatron caches them) and prints samples ' +
    '--start to --start + --count - 1.',
  options: {
    'data-path': {
      type: 'string',
      value: 'PREFIX',
      description: 'indexed dataset prefix (<prefix>.bin / <prefix>.idx)',
      required: true,
    },
    split: {
      type: 'string',
      value: 'A,B,C',
      description: 'Megatron split string',
      default: '969,30,1',
    },
    'seq-length': { type: 'string', value: 'N', description: 'tokens per sample', required: true },
    seed: { type: 'string', value: 'N', description: 'random seed', default: '1234' },
    'train-samples': {
      type: 'string',
      value: 'N',
      description: 'training samples requested (sets the number of epochs)',
      required: true,
    },
    start: {
      type: 'string',
      value: 'N',
      description: 'first sample to print',
      default: '0',
    },
    count: {
      type: 'string',
      value: 'N',
      description: 'number of samples to print',
      default: '1',
    },
    'cache-dir': {
      type: 'string',
      value: 'DIR',
      description: 'where the index files are cached (default: <data dir>/cache/GPTDataset_indices)',
      aliases: ['data-cache-path'],
    },
  },
  examples: [
    'data samples --data-path data/c4_text_document --seq-length 4096 --train-samples 1000 --count 2',
  ],
  run: async ({ options, io }) => {
    await writeTrainingSamples(parseOptions(SamplesOptions, options, COMMAND), io);
  },
};

const group: CommandGroup = {
  name: 'data',
  summary: 'inspect training data',
  commands: { samples: { summary: samples.summary, load: async () => samples } },
};
export default group;
