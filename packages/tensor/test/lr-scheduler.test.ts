import { describe, expect, it } from 'vitest';
import {
  AdamW,
  type LrDecayStyle,
  OptimizerParamScheduler,
  type OptimizerParamSchedulerOptions,
  type ParamGroup,
  TensorError,
  type WsdDecayStyle,
  zeros,
} from '../src/index.js';

// An independent restatement of Megatron-LM's get_lr, written from its description.
interface Ref {
  init: number;
  max: number;
  min: number;
  warmup: number;
  decay: number;
  style: LrDecayStyle;
  wsd?: number;
  wsdStyle?: WsdDecayStyle;
}
function refLr(r: Ref, n: number): number {
  if (r.warmup > 0 && n <= r.warmup) return r.init + ((r.max - r.init) * n) / r.warmup;
  if (r.style === 'constant') return r.max;
  if (n > r.decay) return r.min;
  if (r.style === 'inverse-square-root')
    return Math.max(r.min, r.max * Math.sqrt(Math.max(r.warmup, 1) / Math.max(n, 1)));
  const x = (n - r.warmup) / (r.decay - r.warmup);
  const shapes: Record<string, (t: number) => number> = {
    linear: (t) => 1 - t,
    cosine: (t) => (1 + Math.cos(Math.PI * t)) / 2,
    exponential: (t) => 2 * 2 ** -t - 1,
    minus_sqrt: (t) => 1 - t ** 0.5,
  };
  let c: number;
  if (r.style === 'WSD') {
    const start = r.decay - r.wsd!;
    c = n <= start ? 1 : shapes[r.wsdStyle!]((n - start) / r.wsd!);
  } else {
    c = shapes[r.style](x);
  }
  return r.min + c * (r.max - r.min);
}

function makeOpt(groups?: Partial<ParamGroup>[]) {
  const p = zeros([2]).requiresGrad_(true);
  const q = zeros([2]).requiresGrad_(true);
  const opt = groups
    ? new AdamW(
        [
          { params: [p], ...groups[0] },
          { params: [q], ...groups[1] },
        ],
        { lr: 123 },
      )
    : new AdamW([p], { lr: 123 });
  return opt;
}

function sched(
  o: Partial<OptimizerParamSchedulerOptions> & Pick<OptimizerParamSchedulerOptions, 'lrDecayStyle'>,
) {
  return new OptimizerParamScheduler({
    optimizer: o.optimizer ?? makeOpt(),
    maxLr: 1,
    minLr: 0.1,
    lrWarmupSteps: 10,
    lrDecaySteps: 110,
    ...o,
  });
}

const close = (a: number, b: number) =>
  expect(Math.abs(a - b)).toBeLessThanOrEqual(1e-9 * Math.max(1, Math.abs(b)));

describe('OptimizerParamScheduler: hand-computed values', () => {
  // maxLr 1, minLr 0.1, 10 warm-up steps, decay over steps 10..110
  it('warms up linearly from initLr', () => {
    const s = sched({ lrDecayStyle: 'cosine' });
    expect(s.getLr(0)).toBe(0);
    close(s.getLr(5), 0.5);
    close(s.getLr(10), 1);
    const t = sched({ lrDecayStyle: 'linear', initLr: 0.2 });
    close(t.getLr(0), 0.2);
    close(t.getLr(5), 0.6);
  });

  it('linear', () => {
    const s = sched({ lrDecayStyle: 'linear' });
    close(s.getLr(35), 0.775); // ratio 0.25 -> 0.1 + 0.75 * 0.9
    close(s.getLr(60), 0.55);
    close(s.getLr(110), 0.1);
    close(s.getLr(111), 0.1);
    close(s.getLr(5000), 0.1);
  });

  it('cosine', () => {
    const s = sched({ lrDecayStyle: 'cosine' });
    close(s.getLr(35), 0.8681980515339464); // 0.1 + 0.9 * (1 + cos(pi/4)) / 2
    close(s.getLr(60), 0.55);
    close(s.getLr(85), 0.23180194846605365); // 0.1 + 0.9 * (1 - cos(pi/4)) / 2
    close(s.getLr(110), 0.1);
    close(s.getLr(200), 0.1);
  });

  it('constant keeps maxLr after warm-up, even past lrDecaySteps', () => {
    const s = sched({ lrDecayStyle: 'constant' });
    close(s.getLr(5), 0.5);
    expect(s.getLr(60)).toBe(1);
    expect(s.getLr(500)).toBe(1);
  });

  it('inverse-square-root', () => {
    const s = sched({ lrDecayStyle: 'inverse-square-root' });
    close(s.getLr(10), 1);
    close(s.getLr(40), 0.5); // sqrt(10 / 40)
    close(s.getLr(90), 1 / 3);
    close(s.getLr(110), 0.30151134457776363);
    close(s.getLr(111), 0.1); // past lrDecaySteps: minLr
    const floored = sched({ lrDecayStyle: 'inverse-square-root', minLr: 0.4 });
    close(floored.getLr(90), 0.4);
    const noWarmup = sched({ lrDecayStyle: 'inverse-square-root', lrWarmupSteps: 0 });
    close(noWarmup.getLr(0), 1);
    close(noWarmup.getLr(4), 0.5);
  });

  it('WSD: constant until lrDecaySteps - wsdDecaySteps, then the anneal shape', () => {
    const w = (style: WsdDecayStyle) =>
      sched({ lrDecayStyle: 'WSD', wsdDecaySteps: 20, lrWsdDecayStyle: style });
    for (const style of ['linear', 'cosine', 'exponential', 'minus_sqrt'] as const) {
      const s = w(style);
      close(s.getLr(5), 0.5);
      expect(s.getLr(60)).toBe(1);
      expect(s.getLr(90)).toBe(1);
      close(s.getLr(110), 0.1);
      close(s.getLr(111), 0.1);
    }
    close(w('linear').getLr(100), 0.55);
    close(w('cosine').getLr(100), 0.55);
    close(w('exponential').getLr(100), 0.4727922061357855); // 0.1 + 0.9 * (2 * 0.5^0.5 - 1)
    close(w('exponential').getLr(95), 0.7136135475159062); // 0.1 + 0.9 * (2 * 0.5^0.25 - 1)
    close(w('minus_sqrt').getLr(100), 0.3636038969321072); // 0.1 + 0.9 * (1 - sqrt(0.5))
    close(w('linear').getLr(95), 0.775);
  });

  it('decays from step 0 without warm-up', () => {
    const s = sched({ lrDecayStyle: 'linear', lrWarmupSteps: 0, lrDecaySteps: 100 });
    expect(s.getLr(0)).toBe(1);
    close(s.getLr(50), 0.55);
  });
});

describe('OptimizerParamScheduler: against the reference', () => {
  const styles: [LrDecayStyle, WsdDecayStyle | undefined][] = [
    ['constant', undefined],
    ['linear', undefined],
    ['cosine', undefined],
    ['inverse-square-root', undefined],
    ['WSD', 'linear'],
    ['WSD', 'cosine'],
    ['WSD', 'exponential'],
    ['WSD', 'minus_sqrt'],
  ];
  for (const [style, wsdStyle] of styles) {
    for (const warmup of [0, 7]) {
      it(`${style}${wsdStyle ? `/${wsdStyle}` : ''} warmup ${warmup}`, () => {
        const r: Ref = { init: 1e-5, max: 3e-4, min: 3e-5, warmup, decay: 57, style, wsd: 13, wsdStyle };
        const s = new OptimizerParamScheduler({
          optimizer: makeOpt(),
          initLr: r.init,
          maxLr: r.max,
          minLr: r.min,
          lrWarmupSteps: warmup,
          lrDecaySteps: r.decay,
          lrDecayStyle: style,
          wsdDecaySteps: r.wsd,
          lrWsdDecayStyle: wsdStyle,
        });
        for (let n = 0; n <= 80; n++) close(s.getLr(n), refLr(r, n));
      });
    }
  }
});

describe('OptimizerParamScheduler: driving an optimizer', () => {
  it('sets lr on every group, from step 0 on construction', () => {
    const opt = makeOpt([{}, { maxLr: 2, minLr: 0.2 }]);
    const s = sched({ optimizer: opt, lrDecayStyle: 'linear' });
    expect(opt.paramGroups.map((g) => g.lr)).toEqual([0, 0]);
    s.step();
    close(opt.paramGroups[0].lr, 0.1);
    close(opt.paramGroups[1].lr, 0.2);
    s.step(59);
    expect(s.numSteps).toBe(60);
    close(opt.paramGroups[0].lr, 0.55);
    close(opt.paramGroups[1].lr, 0.2 + 0.5 * 1.8);
    // weight decay is left alone when not scheduled
    expect(opt.paramGroups[0].weightDecay).toBe(0.01);
  });

  it('schedules weight decay (linear, cosine, constant) with wdMult', () => {
    const opt = makeOpt([{}, { wdMult: 0 }]);
    const s = sched({
      optimizer: opt,
      lrDecayStyle: 'cosine',
      startWd: 0.01,
      endWd: 0.1,
      wdIncrementSteps: 100,
      wdIncrementStyle: 'linear',
    });
    expect(opt.paramGroups[0].weightDecay).toBe(0.01);
    s.step(50);
    close(opt.paramGroups[0].weightDecay, 0.055);
    expect(opt.paramGroups[1].weightDecay).toBe(0);
    s.step(100);
    expect(opt.paramGroups[0].weightDecay).toBe(0.1);
    const c = sched({
      lrDecayStyle: 'cosine',
      startWd: 0.01,
      endWd: 0.1,
      wdIncrementSteps: 100,
      wdIncrementStyle: 'cosine',
    });
    close(c.getWd(25)!, 0.023180194846605363); // 0.01 + 0.09 * (1 + cos(0.75 pi)) / 2
    close(c.getWd(50)!, 0.055);
    const k = sched({ lrDecayStyle: 'cosine', endWd: 0.05 });
    expect(k.getWd(0)).toBe(0.05);
    expect(k.getWd(1000)).toBe(0.05);
  });

  it('round-trips its state dict and honours override / use-checkpoint', () => {
    const a = sched({ lrDecayStyle: 'cosine' });
    a.step(42);
    const sd = JSON.parse(JSON.stringify(a.stateDict()));
    expect(sd).toMatchObject({
      numSteps: 42,
      maxLr: 1,
      minLr: 0.1,
      lrWarmupSteps: 10,
      lrDecaySteps: 110,
      lrDecayStyle: 'cosine',
    });

    const optB = makeOpt();
    const b = sched({ optimizer: optB, lrDecayStyle: 'linear', maxLr: 2 });
    b.loadStateDict(sd);
    expect(b.numSteps).toBe(42);
    expect(b.lrDecayStyle).toBe('cosine');
    close(optB.paramGroups[0].lr, a.getLr(42));

    const c = sched({
      lrDecayStyle: 'linear',
      useCheckpointOptParamScheduler: false,
      overrideOptParamScheduler: true,
    });
    c.loadStateDict(sd);
    expect(c.lrDecayStyle).toBe('linear');
    close(c.getLr(), 1 - (0.9 * 32) / 100);

    const strict = sched({ lrDecayStyle: 'linear', useCheckpointOptParamScheduler: false });
    expect(() => strict.loadStateDict(sd)).toThrow(
      /lrDecayStyle is linear here but cosine in the checkpoint/,
    );
  });

  it('validates its options like Megatron', () => {
    const bad = (o: Partial<OptimizerParamSchedulerOptions>, re: RegExp) => {
      const f = () => sched({ lrDecayStyle: 'linear', ...o });
      expect(f).toThrow(TensorError);
      expect(f).toThrow(re);
    };
    bad({ minLr: -1 }, /minLr/);
    bad({ maxLr: 0.01 }, /maxLr/);
    bad({ initLr: 2 }, /initLr/);
    bad({ lrDecaySteps: 0 }, /lrDecaySteps/);
    bad({ lrWarmupSteps: 110 }, /lrWarmupSteps/);
    bad({ lrDecayStyle: 'WSD' }, /wsdDecaySteps/);
    bad({ startWd: 0.1, endWd: 0.01, wdIncrementStyle: 'linear' }, /endWd/);
    bad({ startWd: 0.01, endWd: 0.1 }, /constant/);
    bad({ lrDecayStyle: 'step' as LrDecayStyle }, /unknown lrDecayStyle/);
    bad({ overrideOptParamScheduler: true }, /both set/);
  });
});
