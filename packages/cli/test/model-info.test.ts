import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseHfConfig } from '@megapatch/convert';
import { SYNTHETIC_MODELS, writeSyntheticHfCheckpoint } from '@megapatch/convert/testing';
import { theoreticalMemory } from '@megapatch/models';
import { sharedPath, skipWithoutShared } from '@megapatch/test-support';
import { afterAll, describe, expect, it } from 'vitest';
import { parseCommandArgs } from '../src/command.js';
import { runHfToMegapatch } from '../src/commands/convert.js';
import { formatModelInfo, info, modelInfo, runModelInfo } from '../src/commands/model.js';
import { CliError, UsageError } from '../src/errors.js';
import { memoryIo } from '../src/io.js';
import { megapatch, oneLine, tempDir } from './helpers.js';

const here = dirname(fileURLToPath(import.meta.url));
const bin = join(here, '..', 'bin', 'megapatch.js');
const configs = sharedPath('data/configs');

describe.skipIf(skipWithoutShared(import.meta.url))('megapatch model info on the real configs', () => {
  it('reports architecture, config and parameter counts of Qwen3-30B-A3B', () => {
    const m = modelInfo(join(configs, 'Qwen3-30B-A3B.json'));
    expect(m.architecture).toBe('Qwen3MoeForCausalLM');
    expect(m.transformerConfig.numLayers).toBe(48);
    expect(m.parameters.total / 1e9).toBeCloseTo(30.5, 1);
    expect(m.parameters.activePerToken).toBeLessThan(m.parameters.total / 8);
    expect(formatModelInfo(m)).toContain('experts            128, top-8');
  });

  it('prints JSON from the command line', () => {
    const out = execFileSync(
      process.execPath,
      [bin, 'model', 'info', '--config', join(configs, 'Llama-3.1-8B.json'), '--json'],
      {
        encoding: 'utf8',
      },
    );
    const m = JSON.parse(out);
    expect(m.architecture).toBe('LlamaForCausalLM');
    expect(Math.round(m.parameters.total / 1e7) / 100).toBe(8.03);
  });

  it('names the file for a config that is not a Hugging Face config', () => {
    expect(() => modelInfo(join(configs, 'deepseek-native', 'deepseek_v3_repo_config_16B.json'))).toThrow(
      /deepseek_v3_repo_config_16B\.json/,
    );
  });
});

/** Runs `megapatch model info <argv>` in-process: the flags parsed as the binary parses them. */
function run(argv: string[]) {
  const io = memoryIo();
  const m = runModelInfo(parseCommandArgs(info, argv).options, io);
  return { m, text: io.lines.join('\n') };
}

describe('megapatch model info: memory per rank', () => {
  const root = tempDir('model-info');
  afterAll(() => fs.rmSync(root, { recursive: true, force: true }));
  const hf = join(root, 'hf');
  writeSyntheticHfCheckpoint(
    hf,
    SYNTHETIC_MODELS.find((m) => m.id === 'qwen3-moe')?.config as Record<string, unknown>,
    { seed: 5 },
  );
  const cfg = parseHfConfig(hf).transformerConfig;

  it("says how much of each head rotates when it is not all of it (Phi-4-mini's 3/4)", () => {
    const phi = join(root, 'phi4-mini');
    writeSyntheticHfCheckpoint(
      phi,
      SYNTHETIC_MODELS.find((m) => m.id === 'phi4-mini')?.config as Record<string, unknown>,
      { seed: 5 },
    );
    expect(run(['--config', phi]).text).toContain(
      "rotary             the first 6 of each head's 8 channels (rotary percent 0.75)",
    );
    expect(run(['--config', hf]).text).not.toContain('rotary ');
  });

  it('prints no memory without a layout or batch flag', () => {
    const { m, text } = run(['--config', hf]);
    expect(m.source).toBe('huggingface');
    expect(m.memory).toBeUndefined();
    expect(text).not.toContain('memory per rank');
    expect(JSON.parse(run(['--config', hf, '--json']).text)).not.toHaveProperty('memory');
  });

  it("takes Megatron's long names and gives the library's figures, as a table and as JSON", () => {
    const argv = [
      '--config',
      hf,
      '--tensor-model-parallel-size',
      '2',
      '--pipeline-model-parallel-size',
      '2',
      '--expert-model-parallel-size',
      '2',
      '--expert-tensor-parallel-size',
      '1',
      '--dp',
      '2',
      '--seq-length',
      '64',
      '--micro-batch-size',
      '2',
      '--global-batch-size',
      '16',
      '--use-distributed-optimizer',
      '--sequence-parallel',
      '--recompute-granularity',
      'selective',
    ];
    const { m, text } = run(argv);
    const expected = theoreticalMemory(cfg, {
      tp: 2,
      pp: 2,
      ep: 2,
      etp: 1,
      dp: 2,
      seqLength: 64,
      microBatchSize: 2,
      numMicroBatches: 4,
      distributedOptimizer: true,
      sequenceParallel: true,
      recompute: 'selective',
    });
    expect(m.memory).toEqual(expected);
    expect(text).toContain('layout             tp=2 pp=2 ep=2 etp=1 dp=2 cp=1: 8 GPUs, expert dp=2');
    expect(text).toContain('batch              seq-length 64 × micro-batch-size 2, 4 micro-batches per step');
    expect(text).toMatch(/^ +stage 0 \(peak\) +stage 1$|^ +stage 0 +stage 1 \(peak\)$/m);
    for (const row of ['weights', 'gradients', 'optimizer states', 'activations / micro-batch', 'total'])
      expect(text).toMatch(new RegExp(`^${row} +[\\d.]+ GiB +[\\d.]+ GiB$`, 'm'));
    expect(text).toContain(`peak               ${(expected.total / 2 ** 30).toFixed(2)} GiB per GPU`);
    const json = JSON.parse(run([...argv, '--json']).text);
    expect(json.memory.total).toBe(expected.total);
    expect(json.memory.stages[0].parameters).toEqual(expected.stages[0].parameters);
  });

  it('defaults: one rank, the sequence no longer than the model allows, fp16 weights with fp16 gradients', () => {
    const { m, text } = run(['--config', hf, '--fp16']);
    const l = m.memory?.layout;
    expect(l).toMatchObject({ tp: 1, pp: 1, ep: 1, etp: 1, dp: 1, cp: 1, microBatchSize: 1 });
    expect(l?.seqLength).toBe(Math.min(4096, cfg.maxPositionEmbeddings));
    expect(l?.paramDtype).toBe('fp16');
    expect(l?.gradDtype).toBe('fp16');
    expect(m.memory?.bytesPerParameter).toEqual({ weights: 2, gradients: 2, optimizer: 16 });
    expect(text).toContain('every rank');
    expect(run(['--config', hf, '--grad-reduce-in-bf16']).m.memory?.layout.gradDtype).toBe('bf16');
  });

  it('--optimizer-cpu-offload moves the optimizer states (or --optimizer-offload-fraction of them) off the device total', () => {
    const base = ['--config', hf, '--tp', '2', '--sequence-parallel', '--dp', '2', '--distributed-optimizer'];
    const on = run(base);
    const all = run([...base, '--optimizer-cpu-offload']);
    const part = run([...base, '--optimizer-cpu-offload', '--optimizer-offload-fraction', '0.25']);
    const states = on.m.memory?.stages[0].bytes.optimizer as number;
    expect(states).toBeGreaterThan(0);
    expect(all.m.memory?.stages[0].bytes).toMatchObject({ optimizer: 0, optimizerHost: states });
    expect((on.m.memory?.total as number) - (all.m.memory?.total as number)).toBeCloseTo(states, 3);
    expect(part.m.memory?.stages[0].bytes.optimizerHost).toBeCloseTo(0.25 * states, 3);
    expect(all.text).toContain('distributed optimizer, all of them offloaded to the host');
    expect(part.text).toContain('distributed optimizer, 0.25 of them offloaded to the host');
    expect(all.text).toMatch(/^ {2}offloaded to the host +\d+\.\d\d GiB$/m);
    expect(on.text).not.toContain('offloaded to the host');
    // the fraction alone (Megatron ignores it without --optimizer-cpu-offload)
    expect(
      run([...base, '--optimizer-offload-fraction', '0.5']).m.memory?.layout.optimizerOffloadFraction,
    ).toBe(0);
    expect(() => run([...base, '--optimizer-cpu-offload', '--optimizer-offload-fraction', '1.5'])).toThrow(
      '--optimizer-offload-fraction: must be a number from 0 to 1',
    );
  });

  it('reads a megapatch checkpoint, its root or one iteration folder, like the HF config', async () => {
    const ckpt = join(root, 'ckpt');
    await runHfToMegapatch({ 'hf-dir': hf, out: ckpt, tp: '2' }, memoryIo());
    const fromHf = modelInfo(hf, { tp: 2, seqLength: 64, sequenceParallel: true });
    for (const dir of [ckpt, join(ckpt, 'iter_0000000')]) {
      const m = modelInfo(dir, { tp: 2, seqLength: 64, sequenceParallel: true });
      expect(m.source).toBe('megapatch-checkpoint');
      expect(m.architecture).toBe('Qwen3MoeForCausalLM');
      expect(m.transformerConfig).toEqual(fromHf.transformerConfig);
      expect(m.parameters).toEqual(fromHf.parameters);
      expect(m.memory).toEqual(fromHf.memory);
    }
    expect(() => modelInfo(root)).toThrow(CliError);
    expect(() => modelInfo(root)).toThrow(
      /is neither a Hugging Face model folder \(no config\.json\) nor a megapatch checkpoint/,
    );
  });

  it('a layout that does not fit the model is a usage error naming every problem', () => {
    expect(() => run(['--config', hf, '--tp', '3'])).toThrow(UsageError);
    expect(() => run(['--config', hf, '--tp', '3'])).toThrow(
      /^Qwen3MoeForCausalLM: tp=3 does not divide 8 attention heads; tp=3 does not divide 2 query groups/,
    );
    expect(() => run(['--config', hf, '--tp', '2'])).toThrow(
      /MoE layers with tp=2 need sequence parallelism/,
    );
    expect(() => run(['--config', hf, '--pp', '3'])).toThrow(/pp=3 does not divide 4 layers/);
    expect(() => run(['--config', hf, '--ep', '4', '--dp', '2'])).toThrow(
      /ep × etp = 4 does not divide tp × cp × dp = 2/,
    );
    expect(() => run(['--config', hf, '--dp', '2', '--global-batch-size', '3'])).toThrow(
      '--global-batch-size 3 is not a multiple of micro-batch-size × dp = 2',
    );
    expect(() => run(['--config', hf, '--recompute-granularity', 'some'])).toThrow(
      "--recompute-granularity: must be none, selective or full, got 'some'",
    );
    const r = megapatch(['model', 'info', '--config', hf, '--tp', '3']);
    expect(r.status).toBe(2);
    expect(oneLine(r.stderr)).toMatch(/^megapatch model info: Qwen3MoeForCausalLM: tp=3 does not divide/);
  });
});

describe.skipIf(skipWithoutShared(import.meta.url))(
  'megapatch model info: memory of the real configs',
  () => {
    it('DeepSeek-V3 at TP2 PP8 EP64 (7 and 6 layers on the end stages) through the binary', () => {
      const r = megapatch([
        'model',
        'info',
        '--config',
        join(configs, 'DeepSeek-V3.json'),
        '--tp',
        '2',
        '--pp',
        '8',
        '--ep',
        '64',
        '--etp',
        '1',
        '--dp',
        '64',
        '--decoder-first-pipeline-num-layers',
        '7',
        '--decoder-last-pipeline-num-layers',
        '6',
        '--seq-length',
        '4096',
        '--sequence-parallel',
        '--use-distributed-optimizer',
        '--json',
      ]);
      expect(r.status, r.stderr).toBe(0);
      const m = JSON.parse(r.stdout).memory;
      expect(m.layout.worldSize).toBe(1024);
      expect(m.layout.stageLayers).toEqual([7, 8, 8, 8, 8, 8, 8, 6]);
      expect(m.stages[7].mtpLayers).toBe(1);
      expect(m.totalParameters / 1e9).toBeCloseTo(682.6, 1);
      // Every rank of a 1024-GPU job fits an 80 GB card at this micro-batch size.
      expect(m.total / 2 ** 30).toBeLessThan(80);
    });

    it('Qwen3-30B-A3B at TP4 PP4 EP8', () => {
      const { m, text } = run([
        '--config',
        join(configs, 'Qwen3-30B-A3B.json'),
        '--tp',
        '4',
        '--pp',
        '4',
        '--ep',
        '8',
        '--etp',
        '1',
        '--dp',
        '2',
        '--seq-length',
        '4096',
        '--sequence-parallel',
        '--distributed-optimizer',
      ]);
      expect(m.memory?.layout.paddedVocabSize).toBe(152064);
      expect(m.memory?.peakStage).toBe(0);
      expect(text).toMatch(/^ +stage 0 \(peak\) +stage 3$/m);
      expect(text).toMatch(/^ {2}routed experts +906\.0M +906\.0M$/m);
    });
  },
);
