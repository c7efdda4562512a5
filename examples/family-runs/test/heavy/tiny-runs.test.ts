// Each family's tiny runs exactly as its README says them, from the repository root of a scratch
// copy (the configs' relative paths and all): tiny-data.mjs writes runs/data/, <tiny>-pretrain.yaml
// trains the tiny model from scratch, saves a checkpoint and exports a Hugging Face folder,
// <tiny>-sft.yaml fine-tunes that export. The loss falls in both; each export loads as the family's
// architecture and gives its checkpoint's logits; and the same pre-training under
// `megapatch launch --nproc-per-node 2 -- megapatch train ... --parallel.tensorModelParallelSize 2`
// (with sequence parallelism where the model allows it, and the distributed optimizer, as the real
// layouts) logs the losses of the one-process run.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseHfConfig } from '@megapatch/convert';
import { loadModel } from '@megapatch/models';
import { fromTypedArray, noGrad, setNumThreads, type Tensor } from '@megapatch/tensor';
import { loadRunConfig, readRunMetrics, train } from '@megapatch/train';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeTinyData } from '../../tiny-data.mjs';
import { EXAMPLES_DIR, FAMILIES, type Family, familyDir, type TinyVariant, tinyFiles } from '../families.js';

const CLI = path.join(EXAMPLES_DIR, '..', 'packages', 'cli', 'bin', 'megapatch.js');
const root = fs.mkdtempSync(path.join(os.tmpdir(), 'mp-family-runs-'));
const home = process.cwd();
const summary: string[] = [];

beforeAll(() => {
  // Matrices of hidden size 64 gain nothing from threads, and on a busy machine OpenMP's waiting
  // threads make these runs about ten times slower.
  setNumThreads(1);
  process.chdir(root);
});
afterAll(() => {
  process.chdir(home);
  fs.rmSync(root, { recursive: true, force: true });
  console.log(`tiny runs (wall time, loss at the first -> last iteration):\n${summary.join('\n')}`);
});

const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;

/** Logits of a loaded model (HF folder or checkpoint) on a fixed row of 16 tokens. */
function logitsOf(dir: string): Float32Array {
  const { model } = loadModel(dir, { dtype: 'float32' });
  try {
    model.eval();
    return noGrad(() => {
      const ids = fromTypedArray(
        BigInt64Array.from({ length: 16 }, (_, i) => BigInt(10 + ((i * 7) % 400))),
        [1, 16],
      );
      const out = model.forward(ids).logits as Tensor;
      const v = Float32Array.from(out.toTypedArray() as Float32Array);
      out.dispose();
      ids.dispose();
      return v;
    });
  } finally {
    model.dispose();
  }
}

/** Largest difference of two logit rows (the padded vocabulary's −∞ columns left out). */
function maxDiff(a: Float32Array, b: Float32Array): number {
  expect(a.length).toBe(b.length);
  let d = 0;
  for (let i = 0; i < a.length; i++) if (Number.isFinite(a[i])) d = Math.max(d, Math.abs(a[i] - b[i]));
  return d;
}

interface RunSummary {
  seconds: number;
  losses: number[];
}

/** Trains `file` (relative to the root); checks the loss, the checkpoint, the metrics, the export. */
async function run(family: Family, t: TinyVariant, file: string, minDrop: number): Promise<RunSummary> {
  const config = loadRunConfig(file);
  const lines: string[] = [];
  const t0 = performance.now();
  const r = await train(config, { log: (l) => lines.push(l), report: false });
  const seconds = (performance.now() - t0) / 1000;
  const iters = config.training.trainIters as number; // the tiny configs give iterations
  expect(r.exitReason).toBe('done');
  expect(r.losses).toHaveLength(iters);
  for (const l of r.losses) expect(Number.isFinite(l)).toBe(true);
  expect(mean(r.losses.slice(-3)), lines.join('\n')).toBeLessThan(mean(r.losses.slice(0, 3)) - minDrop);

  // the checkpoint of the last iteration, and the metrics of every iteration
  const save = config.checkpoint.save as string;
  const latest = fs.readFileSync(path.join(save, 'latest_checkpointed_iteration.txt'), 'utf8');
  expect(latest.trim()).toBe(String(iters));
  const metrics = readRunMetrics(config.logging.runDir);
  expect(metrics.train).toHaveLength(iters);
  if (family.moe) expect(Object.keys(metrics.train[0].moe?.expertLoad ?? {})).not.toHaveLength(0);
  for (const m of metrics.train) {
    if (t.mtp) expect(m.moe?.mtpLoss).toBeGreaterThan(0);
    else expect(m.moe?.mtpLoss).toBeUndefined();
  }

  // the exported HF folder loads as the family's architecture and computes what the checkpoint does
  const hf = config.checkpoint.exportHf as string;
  const exported = JSON.parse(fs.readFileSync(path.join(hf, 'config.json'), 'utf8'));
  expect(exported.architectures).toEqual([family.architecture]);
  expect(exported.num_nextn_predict_layers ?? 0).toBe(t.mtp ? 1 : 0);
  expect(maxDiff(logitsOf(hf), logitsOf(save))).toBeLessThan(1e-4);
  return { seconds, losses: r.losses };
}

/** `<tiny>-pretrain.yaml` on two processes at TP=2 through the CLI; returns its logged losses. */
function runTp2(family: Family, t: TinyVariant): RunSummary {
  const rel = `examples/${family.id}`;
  const cfg = parseHfConfig(path.join(rel, t.configDir, 'config.json')).transformerConfig;
  // @megapatch/models refuses sequence parallelism with MoE or MLA layers for now
  const sp = cfg.moe === null && cfg.mla === null;
  const out = `${rel}/runs/${t.name}-pretrain-tp2`;
  const t0 = performance.now();
  const r = spawnSync(
    process.execPath,
    [
      CLI,
      'launch',
      '--nproc-per-node',
      '2',
      '--',
      process.execPath,
      CLI,
      'train',
      '--config',
      `${rel}/${t.name}-pretrain.yaml`,
      '--parallel.tensorModelParallelSize',
      '2',
      '--parallel.sequenceParallel',
      String(sp),
      '--parallel.useDistributedOptimizer',
      'true',
      '--logging.runDir',
      out,
      '--checkpoint.save',
      `${out}/ckpt`,
      '--checkpoint.exportHf',
      `${out}/hf`,
    ],
    { encoding: 'utf8', env: { ...process.env, MEGAPATCH_NUM_THREADS: '1' }, timeout: 240_000 },
  );
  expect(r.status, `${r.stdout}\n${r.stderr}`).toBe(0);
  const seconds = (performance.now() - t0) / 1000;
  return { seconds, losses: readRunMetrics(out).train.map((m) => m.lmLoss ?? Number.NaN) };
}

const fmt = (x: RunSummary) =>
  `${x.seconds.toFixed(1).padStart(5)} s, ${x.losses[0].toFixed(3)} -> ${(x.losses.at(-1) as number).toFixed(3)}`;

describe.each(FAMILIES.map((f) => [f.id, f] as const))('examples/%s tiny runs', (_id, family) => {
  beforeAll(() => {
    const dst = path.join(root, 'examples', family.id);
    fs.mkdirSync(dst, { recursive: true });
    for (const f of tinyFiles(family)) {
      fs.cpSync(path.join(familyDir(family), f), path.join(dst, f), { recursive: true });
    }
    writeTinyData(path.join('examples', family.id, 'runs', 'data'));
  });

  it.each(family.tiny.map((t) => [t.name, t] as const))(
    '%s: pre-trains from scratch (also at TP=2), then fine-tunes the export',
    async (name, t) => {
      const rel = `examples/${family.id}`;
      const pre = await run(family, t, `${rel}/${name}-pretrain.yaml`, 0.8);
      const tp2 = runTp2(family, t);
      expect(tp2.losses).toHaveLength(pre.losses.length);
      for (const [i, l] of tp2.losses.entries()) expect(Math.abs(l - pre.losses[i])).toBeLessThan(1e-5);
      expect(
        maxDiff(logitsOf(`${rel}/runs/${name}-pretrain-tp2/hf`), logitsOf(`${rel}/runs/${name}-pretrain/hf`)),
      ).toBeLessThan(1e-3);
      const sft = await run(family, t, `${rel}/${name}-sft.yaml`, 0.5);
      summary.push(
        `  ${`${family.id}/${name}`.padEnd(28)} pre-training ${fmt(pre)} | TP=2 ${fmt(tp2)} | SFT ${fmt(sft)}`,
      );
    },
  );
});
