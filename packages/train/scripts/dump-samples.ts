// The inputs of the training-parity fixture (test/fixtures/train-parity.json): a fixed F32 Llama HF
// checkpoint, a fixed indexed corpus, the run settings, and the train split's samples in
// GPTDataset order for the PyTorch reference (scripts/reference_train.py). The samples come from
// @megapatch/data's GPTDataset, which is checked index for index against a numpy statement of
// Megatron's GPTDataset (packages/data/test/gpt-dataset.test.ts); what the fixture checks is the
// training loop, not the sampling. test/parity.test.ts imports writeParityInputs to rebuild the
// same bytes.
// Usage: tsx scripts/dump-samples.ts <outDir>   → <outDir>/hf/, <outDir>/corpus.{bin,idx},
// <outDir>/samples.json
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { SYNTHETIC_MODELS, writeSyntheticHfCheckpoint } from '@megapatch/convert/testing';
import { GPTDataset, IndexedDataset, IndexedDatasetBuilder } from '@megapatch/data';

/** The settings of the parity run (Megatron's argument names, camelCased). */
export const PARITY = {
  /** Synthetic model of @megapatch/convert/testing: untied, GQA 8/2, llama3 RoPE scaling. */
  model: 'llama',
  seqLength: 32,
  split: '90,10,0',
  seed: 7,
  eodTokenId: 2,
  /** Masks the loss where the input is EOD, so micro-batches carry different token counts. */
  eodMaskLoss: true,
  trainIters: 8,
  globalBatchSize: 8,
  microBatchSize: 2,
  lr: 1e-2,
  minLr: 1e-3,
  weightDecay: 0.1,
  adamBeta1: 0.9,
  adamBeta2: 0.999,
  adamEps: 1e-8,
  clipGrad: 1,
  lrDecayStyle: 'cosine',
  lrWarmupIters: 2,
} as const;

/** Where writeParityInputs put the checkpoint and the corpus, and a digest of their bytes. */
export interface ParityInputs {
  hf: string;
  /** The corpus prefix (`<prefix>.bin/.idx`). */
  data: string;
  /** sha256 of the checkpoint's and the corpus's files, to tell a changed input from a changed loop. */
  sha256: string;
}

/** Writes the parity corpus: 400 documents of counting patterns, each ended by EOD (uint16). */
function writeCorpus(prefix: string): void {
  const b = new IndexedDatasetBuilder(prefix, { dtype: 'uint16' });
  let a = 12345;
  for (let d = 0; d < 400; d++) {
    a = (a * 1103515245 + 12345) % 2147483648;
    const start = 10 + (a % 50);
    const step = 1 + (a % 3);
    // every other document is 1-3 tokens long: samples then differ in how many EOD inputs the
    // loss mask drops, which is what tells a mean of micro-batch means from a token mean
    const len = (a >> 8) % 2 === 0 ? 1 + (a % 3) : 20 + (a % 30);
    const doc: number[] = [];
    for (let i = 0; i < len; i++) doc.push(10 + ((start + i * step) % 680));
    doc.push(PARITY.eodTokenId);
    b.addDocument(doc);
  }
  b.finalize();
}

/** Writes the parity checkpoint (`<dir>/hf`, F32, seed 0) and corpus (`<dir>/corpus`). */
export function writeParityInputs(dir: string): ParityInputs {
  const hf = path.join(dir, 'hf');
  const data = path.join(dir, 'corpus');
  const model = SYNTHETIC_MODELS.find((m) => m.id === PARITY.model);
  if (!model) throw new Error(`@megapatch/convert/testing has no synthetic model "${PARITY.model}"`);
  writeSyntheticHfCheckpoint(hf, model.config, { dtype: 'F32', seed: 0, maxShardSize: '1GB' });
  writeCorpus(data);
  const h = createHash('sha256');
  for (const f of [
    path.join(hf, 'config.json'),
    path.join(hf, 'model.safetensors'),
    `${data}.bin`,
    `${data}.idx`,
  ]) {
    h.update(fs.readFileSync(f));
  }
  return { hf, data, sha256: h.digest('hex') };
}

/** One train sample as the reference reads it. */
interface SampleJson {
  tokens: number[];
  labels: number[];
  lossMask: number[];
}

/** The first trainIters × globalBatchSize samples of the train split, as the trainer builds it. */
function trainSamples(data: string): SampleJson[] {
  const numSamples = PARITY.trainIters * PARITY.globalBatchSize;
  const dataset = GPTDataset.build({
    dataset: IndexedDataset.open(data),
    split: 'train',
    splitString: PARITY.split,
    sequenceLength: PARITY.seqLength,
    numSamples,
    seed: PARITY.seed,
    resetPositionIds: false,
    resetAttentionMask: false,
    eodMaskLoss: PARITY.eodMaskLoss,
    eodTokenId: PARITY.eodTokenId,
  });
  const out: SampleJson[] = [];
  for (let i = 0; i < numSamples; i++) {
    const s = dataset.getItem(i);
    out.push({ tokens: [...s.tokens], labels: [...s.labels], lossMask: [...s.lossMask] });
  }
  return out;
}

function main(): void {
  const outDir = process.argv[2];
  if (!outDir) {
    console.error('usage: tsx scripts/dump-samples.ts <outDir>');
    process.exit(2);
  }
  fs.mkdirSync(outDir, { recursive: true });
  const inputs = writeParityInputs(outDir);
  const samples = trainSamples(inputs.data);
  fs.writeFileSync(
    path.join(outDir, 'samples.json'),
    `${JSON.stringify({ config: { ...PARITY, inputsSha256: inputs.sha256 }, hf: 'hf', samples })}\n`,
  );
  console.log(`wrote ${inputs.hf}, ${inputs.data}.{bin,idx} and ${samples.length} samples to ${outDir}`);
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) main();
