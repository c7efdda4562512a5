// The flags of Megatron-LM and Pai-Megatron-Patch run scripts: every flag of their example scripts
// either sets a config key, is checked against the model (the architecture flags), is accepted as
// an implementation choice (named in one notice) or is refused with the reason; the architecture
// check names the flag and the model's value.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseHfConfig, type TransformerConfig } from '@megapatch/convert';
import { SYNTHETIC_MODELS } from '@megapatch/convert/testing';
import { afterAll, describe, expect, it } from 'vitest';
import {
  BatchSizeRampup,
  loadRunConfig,
  resolveOverride,
  TrainError,
  trainIterations,
} from '../src/index.js';
import { type Architecture, checkArchitecture, moeLayerFreqPattern } from '../src/megatron-flags.js';
import { tempDir } from './helpers.js';

const root = tempDir('mp-flags-');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));

/** The TransformerConfig of a synthetic HF model. */
function modelConfig(id: string): TransformerConfig {
  const m = SYNTHETIC_MODELS.find((x) => x.id === id);
  const dir = path.join(root, id);
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(m?.config));
  return parseHfConfig(path.join(dir, 'config.json')).transformerConfig as TransformerConfig;
}

/** Splits a shell-like command line into [flag, value] pairs as the CLI does. */
function pairs(line: string): [string, string][] {
  const words = line.trim().split(/\s+/);
  const out: [string, string][] = [];
  for (let i = 0; i < words.length; i++) {
    const flag = words[i].slice(2);
    const vals: string[] = [];
    while (i + 1 < words.length && !words[i + 1].startsWith('--')) vals.push(words[++i]);
    out.push([flag, vals.length ? vals.join(' ') : 'true']);
  }
  return out;
}

// The flags of the run scripts (values for a small model), by script. The same flag names as in
// Pai-Megatron-Patch's examples/{qwen3,deepseek_v3,llama3_1,qwen2_5}/run_mcore_*.sh and
// Megatron-LM's examples/llama/train_llama3_8b_h100_fp8.sh and examples/gpt3/train_gpt3_175b_distributed.sh.
const COMMON = `--save ck --lr 1e-5 --min-lr 1e-6 --lr-decay-style cosine --weight-decay 0.1 --adam-beta1 0.9
  --adam-beta2 0.95 --clip-grad 1.0 --init-method-std 0.008 --attention-dropout 0.0 --hidden-dropout 0.0
  --lr-decay-iters 90 --lr-warmup-iters 10 --train-iters 100 --micro-batch-size 1 --global-batch-size 8
  --seq-length 128 --max-position-embeddings 256 --log-interval 1 --log-throughput --eval-interval 10000
  --eval-iters 10 --save-interval 50 --tensorboard-queue-size 1 --tensorboard-dir tb
  --log-timers-to-tensorboard --log-validation-ppl-to-tensorboard --tensor-model-parallel-size 1
  --pipeline-model-parallel-size 1 --context-parallel-size 1 --no-load-optim --no-load-rng --num-workers 8
  --extra-vocab-size 293 --patch-tokenizer-type Qwen2Tokenizer --swiglu --normalization RMSNorm
  --norm-epsilon 1e-6 --use-rotary-position-embeddings --position-embedding-type rope --disable-bias-linear
  --no-save-optim --ckpt-format torch_dist --transformer-impl transformer_engine --cross-entropy-loss-fusion
  --data-path data_text_document --split 99,1,0 --dataset MMAP --bf16 --load pretrained
  --recompute-method uniform --recompute-num-layers 1 --recompute-granularity full
  --use-distributed-optimizer --sequence-parallel --overlap-grad-reduce --overlap-param-gather
  --train-mode pretrain --attention-backend flash --no-rope-fusion`;

const SCRIPTS: Record<string, string> = {
  'pai qwen3': `${COMMON} --rotary-base 1000000 --qk-layernorm --kv-channels 16 --group-query-attention
    --num-query-groups 2 --num-layers 4 --hidden-size 64 --num-attention-heads 8 --ffn-hidden-size 128
    --untie-embeddings-and-output-weights --padded-vocab-size 896`,
  'pai qwen3-moe': `${COMMON} --rotary-base 1000000 --qk-layernorm --kv-channels 16 --moe-grouped-gemm
    --moe-token-dispatcher-type alltoall --moe-router-topk 2 --num-experts 4 --expert-tensor-parallel-size 1
    --expert-model-parallel-size 1 --moe-ffn-hidden-size 32 --moe-router-load-balancing-type aux_loss
    --moe-aux-loss-coeff 0.001 --moe-layer-freq ([1]*4) --num-layers 4 --hidden-size 64
    --num-attention-heads 8 --ffn-hidden-size 96 --group-query-attention --num-query-groups 2`,
  'pai deepseek-v3': `${COMMON} --multi-latent-attention --q-lora-rank 24 --kv-lora-rank 32 --qk-head-dim 16
    --qk-pos-emb-head-dim 8 --v-head-dim 16 --rotary-base 10000 --rope-type yarn --rotary-scaling-factor 4
    --mscale 1.0 --mscale-all-dim 1.0 --num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 32
    --moe-shared-expert-intermediate-size 32 --moe-router-score-function sigmoid --moe-router-enable-expert-bias
    --moe-router-bias-update-rate 0.001 --moe-router-topk-scaling-factor 2.5 --moe-router-num-groups 4
    --moe-router-group-topk 2 --moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff 0.0001
    --moe-layer-freq ([0]*1+[1]*3) --mtp-num-layers 1 --mtp-loss-scaling-factor 0.1 --moe-router-dtype fp32
    --moe-permute-fusion --moe-token-dispatcher-type alltoall --num-layers 4 --hidden-size 64
    --num-attention-heads 4 --ffn-hidden-size 128 --untie-embeddings-and-output-weights --kv-channels 24
    --recompute-modules mla_up_proj mlp moe --moe-grouped-gemm --manual-gc --manual-gc-interval 10
    --moe-router-pre-softmax --qk-layernorm --use-rope-scaling --qk-nope-head-dim 16 --qk-rope-head-dim 8
    --moe-shared-expert-overlap --no-masked-softmax-fusion`,
  'pai llama3.1': `${COMMON} --rotary-base 500000 --use-rope-scaling --rope-scaling-factor 8
    --group-query-attention --num-query-groups 2 --num-layers 2 --hidden-size 64 --num-attention-heads 4
    --ffn-hidden-size 128 --untie-embeddings-and-output-weights --num-layers-per-virtual-pipeline-stage 1`,
  'pai qwen2.5': `${COMMON} --add-qkv-bias --rotary-base 1000000 --group-query-attention --num-query-groups 2
    --num-layers 2 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 128 --vocab-size 1000`,
  'megatron llama3': `--use-mcore-models --num-layers 2 --hidden-size 64 --ffn-hidden-size 128
    --num-attention-heads 4 --group-query-attention --num-query-groups 2 --kv-channels 16
    --position-embedding-type rope --rotary-base 1000000 --rotary-percent 1.0 --attention-dropout 0.0
    --hidden-dropout 0.0 --swiglu --init-method-std 0.0134 --attention-backend fused --apply-layernorm-1p
    --untie-embeddings-and-output-weights --disable-bias-linear --transformer-impl transformer_engine
    --micro-batch-size 1 --global-batch-size 8 --train-samples 800 --lr-decay-samples 792 --lr-warmup-samples 16
    --lr 0.00015 --min-lr 0.00001 --decoupled-lr 5e-4 --decoupled-min-lr 4.5e-5 --lr-decay-style cosine
    --clip-grad 1.0 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --bf16 --grad-reduce-in-bf16
    --cross-entropy-loss-fusion --calculate-per-token-loss --manual-gc --empty-unused-memory-level 1
    --exit-duration-in-mins 235 --tensor-model-parallel-size 1 --context-parallel-size 1
    --sequence-parallel --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
    --data-path data_text_document --tokenizer-type HuggingFaceTokenizer --tokenizer-model meta-llama/Llama-3
    --split 99,1,0 --seq-length 128 --max-position-embeddings 256 --log-interval 100 --log-throughput
    --save-interval 1000 --eval-interval 100 --eval-iters 32 --save ck --load ck --tensorboard-dir tb
    --ckpt-format torch_dist --distributed-timeout-minutes 60 --normalization RMSNorm
    --lr-warmup-init 0.0 --dataloader-type single --optimizer adam`,
  'megatron gpt3': `--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 128
    --max-position-embeddings 256 --micro-batch-size 1 --global-batch-size 8 --train-iters 100
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --init-method-std 0.006 --clip-grad 1.0 --fp16
    --lr 6.0e-5 --lr-decay-style cosine --min-lr 6.0e-6 --lr-warmup-fraction .001 --lr-decay-iters 100
    --tensor-model-parallel-size 1 --pipeline-model-parallel-size 2 --data-path data_text_document
    --split 949,50,1 --log-interval 100 --save-interval 10000 --eval-interval 1000 --save ck --load ck
    --eval-iters 10 --tensorboard-dir tb --use-flash-attn --recompute-activations
    --start-weight-decay 0.01 --end-weight-decay 0.1 --weight-decay-incr-style linear
    --override-opt_param-scheduler --num-virtual-stages-per-pipeline-rank 2`,
};

// the flags of these scripts that megapatch refuses (a feature it lacks): none; every flag sets a
// key, is checked or is accepted
const UNSUPPORTED_IN_SCRIPTS = new Set<string>();

/** A short command line that validates (nothing is read): the base of the checks below. */
const base: [string, string][] = [
  ['model.config', 'c.json'],
  ['data-path', 'd'],
  ['seq-length', '16'],
  ['global-batch-size', '8'],
  ['train-iters', '10'],
  ['lr', '1e-3'],
  ['logging.runDir', 'run'],
];

describe('Megatron run-script flags', () => {
  it.each(Object.keys(SCRIPTS))(
    '%s: every flag sets a key, is checked, accepted or refused with a reason',
    (name) => {
      const known: [string, string][] = [];
      const refused: string[] = [];
      for (const [flag, value] of pairs(SCRIPTS[name])) {
        try {
          resolveOverride(flag, value);
          known.push([flag, value]);
        } catch (e) {
          expect(e).toBeInstanceOf(TrainError);
          expect((e as TrainError).code, `--${flag}: ${(e as Error).message}`).toBe('UNSUPPORTED');
          refused.push(flag);
        }
      }
      // the only flags refused are the features megapatch lacks, each with its reason
      for (const f of refused) expect(UNSUPPORTED_IN_SCRIPTS.has(f), `--${f} refused`).toBe(true);
      const notices: string[] = [];
      const config = loadRunConfig(null, known, { notice: (l) => notices.push(l) });
      expect(config.data.seqLength).toBe(128);
      // TensorBoard events (and, with no run folder named, the run's metrics and report) go to --tensorboard-dir
      expect(config.logging).toEqual({ runDir: 'tb', tensorboardDir: 'tb' });
      expect(config.model.architecture.numLayers).toBeGreaterThan(0);
      // Megatron's GPT-3 example gives no dropout flag (Megatron trains it with 0.1): a second line
      const givesDropout = known.some(([f]) => f === 'hidden-dropout');
      expect(notices.length).toBe(givesDropout ? 1 : 2);
      expect(notices[0]).toMatch(/^Megatron flags megapatch needs nothing for: /);
      // without its dropout flags the script would train with Megatron's 0.1: a notice says so
      const noDropout = known.filter(([f]) => f !== 'hidden-dropout' && f !== 'attention-dropout');
      const more: string[] = [];
      expect(loadRunConfig(null, noDropout, { notice: (l) => more.push(l) }).model.hiddenDropout).toBe(0);
      expect(more, JSON.stringify(more)).toHaveLength(2);
      expect(more[1]).toBe(
        "no --hidden-dropout or --attention-dropout: megapatch trains without dropout where Megatron's default is 0.1; give --hidden-dropout 0.1 --attention-dropout 0.1 to train as Megatron would",
      );
    },
  );

  it('names the dropout rate a Megatron script leaves to the default, and only for a script', () => {
    const notices = (extra: [string, string][]) => {
      const out: string[] = [];
      loadRunConfig(null, [...base, ...extra], { notice: (l) => out.push(l) });
      return out;
    };
    // no architecture flag: not a Megatron script, megapatch's defaults stand unremarked
    expect(notices([])).toEqual([]);
    expect(
      notices([
        ['num-layers', '4'],
        ['hidden-dropout', '0.1'],
      ]),
    ).toEqual([
      "no --attention-dropout: megapatch trains without dropout where Megatron's default is 0.1; give --attention-dropout 0.1 to train as Megatron would",
    ]);
    expect(
      notices([
        ['num-layers', '4'],
        ['hidden-dropout', '0'],
        ['model.attentionDropout', '0'],
      ]),
    ).toEqual([]);
  });

  it('maps flags to their keys and values', () => {
    const notices: string[] = [];
    const c = loadRunConfig(null, [...pairs(SCRIPTS['pai deepseek-v3']), ['logging.runDir', 'run']], {
      notice: (l) => notices.push(l),
    });
    expect(c.model.architecture).toMatchObject({
      multiLatentAttention: true,
      qLoraRank: 24,
      qkPosEmbHeadDim: 8,
      moeLayerFreq: '([0]*1+[1]*3)',
      moeRouterEnableExpertBias: true,
      moeRouterTopkScalingFactor: 2.5,
      mtpNumLayers: 1,
      ropeType: 'yarn',
      disableBiasLinear: true,
    });
    expect(c.model.moeRouterLoadBalancingType).toBe('seq_aux_loss');
    expect(c.model.recomputeModules).toEqual(['mla_up_proj', 'mlp', 'moe']);
    expect(c.model.recomputeGranularity).toBe('full');
    expect(c.model.recomputeMethod).toBe('uniform');
    expect(c.model.recomputeNumLayers).toBe(1);
    expect(c.checkpoint).toMatchObject({
      load: 'pretrained',
      noLoadOptim: true,
      noLoadRng: true,
      noSaveOptim: true,
    });
    expect(c.parallel.useDistributedOptimizer).toBe(true);
    // one notice, each flag with what megapatch does instead
    // dropout flags are keys now: 0.0 sets them, no notice
    expect(c.model).toMatchObject({ hiddenDropout: 0, attentionDropout: 0 });
    expect(notices[0]).not.toContain('dropout');
    expect(notices[0]).toContain('--moe-grouped-gemm (megapatch picks the expert GEMMs)');
    expect(notices[0]).toContain('--ckpt-format (megapatch writes its own checkpoint format');
    const gpt = loadRunConfig(null, [...pairs(SCRIPTS['megatron gpt3']), ['logging.runDir', 'run']]);
    expect(gpt.scheduler).toMatchObject({ lrWarmupFraction: 0.001, overrideOptParamScheduler: true });
    expect(gpt.optimizer).toMatchObject({
      startWeightDecay: 0.01,
      endWeightDecay: 0.1,
      weightDecayIncrStyle: 'linear',
    });
    expect(gpt.model.recomputeGranularity).toBe('selective');
    expect(gpt.model.dtype).toBe('fp16');
    expect(gpt.parallel.virtualPipelineModelParallelSize).toBe(2);
    // Megatron's --pretrained-checkpoint: where a run starts when --load holds no checkpoint yet
    expect(resolveOverride('pretrained-checkpoint', 'base')).toEqual(['model.load', 'base']);
    // Pai-Megatron-Patch's HF folder beside a Megatron checkpoint: read it in place
    expect(resolveOverride('hf-ckpt-path', 'Qwen3-0.6B')).toEqual(['model.hfConfig', 'Qwen3-0.6B']);
    expect(resolveOverride('cp-comm-type', 'p2p')).toEqual(['parallel.cpCommType', 'p2p']);
    // Megatron's dropout rates (its default 0.1 when a script gives none; megapatch's 0)
    expect(resolveOverride('hidden-dropout', '0.1')).toEqual(['model.hiddenDropout', 0.1]);
    expect(resolveOverride('attention-dropout', '.05')).toEqual(['model.attentionDropout', 0.05]);
    // Megatron's per-split data: keys of their own (each read whole), not data.dataPath
    expect(resolveOverride('train-data-path', 'a')).toEqual(['data.trainDataPath', ['a']]);
    expect(resolveOverride('valid-data-path', '0.5 b 0.5 c')).toEqual([
      'data.validDataPath',
      [0.5, 'b', 0.5, 'c'],
    ]);
    expect(resolveOverride('test-data-path', 'd')).toEqual(['data.testDataPath', ['d']]);
    expect(resolveOverride('cp-comm-type', 'a2a')).toEqual(['parallel.cpCommType', 'a2a']);
    expect(() => loadRunConfig(null, [...base, ['cp-comm-type', 'allgather']])).toThrow(
      /parallel.cpCommType: must be p2p or a2a, got "allgather" \(megapatch has no allgather or hierarchical a2a\+p2p\)/,
    );
    const megatronLlama = loadRunConfig(null, pairs(SCRIPTS['megatron llama3']));
    expect(megatronLlama.optimizer).toMatchObject({ decoupledLr: 5e-4, decoupledMinLr: 4.5e-5 });
    // Megatron's Llama 3 example trains by samples: 800 samples of 8 a batch are 100 iterations
    expect(megatronLlama.training).toMatchObject({ trainIters: null, trainSamples: 800 });
    expect(trainIterations(megatronLlama)).toBe(100);
    expect(megatronLlama.scheduler).toMatchObject({ lrDecaySamples: 792, lrWarmupSamples: 16 });
    const llama = loadRunConfig(null, [...pairs(SCRIPTS['pai llama3.1']), ['logging.runDir', 'run']]);
    expect(llama.parallel.numLayersPerVirtualPipelineStage).toBe(1);
    expect(llama.model.architecture).toMatchObject({ useRopeScaling: true, ropeScalingFactor: 8 });
  });

  it('refuses what megapatch does not have, with the reason', () => {
    const refuse = (flag: string, value: string, reason: RegExp) => {
      let err: unknown;
      try {
        resolveOverride(flag, value);
      } catch (e) {
        err = e;
      }
      expect(err, `--${flag} ${value}`).toBeInstanceOf(TrainError);
      expect((err as TrainError).code).toBe('UNSUPPORTED');
      expect((err as Error).message).toMatch(reason);
    };
    refuse('fp8-format', 'hybrid', /^--fp8-format: megapatch trains in bf16, fp16 or fp32/);
    refuse('optimizer', 'sgd', /^--optimizer sgd: megapatch's optimizer is Megatron's adam/);
    refuse('dataloader-type', 'cyclic', /single order/);
    refuse('cpu-offloading', 'true', /activations stay on the training device/);
    refuse('exp-avg-dtype', 'bf16', /^--exp-avg-dtype bf16: megapatch keeps .* in float32: give fp32$/);
    refuse('dataset', 'JSON-SFT', /megapatch preprocess sft/);
    // an unknown flag still names the nearest known one
    expect(() => resolveOverride('num-layer', '4')).toThrow(
      /unknown option --num-layer \(did you mean --num-layers\?\)/,
    );
    expect(() => resolveOverride('moe-router-topkk', '4')).toThrow(/did you mean --moe-router-topk\?/);
  });

  it("takes Pai-Megatron-Patch's optimizer offload (OPTIMIZER_OFFLOAD=0.5) as it writes it", () => {
    const c = loadRunConfig(null, [
      ...base,
      ['use-distributed-optimizer', 'true'],
      ['optimizer-cpu-offload', 'true'],
      ['use-precision-aware-optimizer', 'true'],
      ['optimizer-offload-fraction', '0.5'],
      ['overlap-cpu-optimizer-d2h-h2d', 'true'],
      ['main-grads-dtype', 'fp32'],
    ]);
    expect(c.optimizer).toMatchObject({ optimizerCpuOffload: true, optimizerOffloadFraction: 0.5 });
    expect(loadRunConfig(null, base).optimizer).toMatchObject({
      optimizerCpuOffload: false,
      optimizerOffloadFraction: 1,
    });
    expect(() => loadRunConfig(null, [...base, ['optimizer-offload-fraction', '1.5']])).toThrow(
      /optimizer.optimizerOffloadFraction/,
    );
  });

  it('checks the settings that go together', () => {
    const bad = (extra: [string, string][], msg: RegExp) =>
      expect(() => loadRunConfig(null, [...base, ...extra])).toThrow(msg);
    bad(
      [
        ['lr-warmup-fraction', '0.1'],
        ['lr-warmup-iters', '2'],
      ],
      /scheduler.lrWarmupFraction: give one of lrWarmupFraction and lrWarmupIters/,
    );
    bad([['lr-warmup-init', '1e-2']], /lrWarmupInit: 0.01 is above optimizer.lr/);
    // iterations or samples, as Megatron's argument checks
    bad(
      [['train-samples', '80']],
      /give one of training.trainIters \(--train-iters\) and training.trainSamples/,
    );
    bad(
      [['lr-decay-samples', '80']],
      /iteration-based training .* give scheduler.lrDecayIters, or training.trainSamples/,
    );
    const bySamples = (extra: [string, string][], msg: RegExp) =>
      expect(() =>
        loadRunConfig(null, [
          ...base.filter(([f]) => f !== 'train-iters'),
          ['train-samples', '80'],
          ...extra,
        ]),
      ).toThrow(msg);
    bySamples([['lr-warmup-iters', '2']], /sample-based training .* give scheduler.lrWarmupSamples instead/);
    bySamples([['lr-decay-iters', '8']], /give scheduler.lrDecaySamples instead/);
    bySamples([['train-samples', '4']], /trainSamples: 4 samples make no iteration of globalBatchSize 8/);
    bySamples(
      [['lr-warmup-samples', '80']],
      /80 warm-up samples leave none to decay over: make it less than training.trainSamples \(80/,
    );
    bySamples(
      [
        ['lr-warmup-samples', '8'],
        ['lr-warmup-fraction', '0.1'],
      ],
      /give one of lrWarmupFraction and lrWarmupSamples/,
    );
    // Megatron's batch-size ramp-up: over samples, from a start below the global batch
    bad([['rampup-batch-size', '4 4 16']], /rampupBatchSize: Megatron ramps the batch size up over samples/);
    bySamples(
      [['rampup-batch-size', '2 4 16']],
      /the ramp grows from 2 by 4 to globalBatchSize 8: give a start below it/,
    );
    bySamples([['rampup-batch-size', '8 4 16']], /the ramp grows from 8 by 4/);
    bySamples(
      [['rampup-batch-size', '4 4']],
      /rampupBatchSize: give three whole numbers: \[start, increment, samples\]/,
    );
    expect(resolveOverride('rampup-batch-size', '16 16 5859375')).toEqual([
      'training.rampupBatchSize',
      [16, 16, 5859375],
    ]);
    // the iterations as Megatron's update_train_iters counts them (by hand: 4 + 4 + 4 + 4 during the
    // ramp to 16 samples, then 8 + 8 = 24 ... 48: 8 iterations; 2, 2, 4, 6 to 14, then 3 × 8 to 38 of 40)
    const ramped = (samples: number, ramp: [number, number, number]) =>
      trainIterations({
        training: { trainIters: null, trainSamples: samples, globalBatchSize: 8, rampupBatchSize: ramp },
      });
    expect(ramped(48, [4, 4, 16])).toBe(8);
    expect(ramped(40, [2, 2, 12])).toBe(7);
    const ramp = new BatchSizeRampup(8, [2, 2, 12]);
    expect([0, 2, 3, 4, 7, 8, 12, 13, 100].map((c) => ramp.globalBatchSize(c))).toEqual([
      2, 2, 2, 4, 4, 6, 8, 8, 8,
    ]);
    bad([['hidden-dropout', '1']], /model.hiddenDropout/);
    bad(
      [
        ['start-weight-decay', '0.1'],
        ['end-weight-decay', '0.01'],
        ['weight-decay-incr-style', 'linear'],
      ],
      /endWeightDecay: 0.01 is below startWeightDecay/,
    );
    bad(
      [
        ['start-weight-decay', '0.01'],
        ['end-weight-decay', '0.1'],
      ],
      /weightDecayIncrStyle: 'constant' keeps one weight decay/,
    );
    bad(
      [
        ['recompute-method', 'block'],
        ['recompute-num-layers', '1'],
      ],
      /recomputeMethod and recomputeNumLayers go with recomputeGranularity 'full'/,
    );
    bad(
      [
        ['recompute-granularity', 'full'],
        ['recompute-method', 'uniform'],
        ['recompute-num-layers', '0'],
      ],
      /'uniform' checkpoints groups of recomputeNumLayers layers: give 1 or more/,
    );
    // groups of several layers are Megatron's uniform method as it is
    const grouped = loadRunConfig(null, [
      ...base,
      ['recompute-granularity', 'full'],
      ['recompute-method', 'uniform'],
      ['recompute-num-layers', '2'],
    ]);
    expect(grouped.model).toMatchObject({ recomputeMethod: 'uniform', recomputeNumLayers: 2 });
    bad(
      [
        ['recompute-granularity', 'full'],
        ['recompute-method', 'block'],
      ],
      /give recomputeMethod and recomputeNumLayers together/,
    );
    bad(
      [
        ['num-layers-per-virtual-pipeline-stage', '1'],
        ['num-virtual-stages-per-pipeline-rank', '2'],
        ['pipeline-model-parallel-size', '2'],
      ],
      /give one of numLayersPerVirtualPipelineStage and virtualPipelineModelParallelSize/,
    );
    bad(
      [['num-virtual-stages-per-pipeline-rank', '2']],
      /parallel.virtualPipelineModelParallelSize: 2 model chunks interleave over the pipeline ranks: it needs pipelineModelParallelSize 2 or more/,
    );
  });
});

describe('--moe-layer-freq', () => {
  it('reads an integer and Python list expressions as Megatron does', () => {
    expect(moeLayerFreqPattern(1, 3)).toEqual([1, 1, 1]);
    expect(moeLayerFreqPattern(2, 5)).toEqual([1, 0, 1, 0, 1]);
    expect(moeLayerFreqPattern('3', 4)).toEqual([1, 0, 0, 1]);
    expect(moeLayerFreqPattern('([0]*3+[1]*2)', 5)).toEqual([0, 0, 0, 1, 1]);
    expect(moeLayerFreqPattern('[0, 1, 1]', 3)).toEqual([0, 1, 1]);
    expect(moeLayerFreqPattern('([1]*2+[0])*2', 6)).toEqual([1, 1, 0, 1, 1, 0]);
    expect(moeLayerFreqPattern('[1]*2+[0]*1', 3)).toEqual([1, 1, 0]);
    for (const bad of ['([0]*3+[2])', '[0,1', 'import os', '([1]*2', '[0]*x', '0']) {
      expect(() => moeLayerFreqPattern(bad, 3), bad).toThrow(
        /--moe-layer-freq .*: give (an integer or a list expression|a positive integer)/,
      );
    }
  });
});

describe('the architecture flags against the model', () => {
  const facts = (config: TransformerConfig, over: Partial<Parameters<typeof checkArchitecture>[1]> = {}) => ({
    config,
    activation: 'swiglu',
    zeroCenteredGamma: false,
    tensorParallelSize: 1,
    source: 'the-model',
    ...over,
  });
  const qwen3 = modelConfig('qwen3');
  const dsv3 = modelConfig('deepseek-v3');
  const qwen3Moe = modelConfig('qwen3-moe');
  const llama = modelConfig('llama');
  const check =
    (a: Architecture, c: TransformerConfig, over = {}, seq = 64) =>
    () =>
      checkArchitecture(a, facts(c, over), seq);

  it('accepts the flags that describe the model', () => {
    const q: Architecture = {
      numLayers: 4,
      hiddenSize: 64,
      ffnHiddenSize: 128,
      numAttentionHeads: 8,
      groupQueryAttention: true,
      numQueryGroups: 2,
      kvChannels: 16,
      normalization: 'RMSNorm',
      normEpsilon: 1e-6,
      swiglu: true,
      disableBiasLinear: true,
      qkLayernorm: true,
      positionEmbeddingType: 'rope',
      useRotaryPositionEmbeddings: true,
      rotaryBase: 1e6,
      rotaryPercent: 1,
      untieEmbeddingsAndOutputWeights: true,
      maxPositionEmbeddings: 256,
      vocabSize: 777,
      paddedVocabSize: 896,
      mtpNumLayers: 0,
    };
    expect(check(q, qwen3)).not.toThrow();
    // with TP 2 the embedding is padded to a multiple of 256
    expect(check({ paddedVocabSize: 1024 }, qwen3, { tensorParallelSize: 2 })).not.toThrow();
    const d: Architecture = {
      multiLatentAttention: true,
      qLoraRank: 24,
      kvLoraRank: 32,
      qkHeadDim: 16,
      qkPosEmbHeadDim: 8,
      vHeadDim: 16,
      ropeType: 'yarn',
      positionEmbeddingType: 'yarn',
      rotaryScalingFactor: 4,
      mscale: 1,
      mscaleAllDim: 1,
      numExperts: 8,
      moeRouterTopk: 2,
      moeFfnHiddenSize: 32,
      moeSharedExpertIntermediateSize: 32,
      moeLayerFreq: '([0]*1+[1]*3)',
      moeRouterScoreFunction: 'sigmoid',
      moeRouterEnableExpertBias: true,
      moeRouterNumGroups: 4,
      moeRouterGroupTopk: 2,
      moeRouterTopkScalingFactor: 2.5,
      moeRouterPreSoftmax: false,
      mtpNumLayers: 1,
    };
    expect(check(d, dsv3)).not.toThrow();
    // what Pai-Megatron-Patch's DeepSeek-V3 script gives besides: its names of the head dims, the
    // latent norms as --qk-layernorm, and flags Megatron ignores for this model (--use-rope-scaling
    // under MLA, --moe-router-pre-softmax with a sigmoid score)
    Object.assign(d, {
      qkNopeHeadDim: 16,
      qkRopeHeadDim: 8,
      qkLayernorm: true,
      useRopeScaling: true,
      moeRouterPreSoftmax: true,
      kvChannels: 16,
      yarnOriginalMaxPositionEmbeddings: 128,
      yarnBetaFast: 32,
      yarnBetaSlow: 1,
    });
    expect(check(d, dsv3)).not.toThrow();
    expect(check({ moeLayerFreq: 1, numExperts: 4, moeRouterPreSoftmax: false }, qwen3Moe)).not.toThrow();
    // Phi-4-mini rotates 3/4 of each head: --rotary-percent 0.75
    expect(check({ rotaryPercent: 0.75, kvChannels: 8 }, modelConfig('phi4-mini'))).not.toThrow();
  });

  it("names the first flag that differs, its value and the model's", () => {
    expect(check({ hiddenSize: 1024 }, qwen3)).toThrow(
      /^--hidden-size 1024 does not describe the model: it has 64 \(the-model\); correct the flag \(model.architecture.hiddenSize\) or load the model the script was written for$/,
    );
    const cases: [Architecture, TransformerConfig, RegExp, object?][] = [
      [{ numLayers: 28 }, qwen3, /--num-layers 28 .* it has 4/],
      [{ numQueryGroups: 8 }, qwen3, /--num-query-groups 8 .* it has 2/],
      [{ groupQueryAttention: false }, qwen3, /--group-query-attention false .* 2 query groups for 8 heads/],
      [{ kvChannels: 128 }, qwen3, /--kv-channels 128 .* it has 16/],
      [{ normEpsilon: 1e-5 }, qwen3, /--norm-epsilon 0.00001 .* it has 0.000001/],
      [{ addQkvBias: true }, qwen3, /--add-qkv-bias true .* it has false/],
      [{ qkLayernorm: true }, llama, /--qk-layernorm true .* it has false/],
      // MLA's latent norms are Megatron's qk_layernorm
      [{ qkLayernorm: false }, dsv3, /--qk-layernorm false .* it has true/],
      [{ rotaryBase: 10000 }, qwen3, /--rotary-base 10000 .* it has 1000000/],
      [{ rotaryPercent: 0.5 }, qwen3, /--rotary-percent 0.5 .* it has 1 /],
      [{ rotaryPercent: 1 }, modelConfig('phi4-mini'), /--rotary-percent 1 .* it has 0.75/],
      [{ untieEmbeddingsAndOutputWeights: false }, qwen3, /--untie-embeddings-and-output-weights false/],
      [{ swiglu: true }, qwen3, /--swiglu true .* a geglu MLP/, { activation: 'geglu' }],
      [{ applyLayernorm1p: true }, qwen3, /--apply-layernorm-1p true .* it has false/],
      [
        { positionEmbeddingType: 'learned_absolute' },
        qwen3,
        /--position-embedding-type learned_absolute .* rotary embeddings \(rope\)/,
      ],
      [{ ropeType: 'yarn' }, qwen3, /--rope-type yarn .* plain rotary embeddings/],
      [{ useRopeScaling: true }, qwen3, /--use-rope-scaling true .* no Llama 3.1 RoPE scaling/],
      [{ rotaryScalingFactor: 40 }, dsv3, /--rotary-scaling-factor 40 .* it has 4/],
      [{ vocabSize: 151936 }, qwen3, /--vocab-size 151936 .* it has 777/],
      [{ paddedVocabSize: 777 }, qwen3, /--padded-vocab-size 777 .* it has 896/],
      [{ numExperts: 128 }, qwen3, /--num-experts 128 .* no mixture of experts \(a dense model\)/],
      [{ numExperts: 128 }, qwen3Moe, /--num-experts 128 .* it has 4/],
      [{ moeRouterTopk: 8 }, qwen3Moe, /--moe-router-topk 8 .* it has 2/],
      [
        { moeSharedExpertIntermediateSize: 32 },
        qwen3Moe,
        /--moe-shared-expert-intermediate-size 32 .* no shared expert/,
      ],
      [
        { moeLayerFreq: '([1]*4)' },
        dsv3,
        /--moe-layer-freq \(\[1\]\*4\) .* the MoE layer pattern \[0,1,1,1\]/,
      ],
      [{ moeLayerFreq: 2 }, qwen3Moe, /--moe-layer-freq 2 .* \[1,1,1,1\]/],
      [{ moeRouterScoreFunction: 'softmax' }, dsv3, /--moe-router-score-function softmax .* it has sigmoid/],
      [{ moeRouterEnableExpertBias: true }, qwen3Moe, /--moe-router-enable-expert-bias true .* it has false/],
      [
        { moeRouterPreSoftmax: true },
        qwen3Moe,
        /--moe-router-pre-softmax true .* top-k probabilities renormalised/,
      ],
      [{ multiLatentAttention: true }, qwen3, /--multi-latent-attention true .* no multi-latent attention/],
      [{ qLoraRank: 1536 }, dsv3, /--q-lora-rank 1536 .* it has 24/],
      [{ kvLoraRank: 32 }, qwen3, /--kv-lora-rank 32 .* no multi-latent attention/],
      [{ mtpNumLayers: 2 }, dsv3, /--mtp-num-layers 2 .* it has 1/],
      [{ qkNopeHeadDim: 128 }, dsv3, /--qk-nope-head-dim 128 .* it has 16/],
      [
        { yarnOriginalMaxPositionEmbeddings: 4096 },
        dsv3,
        /--yarn-original-max-position-embeddings 4096 .* it has 128/,
      ],
      [{ yarnBetaFast: 32 }, qwen3, /--yarn-beta-fast 32 .* no YaRN scaling/],
    ];
    for (const [a, c, msg, over] of cases) expect(check(a, c, over), JSON.stringify(a)).toThrow(msg);
    // --max-position-embeddings is the script's own bound on its sequences
    expect(check({ maxPositionEmbeddings: 32 }, qwen3, {}, 64)).toThrow(
      /^--max-position-embeddings 32 is shorter than data.seqLength 64 \(--seq-length\): raise it or shorten the sequences$/,
    );
    expect(check({ maxPositionEmbeddings: 40960 }, qwen3, {}, 64)).not.toThrow();
  });
});

describe("Megatron's data-argument files", () => {
  const base: [string, string][] = [
    ['pretrained-checkpoint', 'hf'],
    ['seq-length', '128'],
    ['micro-batch-size', '1'],
    ['global-batch-size', '8'],
    ['train-iters', '10'],
    ['lr', '1e-4'],
    ['logging.runDir', 'run'],
  ];
  it('--data-args-path reads the blend --data-path would give; --per-split-data-args-path a blend per split', () => {
    const args = path.join(root, 'data-args.txt');
    fs.writeFileSync(args, '0.3 /data/a_text_document\n0.7\t/data/b_text_document\n');
    const c = loadRunConfig(null, [...base, ['data-args-path', args]]);
    expect(c.data.dataPath).toEqual([0.3, '/data/a_text_document', 0.7, '/data/b_text_document']);
    const split = path.join(root, 'per-split.json');
    fs.writeFileSync(split, JSON.stringify({ train: ['0.5', 'a', '0.5', 'b'], valid: 'c', test: ['d'] }));
    const p = loadRunConfig(null, [...base, ['per-split-data-args-path', split]]);
    expect([p.data.trainDataPath, p.data.validDataPath, p.data.testDataPath]).toEqual([
      ['0.5', 'a', '0.5', 'b'],
      ['c'],
      ['d'],
    ]);
    expect(resolveOverride('data-args-path', args)).toEqual([
      'data.dataPath',
      [0.3, '/data/a_text_document', 0.7, '/data/b_text_document'],
    ]);
    // a bad file is one error naming it
    fs.writeFileSync(split, '{"valid": "c"}');
    expect(() => loadRunConfig(null, [...base, ['per-split-data-args-path', split]])).toThrow(
      `--per-split-data-args-path ${split}: expected {"train": ..., "valid": ..., "test": ...}`,
    );
    expect(() => loadRunConfig(null, [...base, ['data-args-path', path.join(root, 'none.txt')]])).toThrow(
      /--data-args-path .*none\.txt: cannot read it \(ENOENT\)/,
    );
  });
});
