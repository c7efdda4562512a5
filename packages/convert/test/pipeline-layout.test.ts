// pipelineStages against stage assignments worked out by hand from Megatron-Core's
// get_num_layers_to_build / get_transformer_layer_offset and PipelineParallelLayerLayout, and
// conversions with uneven stages: each tensor in its rank's file, the settings in metadata.json,
// bit-identical round trips through HF and through resharding.
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  Checkpoint,
  ConvertError,
  convertHfToMegapatch,
  convertMegapatchToHf,
  expandPipelineLayout,
  type ParallelLayout,
  type PipelineStages,
  type PipelineStagesInput,
  parseHfConfig,
  pipelineStages,
  reshardCheckpoint,
  resolvePipelineSplit,
  ShardedSafetensors,
} from '../src/index.js';
import { SYNTHETIC_MODELS, writeSyntheticHfCheckpoint } from '../src/testing/index.js';
import { convertError, scratch, snapshot, temporaries } from './helpers.js';

const tmp = scratch('pipeline-layout');

const range = (a: number, b: number) => Array.from({ length: b - a + 1 }, (_, i) => a + i);

/** Each stage in model order as `r<ppRank>v<vpStage> [E] first-last [m..] [L]`. */
function stageSummary(p: PipelineStages): string[] {
  return p.stages.map((s) => {
    const parts = [`r${s.ppRank}v${s.vpStage}`];
    if (s.embedding) parts.push('E');
    if (s.layers.length > 0) {
      expect(s.layers).toEqual(range(s.layers[0], s.layers[s.layers.length - 1]));
      parts.push(`${s.layers[0]}-${s.layers[s.layers.length - 1]}`);
    }
    for (const m of s.mtpLayers) parts.push(`m${m}`);
    if (s.loss) parts.push('L');
    return parts.join(' ');
  });
}

/** Global layers of each pp rank, every virtual stage together. */
const byRank = (p: PipelineStages) =>
  Array.from({ length: p.pp }, (_, r) => p.stages.filter((s) => s.ppRank === r).flatMap((s) => s.layers));

function fails(input: PipelineStagesInput, ...mentions: string[]): string {
  let err: unknown;
  try {
    pipelineStages(input);
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(ConvertError);
  const e = err as ConvertError;
  expect(e.code).toBe('INVALID_ARGUMENT');
  expect(e.message).not.toContain('\n');
  for (const m of mentions) expect(e.message).toContain(m);
  return e.message;
}

describe('even split', () => {
  it('cuts the layers into pp contiguous blocks, embedding first, loss and MTP last', () => {
    const p = pipelineStages({ numLayers: 8, pp: 2, mtpNumLayers: 1 });
    expect(p.vpp).toBe(1);
    expect(stageSummary(p)).toEqual(['r0v0 E 0-3', 'r1v0 4-7 m0 L']);
    expect(p.layerStage).toEqual([0, 0, 0, 0, 1, 1, 1, 1]);
    expect(p.mtpStage).toEqual([1]);
    expect(p.finalLayernormStage).toBe(1);
    expect(stageSummary(pipelineStages({ numLayers: 3, pp: 1 }))).toEqual(['r0v0 E 0-2 L']);
  });

  it('interleaves virtual stages as in Megatron docstring (8 layers, pp 2)', () => {
    // "Stage 0: [0, 1] [4, 5]; Stage 1: [2, 3] [6, 7]"
    const v2 = pipelineStages({ numLayers: 8, pp: 2, vpp: 2 });
    expect(stageSummary(v2)).toEqual(['r0v0 E 0-1', 'r1v0 2-3', 'r0v1 4-5', 'r1v1 6-7 L']);
    expect(byRank(v2)).toEqual([
      [0, 1, 4, 5],
      [2, 3, 6, 7],
    ]);
    // "Stage 0: [0] [2] [4] [6]; Stage 1: [1] [3] [5] [7]"
    expect(byRank(pipelineStages({ numLayers: 8, pp: 2, vpp: 4 }))).toEqual([
      [0, 2, 4, 6],
      [1, 3, 5, 7],
    ]);
  });
});

describe('uneven first / last pipeline ranks', () => {
  it('DeepSeek-V3: 61 layers at pp=8 with 5 first and 8 last, the rest 8 per middle rank', () => {
    const p = pipelineStages({
      numLayers: 61,
      mtpNumLayers: 1,
      pp: 8,
      decoderFirstPipelineNumLayers: 5,
      decoderLastPipelineNumLayers: 8,
    });
    expect(stageSummary(p)).toEqual([
      'r0v0 E 0-4',
      'r1v0 5-12',
      'r2v0 13-20',
      'r3v0 21-28',
      'r4v0 29-36',
      'r5v0 37-44',
      'r6v0 45-52',
      'r7v0 53-60 m0 L',
    ]);
    expect(p.finalLayernormStage).toBe(7);
  });

  it('only one of them set: the other ranks share the rest', () => {
    expect(stageSummary(pipelineStages({ numLayers: 5, pp: 2, decoderFirstPipelineNumLayers: 2 }))).toEqual([
      'r0v0 E 0-1',
      'r1v0 2-4 L',
    ]);
    expect(stageSummary(pipelineStages({ numLayers: 61, pp: 4, decoderLastPipelineNumLayers: 16 }))).toEqual([
      'r0v0 E 0-14',
      'r1v0 15-29',
      'r2v0 30-44',
      'r3v0 45-60 L',
    ]);
    // pp=1 is consistent only when the one rank holds every layer.
    expect(stageSummary(pipelineStages({ numLayers: 3, pp: 1, decoderFirstPipelineNumLayers: 3 }))).toEqual([
      'r0v0 E 0-2 L',
    ]);
  });

  it('with vpp=2 each rank splits its count into chunks, numbered in stage order', () => {
    // Megatron: total_virtual_chunks = 2/2 + 8/2 + 2/2 = 6; rank r>0 starts at
    // v*6 + 1 + (r-1)*2 (get_transformer_layer_offset).
    const p = pipelineStages({
      numLayers: 12,
      pp: 4,
      vpp: 2,
      decoderFirstPipelineNumLayers: 2,
      decoderLastPipelineNumLayers: 2,
    });
    expect(stageSummary(p)).toEqual([
      'r0v0 E 0-0',
      'r1v0 1-2',
      'r2v0 3-4',
      'r3v0 5-5',
      'r0v1 6-6',
      'r1v1 7-8',
      'r2v1 9-10',
      'r3v1 11-11 L',
    ]);
  });
});

describe('pipelineModelParallelLayout', () => {
  it('places the stages of the brief example "E|t*5|t*6|t,m,L"', () => {
    const p = pipelineStages({
      numLayers: 12,
      mtpNumLayers: 1,
      pp: 4,
      pipelineModelParallelLayout: 'E|t*5|t*6|t,m,L',
    });
    expect(stageSummary(p)).toEqual(['r0v0 E', 'r1v0 0-4', 'r2v0 5-10', 'r3v0 11-11 m0 L']);
    expect(p.finalLayernormStage).toBe(3);
  });

  it('DeepSeek-V3: 61 layers at pp=8, light first rank', () => {
    const p = pipelineStages({
      numLayers: 61,
      mtpNumLayers: 1,
      pp: 8,
      pipelineModelParallelLayout: 'Et*3|(t*8|)*6,t*10,m,L',
    });
    expect(stageSummary(p)).toEqual([
      'r0v0 E 0-2',
      'r1v0 3-10',
      'r2v0 11-18',
      'r3v0 19-26',
      'r4v0 27-34',
      'r5v0 35-42',
      'r6v0 43-50',
      'r7v0 51-60 m0 L',
    ]);
  });

  it('DeepSeek-V3 at pp=8 vpp=2: stage i is (rank i % pp, virtual stage i / pp), MTP standalone', () => {
    const p = pipelineStages({
      numLayers: 61,
      mtpNumLayers: 1,
      pp: 8,
      pipelineModelParallelLayout: 'Et*4|(t*4|)*13,t*5,m|L',
    });
    expect(p.vpp).toBe(2);
    expect(p.stages).toHaveLength(16);
    const d = stageSummary(p);
    expect(d[0]).toBe('r0v0 E 0-3');
    expect(d[7]).toBe('r7v0 28-31');
    expect(d[8]).toBe('r0v1 32-35');
    expect(d[13]).toBe('r5v1 52-55');
    expect(d[14]).toBe('r6v1 56-60 m0');
    expect(d[15]).toBe('r7v1 L');
    expect(byRank(p)[0]).toEqual([0, 1, 2, 3, 32, 33, 34, 35]);
    // With MTP layers the final norm follows the last decoder layer (rank 6), not the loss.
    expect(p.finalLayernormStage).toBe(14);
    // The recipe of Megatron's DeepSeek-V3 example: pp=16, vpp=2.
    const r = pipelineStages({
      numLayers: 61,
      mtpNumLayers: 1,
      pp: 16,
      pipelineModelParallelLayout: 'Et|(tt|)*30mL',
    });
    expect(r.vpp).toBe(2);
    expect(stageSummary(r)[0]).toBe('r0v0 E 0-0');
    expect(stageSummary(r)[16]).toBe('r0v1 31-32');
    expect(stageSummary(r)[31]).toBe('r15v1 m0 L');
  });

  it('matches the even split and the first/last split it spells out', () => {
    const strip = (p: PipelineStages) => p.stages;
    expect(
      strip(pipelineStages({ numLayers: 8, pp: 2, vpp: 2, pipelineModelParallelLayout: 'Ett|tt|tt|ttL' })),
    ).toEqual(strip(pipelineStages({ numLayers: 8, pp: 2, vpp: 2 })));
    expect(strip(pipelineStages({ numLayers: 5, pp: 2, pipelineModelParallelLayout: 'Ett|tttL' }))).toEqual(
      strip(pipelineStages({ numLayers: 5, pp: 2, decoderFirstPipelineNumLayers: 2 })),
    );
  });

  it('expands repetitions like Megatron parse_str_to_list', () => {
    expect(expandPipelineLayout('E|(t|)*2,t*3,L').map((s) => s.join(''))).toEqual(['E', 't', 't', 'tttL']);
    expect(expandPipelineLayout('(|ab)*0Et').map((s) => s.join(''))).toEqual(['Et']);
    expect(expandPipelineLayout('E||L').map((s) => s.join(''))).toEqual(['E', '', 'L']);
  });
});

describe('resolvePipelineSplit', () => {
  it('keeps vpp only above 1, derives it from a layout string, drops unset settings', () => {
    expect(resolvePipelineSplit(2, {})).toEqual({});
    expect(resolvePipelineSplit(2, { vpp: 1, decoderFirstPipelineNumLayers: undefined })).toEqual({});
    expect(resolvePipelineSplit(2, { pipelineModelParallelLayout: 'Et|t|t|tL' })).toEqual({
      vpp: 2,
      pipelineModelParallelLayout: 'Et|t|t|tL',
    });
    expect(resolvePipelineSplit(2, { vpp: 2, pipelineModelParallelLayout: 'Et|t|t|tL' }).vpp).toBe(2);
  });
});

describe('errors say what to change', () => {
  it('pp that does not divide the layers points at the uneven settings', () => {
    const m = fails({ numLayers: 28, pp: 3 }, 'pp=3 does not divide numLayers 28');
    expect(m).toContain(
      'set decoderFirstPipelineNumLayers / decoderLastPipelineNumLayers or pipelineModelParallelLayout',
    );
    fails({ numLayers: 61, pp: 8 }, 'pp=8 does not divide numLayers 61');
  });

  it('bad counts and sizes', () => {
    fails({ numLayers: 8, pp: 0 }, 'pp=0 must be an integer >= 1');
    fails({ numLayers: 8, pp: 2, vpp: 1.5 }, 'vpp=1.5');
    fails(
      { numLayers: 8, pp: 2, decoderFirstPipelineNumLayers: 0 },
      'decoderFirstPipelineNumLayers=0',
      'unset',
    );
    fails({ numLayers: 8, pp: 2, decoderLastPipelineNumLayers: -1 }, 'decoderLastPipelineNumLayers=-1');
    fails({ numLayers: 8, pp: 1, vpp: 2 }, 'vpp=2 needs pp >= 2');
    fails({ numLayers: 8, pp: 2, vpp: 3 }, 'vpp=3 does not divide the 4 layers of each pipeline rank');
  });

  it('first/last counts that do not fit', () => {
    fails(
      { numLayers: 61, pp: 8, decoderFirstPipelineNumLayers: 4, decoderLastPipelineNumLayers: 8 },
      'leaves 49 layers for 6 middle pipeline ranks',
    );
    fails(
      { numLayers: 5, pp: 2, decoderFirstPipelineNumLayers: 2, decoderLastPipelineNumLayers: 2 },
      'leaves 1 of numLayers 5 for 0 middle pipeline rank(s)',
    );
    fails(
      { numLayers: 5, pp: 3, decoderFirstPipelineNumLayers: 2, decoderLastPipelineNumLayers: 3 },
      'leaves 0 of numLayers 5 for 1 middle',
    );
    fails(
      { numLayers: 5, pp: 3, decoderFirstPipelineNumLayers: 6 },
      'decoderFirstPipelineNumLayers=6 is more than numLayers 5',
    );
    fails(
      { numLayers: 5, pp: 1, decoderFirstPipelineNumLayers: 2, decoderLastPipelineNumLayers: 3 },
      'together need pp >= 2',
    );
    fails(
      { numLayers: 12, pp: 4, vpp: 2, decoderFirstPipelineNumLayers: 3, decoderLastPipelineNumLayers: 1 },
      'vpp=2 does not divide the 3 layers of the first pipeline rank',
    );
    fails(
      { numLayers: 14, pp: 4, vpp: 2, decoderFirstPipelineNumLayers: 2, decoderLastPipelineNumLayers: 2 },
      'vpp=2 does not divide the 5 layers of the middle pipeline rank',
    );
  });

  it('layout strings: stage count, conflicts, symbols, counts and placement', () => {
    const l = (pipelineModelParallelLayout: string, more: Partial<PipelineStagesInput> = {}) => ({
      numLayers: 12,
      mtpNumLayers: 1,
      pp: 4,
      pipelineModelParallelLayout,
      ...more,
    });
    fails(l('E|t*5|t*6|t,m,L', { pp: 3 }), 'has 4 stages, not a multiple of pp=3');
    fails(l('E|t*5|t*6|t,m,L', { vpp: 2 }), 'vpp=2 conflicts with pipelineModelParallelLayout');
    fails(
      l('E|t*5|t*6|t,m,L', { decoderFirstPipelineNumLayers: 1 }),
      'cannot be combined with decoderFirstPipelineNumLayers',
    );
    fails(l(''), 'non-empty string');
    fails(l('E|t*5|x*6|t,m,L'), 'unknown symbol "x" in stage 2');
    fails(l('E|t*5| t*6|t,m,L'), 'unknown symbol " "');
    fails(l('E|t*5|t*5|t,m,L'), "has 11 't' (decoder layers) but the model has numLayers 12");
    fails(l('E|t*5|t*6|t,L'), "has 0 'm' (MTP layers) but the model has mtpNumLayers 1");
    fails(l('E|t*5|t*6|t,m,L', { mtpNumLayers: 0 }), "remove the 'm'");
    fails(l('t|Et*4|t*6|t,m,L'), "must start with 'E'");
    fails(l('E|t*5|Et*6|t,m,L'), "must start with 'E'");
    fails(l('E|t*5|t*6,L|t,m'), "must end with 'L'");
    fails(l('E|t*5|t*6|t,m,L|', { pp: 5 }), "must end with 'L'");
    fails(l('E|t*5|t*6|m,t,L'), "a 't' (decoder layer) follows an 'm'");
    fails(
      l('Et*6|t*6,m||L', { pp: 2 }),
      "stage 1 (pp rank 1, virtual stage 0) holds 'm'",
      'last virtual stage (1)',
    );
    fails(l('Et*6,m|m,t*6,L', { pp: 2, mtpNumLayers: 2 }), "follows an 'm'");
    fails(l('Et*12,m|m,L', { pp: 2, mtpNumLayers: 2 }), 'all 2 MTP layers must be in one stage');
    fails(l('E|t*99999999|L', { pp: 3 }), 'expands to more than');
  });
});

const synthetic = (id: string) =>
  SYNTHETIC_MODELS.find((m) => m.id === id)?.config as Record<string, unknown>;

/** Every tensor of an HF folder: name -> dtype, shape and SHA-256-free raw bytes. */
function readHf(dir: string): Map<string, { dtype: string; shape: number[]; data: Buffer }> {
  const st = ShardedSafetensors.open(dir);
  try {
    return new Map(
      st.keys().map((k) => {
        const t = st.read(k);
        return [k, { dtype: t.dtype, shape: [...t.shape], data: Buffer.from(t.data) }];
      }),
    );
  } finally {
    st.close();
  }
}

function expectSameHf(a: string, b: string): void {
  const x = readHf(a);
  const y = readHf(b);
  expect([...y.keys()].sort()).toEqual([...x.keys()].sort());
  for (const [k, t] of x) {
    const u = y.get(k);
    expect(u?.dtype, k).toBe(t.dtype);
    expect(u?.shape, k).toEqual(t.shape);
    expect(u?.data.equals(t.data), k).toBe(true);
  }
}

/** The pp rank of every piece file of every tensor of a checkpoint: name -> ranks. */
function ranksOf(root: string): Map<string, number[]> {
  const ck = Checkpoint.open(root);
  try {
    return new Map(
      ck
        .tensorNames()
        .map((n) => [n, [...new Set(ck.info(n).pieces.map((p) => Number(/_pp(\d+)_/.exec(p.file)?.[1])))]]),
    );
  } finally {
    ck.close();
  }
}

/** Checks each tensor sits on the pp rank `pipeline` gives its layer (embedding first, output last). */
function expectPlaced(root: string, pipeline: PipelineStages): void {
  const rank = (stage: number) => pipeline.stages[stage].ppRank;
  for (const [name, ranks] of ranksOf(root)) {
    const layer = /^decoder\.layers\.(\d+)\./.exec(name);
    const mtp = /^mtp\.layers\.(\d+)\./.exec(name);
    let want: number;
    if (layer) want = rank(pipeline.layerStage[Number(layer[1])]);
    else if (mtp) want = rank(pipeline.mtpStage[Number(mtp[1])]);
    else if (name.startsWith('embedding.')) want = 0;
    else if (name.startsWith('decoder.final_layernorm.')) want = rank(pipeline.finalLayernormStage);
    else want = pipeline.pp - 1;
    expect(ranks, name).toEqual([want]);
  }
}

describe('converting with uneven pipeline stages', () => {
  it('5 layers at pp=2 with decoderFirstPipelineNumLayers=2: placed, recorded, round trips to HF and through pp=1', async () => {
    const hf = tmp('llama5-hf');
    writeSyntheticHfCheckpoint(
      hf,
      { ...synthetic('llama'), num_hidden_layers: 5 },
      { seed: 5, maxShardSize: 100_000 },
    );
    const layout = { tp: 2, pp: 2, decoderFirstPipelineNumLayers: 2 };
    const uneven = tmp('llama5-pp2');
    await convertHfToMegapatch({ hfDir: hf, output: uneven, layout, chunkBytes: 2000 });

    const ck = Checkpoint.open(uneven);
    const recorded = ck.metadata.layout;
    ck.close();
    expect(recorded).toEqual({ tp: 2, pp: 2, ep: 1, etp: 2, dp: 1, decoderFirstPipelineNumLayers: 2 });
    // What a reader needs to know the stages: the layout and the model's layer counts.
    const pipeline = pipelineStages({ ...recorded, numLayers: 5 });
    expect(stageSummary(pipeline)).toEqual(['r0v0 E 0-1', 'r1v0 2-4 L']);
    expectPlaced(uneven, pipeline);
    const ranks = ranksOf(uneven);
    expect(ranks.get('decoder.layers.1.mlp.linear_fc2.weight')).toEqual([0]);
    expect(ranks.get('decoder.layers.2.mlp.linear_fc2.weight')).toEqual([1]);
    expect(ranks.get('output_layer.weight')).toEqual([1]);

    const back = tmp('llama5-back');
    await convertMegapatchToHf({ input: uneven, output: back });
    expectSameHf(hf, back);

    const single = tmp('llama5-pp1');
    await reshardCheckpoint({ input: uneven, output: single, layout: { tp: 1, pp: 1 } });
    expect([...new Set([...ranksOf(single).values()].flat())]).toEqual([0]);
    const again = tmp('llama5-pp2-again');
    await reshardCheckpoint({ input: single, output: again, layout, chunkBytes: 5000 });
    // Resharding back gives the very checkpoint the conversion wrote, every byte of every file.
    expect(snapshot(again)).toEqual(snapshot(uneven));
    const back2 = tmp('llama5-back2');
    await convertMegapatchToHf({ input: single, output: back2 });
    expectSameHf(hf, back2);
  });

  it('DeepSeek-V3 with a layout string at pp=2 vpp=2: interleaved layers, standalone MTP, final norm by the last layer', async () => {
    const hf = tmp('dsv3-hf');
    writeSyntheticHfCheckpoint(hf, synthetic('deepseek-v3'), { seed: 9 });
    const { transformerConfig: cfg } = parseHfConfig(hf);
    expect([cfg.numLayers, cfg.mtpNumLayers]).toEqual([4, 1]);
    const layout: Partial<ParallelLayout> = {
      tp: 1,
      pp: 2,
      ep: 2,
      pipelineModelParallelLayout: 'Et|t|tt|mL',
    };
    const out = tmp('dsv3-layout');
    await convertHfToMegapatch({ hfDir: hf, output: out, layout, chunkBytes: 4000 });
    const ck = Checkpoint.open(out);
    const recorded = ck.metadata.layout;
    ck.close();
    expect(recorded).toEqual({
      tp: 1,
      pp: 2,
      ep: 2,
      etp: 1,
      dp: 1,
      vpp: 2,
      pipelineModelParallelLayout: 'Et|t|tt|mL',
    });
    const pipeline = pipelineStages({ ...recorded, numLayers: 4, mtpNumLayers: 1 });
    expect(stageSummary(pipeline)).toEqual(['r0v0 E 0-0', 'r1v0 1-1', 'r0v1 2-3', 'r1v1 m0 L']);
    expectPlaced(out, pipeline);
    const ranks = ranksOf(out);
    expect(ranks.get('decoder.final_layernorm.weight')).toEqual([0]);
    expect(ranks.get('mtp.layers.0.eh_proj.weight')).toEqual([1]);
    expect(ranks.get('decoder.layers.3.input_layernorm.weight')).toEqual([0]);

    const back = tmp('dsv3-back');
    await convertMegapatchToHf({ input: out, output: back });
    expectSameHf(hf, back);
    const even = tmp('dsv3-even');
    await reshardCheckpoint({ input: out, output: even, layout: { pp: 2, ep: 2 } });
    expectPlaced(even, pipelineStages({ numLayers: 4, mtpNumLayers: 1, pp: 2 }));
    const again = tmp('dsv3-again');
    await reshardCheckpoint({ input: even, output: again, layout });
    expect(snapshot(again)).toEqual(snapshot(out));
  });

  it('refuses settings that cannot cut the model before writing anything', async () => {
    const hf = tmp('llama-hf');
    writeSyntheticHfCheckpoint(hf, synthetic('llama'), { seed: 1 });
    const out = tmp('refused');
    await convertError(
      () => convertHfToMegapatch({ hfDir: hf, output: out, layout: { pp: 3 } }),
      'INVALID_ARGUMENT',
      'pp=3 does not divide numLayers 4',
      'decoderFirstPipelineNumLayers',
    );
    await convertError(
      () =>
        convertHfToMegapatch({
          hfDir: hf,
          output: out,
          layout: { pp: 2, pipelineModelParallelLayout: 'Ettt|L' },
        }),
      'INVALID_ARGUMENT',
      "has 3 't' (decoder layers) but the model has numLayers 4",
    );
    await convertError(
      () =>
        convertHfToMegapatch({ hfDir: hf, output: out, layout: { pp: 3, decoderFirstPipelineNumLayers: 1 } }),
      'INVALID_ARGUMENT',
      'leaves 3 layers for 2 middle pipeline ranks',
    );
    expect(temporaries(path.dirname(out))).toEqual([]);
    expect(() => Checkpoint.open(out)).toThrow();
  });
});
