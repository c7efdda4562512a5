// Every run config of every family folder validates (placeholders included: validation opens no
// file), the tiny configs point at a tiny HF config of the family's architecture and at the data
// tiny-data.mjs writes, and the real ones state Pai-Megatron-Patch's layout (on GPUs), whose memory per rank
// (Megatron's estimate, on the real HF config where the shared folder has it) is the one the
// family README quotes.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseHfConfig } from '@megapatch/convert';
import { formatGiB, theoreticalMemory } from '@megapatch/models';
import { sharedPath, skipWithoutShared } from '@megapatch/test-support';
import { loadRunConfig } from '@megapatch/train';
import { describe, expect, it } from 'vitest';
import { PRETRAIN_PREFIX, SFT_PREFIX } from '../tiny-data.mjs';
import { EXAMPLES_DIR, FAMILIES, familyDir, yamlFiles } from './families.js';

const SKIP_SHARED = skipWithoutShared(import.meta.url);
/** The repository root: run configs name paths from there. */
const ROOT = path.resolve(EXAMPLES_DIR, '..');

describe.each(FAMILIES.map((f) => [f.id, f] as const))('examples/%s', (_id, family) => {
  const dir = familyDir(family);
  const at = (f: string) => path.join(dir, f);
  const tinyYamls = family.tiny.flatMap((t) => [`${t.name}-pretrain.yaml`, `${t.name}-sft.yaml`]);

  it('holds a README, the real and tiny run configs and the tiny HF configs', () => {
    expect(fs.existsSync(at('README.md'))).toBe(true);
    expect(yamlFiles(family)).toEqual([...Object.keys(family.real), ...tinyYamls].sort());
    for (const t of family.tiny) expect(fs.existsSync(at(`${t.configDir}/config.json`))).toBe(true);
  });

  it.each(yamlFiles(family))('%s validates with loadRunConfig', (file) => {
    const c = loadRunConfig(at(file));
    expect(c.logging.runDir).toMatch(file.startsWith('tiny') ? `examples/${family.id}/runs/` : /^runs\//);
    expect(c.checkpoint.save).not.toBeNull();
    expect(c.checkpoint.exportHf).not.toBeNull();
  });

  it.each(family.tiny.map((t) => [t.name, t] as const))(
    '%s: the family architecture at a tiny size',
    (_n, t) => {
      const parsed = parseHfConfig(at(`${t.configDir}/config.json`));
      expect(parsed.spec.architectures[0]).toBe(family.architecture);
      const c = parsed.transformerConfig;
      expect(c.hiddenSize).toBe(64);
      expect(c.numLayers).toBe(2);
      expect(c.vocabSize).toBe(512);
      expect(c.moe !== null).toBe(family.moe);
      if (c.moe) {
        expect(c.moe.numExperts).toBe(4);
        expect(c.moe.routerTopk).toBe(2);
      }
      expect(c.mtpNumLayers).toBe(t.mtp ? 1 : 0);
      if (t.mtp) expect(c.mla).not.toBeNull();
    },
  );

  it.each(family.tiny.map((t) => [t.name, t] as const))(
    '%s: pre-training builds from its config on runs/data, SFT fine-tunes its export',
    (_n, t) => {
      const rel = `examples/${family.id}`;
      const pre = loadRunConfig(at(`${t.name}-pretrain.yaml`));
      expect(pre.model.config).toBe(`${rel}/${t.configDir}/config.json`);
      expect(fs.existsSync(path.join(ROOT, pre.model.config as string))).toBe(true);
      expect(pre.model.load).toBeNull();
      expect(pre.data.dataPath).toEqual([`${rel}/runs/data/${PRETRAIN_PREFIX}`]);
      const sft = loadRunConfig(at(`${t.name}-sft.yaml`));
      expect(sft.model.load).toBe(pre.checkpoint.exportHf);
      expect(sft.data.sft?.prefix).toBe(`${rel}/runs/data/${SFT_PREFIX}`);
      for (const c of [pre, sft]) {
        expect(c.training.trainIters).toBeGreaterThanOrEqual(10);
        expect(c.training.trainIters).toBeLessThanOrEqual(20);
        expect(c.parallel.tensorModelParallelSize).toBe(1);
        expect(c.parallel.expertModelParallelSize).toBe(1);
      }
    },
  );

  it.each(Object.keys(family.real))(
    "%s loads a converted checkpoint on GPUs at Pai-Megatron-Patch's bf16 layout",
    (file) => {
      const c = loadRunConfig(at(file));
      expect(c.model.load).toMatch(/^(ckpt|runs)\//);
      expect(c.model.config).toBeNull();
      expect(c.model.dtype).toBe('bf16');
      expect(c.training.device).toBe('cuda');
      const want = family.real[file];
      expect({
        tp: c.parallel.tensorModelParallelSize,
        pp: c.parallel.pipelineModelParallelSize,
        ep: c.parallel.expertModelParallelSize,
        etp: c.parallel.expertTensorParallelSize ?? undefined,
        firstStageLayers: c.parallel.decoderFirstPipelineNumLayers ?? undefined,
      }).toEqual({
        tp: want.tp,
        pp: want.pp,
        ep: want.ep,
        etp: want.etp,
        firstStageLayers: want.firstStageLayers,
      });
      if (family.moe) expect(c.model.moeTokenDispatcherType).toBe('alltoall');
      expect(c.parallel.useDistributedOptimizer).toBe(true);
      expect(c.optimizer.optimizerCpuOffload ? c.optimizer.optimizerOffloadFraction : 0).toBe(
        want.optimizerOffload ?? 0,
      );
      expect(c.parallel.sequenceParallel).toBe(c.parallel.tensorModelParallelSize > 1);
      expect(file.includes('sft') ? c.data.sft : c.data.dataPath).not.toBeNull();
    },
  );

  it.skipIf(SKIP_SHARED)('the real layouts fit the real models; the README quotes their memory', () => {
    const readme = fs.readFileSync(at('README.md'), 'utf8');
    for (const [file, rest] of Object.entries(family.real)) {
      if (rest.sharedConfig === null) continue;
      const c = loadRunConfig(at(file));
      const cfg = parseHfConfig(sharedPath(`data/configs/${rest.sharedConfig}`)).transformerConfig;
      const mem = theoreticalMemory(cfg, {
        tp: c.parallel.tensorModelParallelSize,
        ep: c.parallel.expertModelParallelSize,
        pp: c.parallel.pipelineModelParallelSize,
        dp: rest.dp,
        ...(c.parallel.expertTensorParallelSize ? { etp: c.parallel.expertTensorParallelSize } : {}),
        ...(c.parallel.decoderFirstPipelineNumLayers
          ? { firstStageLayers: c.parallel.decoderFirstPipelineNumLayers }
          : {}),
        seqLength: c.data.seqLength,
        microBatchSize: c.training.microBatchSize,
        numMicroBatches: c.training.globalBatchSize / (c.training.microBatchSize * rest.dp),
        sequenceParallel: c.parallel.sequenceParallel,
        distributedOptimizer: c.parallel.useDistributedOptimizer,
        optimizerOffloadFraction: c.optimizer.optimizerCpuOffload ? c.optimizer.optimizerOffloadFraction : 0,
        recompute: c.model.recomputeGranularity ?? 'none',
      });
      if (!file.includes('sft'))
        expect(readme, `${file}: ${formatGiB(mem.total)}`).toContain(formatGiB(mem.total));
    }
  });
});
