// Generation on the device against the CPU: the llama fixture checkpoint of @megapatch/models
// decodes two left-padded prompts with its KV cache (attention of one new query against the cached
// keys under the padding mask, the cache's appends) greedily, with top-k, and with temperature and
// top-p drawn where the logits are (sampleOnDevice): the tokens must be the CPU's, and a decoding
// step must read back only what it chose (b ids; b·k values and ids; or one float64 read of the row
// sums with the best logits), never b rows of the vocabulary.
// usage (repository root): packages/cuda/node_modules/.bin/tsx packages/cuda/gpu/gen-check.mts [cuda:0 | cudaemu:0]
// Prints "GEN OK: ..." or "GEN FAIL: ..." lines; exits 1 on a failure.
import { register } from 'node:module';

register('../bench/src-resolve.mjs', import.meta.url);

const device = process.argv[2] ?? 'cuda:0';
const emu = device.startsWith('cudaemu');
const T: typeof import('@megapatch/tensor') = await import('@megapatch/tensor');
await import(emu ? '../src/emulator.js' : '../src/index.js');
// not a dependency of @megapatch/cuda: named through a variable (src-resolve.mjs finds it)
const modelsModule = '@megapatch/models';
const M: typeof import('@megapatch/models') = await import(modelsModule);
const { fixtureCheckpoint } = await import('../../models/test/helpers/fixtures.js');
const { recordReads } = await import('../../models/test/helpers/reads.js');

const prompts = [
  [1, 5, 9, 33, 100, 7],
  [2, 7, 11],
];
const steps = 10;
const cases: [string, Parameters<typeof M.generate>[2]][] = [
  ['greedy', {}],
  ['top-k 5, temperature 0.7', { temperature: 0.7, topK: 5, seed: 3 }],
  ['temperature 0.9', { temperature: 0.9, seed: 4 }],
  ['temperature 0.8, top-p 0.9', { temperature: 0.8, topP: 0.9, seed: 5 }],
];

/** Each row's tokens on `dev`, and the shapes of what the device read back (checks aside). */
function run(dev: string, opts: Parameters<typeof M.generate>[2]) {
  T.setDefaultDevice(dev);
  const { model } = M.loadModel(fixtureCheckpoint('llama'));
  const reads: string[] = [];
  // the queued checks' float64 stats ([n]) are read along with a read; top-p's draw reads a
  // float64 [b, 2m + 1]
  const stop = recordReads(T.getBackend(dev), (t) => {
    if (t.dtype !== 'float64' || t.ndim === 2) reads.push(`${t.dtype}[${t.shape}]`);
  });
  try {
    const tokens = M.generate(model, prompts, { ...opts, maxNewTokens: steps }).rows.map((r) => r.tokens);
    return { tokens, reads, vocab: model.config.vocabSize };
  } finally {
    stop();
    model.dispose();
    T.setDefaultDevice('cpu');
  }
}

let failures = 0;
for (const [name, opts] of cases) {
  try {
    const cpu = run('cpu', opts);
    const dev = run(device, opts);
    const problems: string[] = [];
    if (JSON.stringify(dev.tokens) !== JSON.stringify(cpu.tokens))
      problems.push(`tokens ${JSON.stringify(dev.tokens)} vs the CPU's ${JSON.stringify(cpu.tokens)}`);
    const wide = dev.reads.filter((r) => r.endsWith(`,${dev.vocab}]`) || r.endsWith(`,1,${dev.vocab}]`));
    if (wide.length > 0) problems.push(`read back rows of the vocabulary: ${wide.slice(0, 2).join(', ')}`);
    // one read a step (top-k: its values and ids)
    const most = name.startsWith('top-k') ? 2 * steps : steps;
    if (dev.reads.length > most)
      problems.push(`${dev.reads.length} reads for ${steps} steps: ${dev.reads.slice(0, 4).join(', ')} ...`);
    if (problems.length) {
      failures++;
      console.log(`GEN FAIL: ${name}: ${problems.join('; ')}`);
    } else {
      console.log(
        `GEN OK: ${name}: ${steps} tokens a row as on the CPU, reads ${[...new Set(dev.reads)].join(' ')}`,
      );
    }
  } catch (e) {
    failures++;
    console.log(`GEN FAIL: ${name}: ${String((e as Error).message).split('\n')[0]}`);
  }
}
process.exit(failures ? 1 : 0);
