import { describe, expect, it } from 'vitest';
import {
  Dropout,
  Embedding,
  empty,
  Generator,
  initMethodNormal,
  kaimingUniform_,
  LayerNorm,
  Linear,
  Module,
  ModuleList,
  memoryStats,
  noGrad,
  normal_,
  ones,
  ones_,
  RMSNorm,
  randn,
  scaledInitMethodNormal,
  type Tensor,
  TensorError,
  tensor,
  tidy,
  uniform_,
  xavierUniform_,
  zeros,
  zeros_,
} from '../src/index.js';

const values = (t: Tensor): number[] => Array.from(t.toTypedArray() as Float32Array);
const stats = (t: Tensor): { mean: number; std: number; min: number; max: number } => {
  const v = values(t);
  const mean = v.reduce((s, x) => s + x, 0) / v.length;
  const std = Math.sqrt(v.reduce((s, x) => s + (x - mean) ** 2, 0) / v.length);
  return { mean, std, min: Math.min(...v), max: Math.max(...v) };
};

class Attention extends Module {
  readonly qkv: Linear;
  readonly proj: Linear;
  constructor(dim: number, gen: Generator) {
    super();
    this.qkv = this.registerModule('qkv', new Linear(dim, 3 * dim, { generator: gen }));
    this.proj = this.registerModule('proj', new Linear(dim, dim, { bias: false, generator: gen }));
  }
}

class Block extends Module {
  readonly attn: Attention;
  readonly norm: Linear;
  readonly scale: Tensor;
  constructor(dim: number, gen: Generator) {
    super();
    this.attn = this.registerModule('attn', new Attention(dim, gen));
    this.norm = this.registerModule('norm', new Linear(dim, dim, { generator: gen }));
    this.scale = this.registerBuffer('scale', ones([dim]));
    this.registerBuffer('cache', zeros([2]), { persistent: false });
  }
}

class Net extends Module {
  readonly embed: Linear;
  readonly layers: ModuleList<Block>;
  constructor(seed = 0) {
    super();
    const gen = new Generator(seed);
    this.embed = this.registerModule('embed', new Linear(4, 8, { generator: gen }));
    this.layers = this.registerModule('layers', new ModuleList([new Block(8, gen), new Block(8, gen)]));
  }
}

describe('Module', () => {
  it('names parameters, buffers and modules with dotted paths', () => {
    const net = new Net();
    expect(net.namedParameters().map(([n]) => n)).toEqual([
      'embed.weight',
      'embed.bias',
      'layers.0.attn.qkv.weight',
      'layers.0.attn.qkv.bias',
      'layers.0.attn.proj.weight',
      'layers.0.norm.weight',
      'layers.0.norm.bias',
      'layers.1.attn.qkv.weight',
      'layers.1.attn.qkv.bias',
      'layers.1.attn.proj.weight',
      'layers.1.norm.weight',
      'layers.1.norm.bias',
    ]);
    expect(net.namedBuffers().map(([n]) => n)).toEqual([
      'layers.0.scale',
      'layers.0.cache',
      'layers.1.scale',
      'layers.1.cache',
    ]);
    expect(net.namedModules().map(([n]) => n)).toEqual([
      '',
      'embed',
      'layers',
      'layers.0',
      'layers.0.attn',
      'layers.0.attn.qkv',
      'layers.0.attn.proj',
      'layers.0.norm',
      'layers.1',
      'layers.1.attn',
      'layers.1.attn.qkv',
      'layers.1.attn.proj',
      'layers.1.norm',
    ]);
    expect(net.children()).toEqual([net.embed, net.layers]);
    expect(net.layers.get(1).attn.qkv.weight.shape).toEqual([24, 8]);
    expect(net.layers.get(-1)).toBe(net.layers.get(1));
    expect([...net.layers].length).toBe(2);
    expect(() => net.layers.get(2)).toThrow(TensorError);
    expect(net.parameters().every((p) => p.requiresGrad)).toBe(true);
    expect(net.numParameters()).toBe(4 * 8 + 8 + 2 * (8 * 24 + 24 + 64 + 64 + 8));
    // the state dict has the persistent buffers too, and the module's own tensors
    const sd = net.stateDict();
    expect(Object.keys(sd)).toContain('layers.1.scale');
    expect(Object.keys(sd)).not.toContain('layers.1.cache');
    expect(sd['layers.0.attn.qkv.weight']).toBe(net.layers.get(0).attn.qkv.weight);
    net.dispose();
  });

  it('lists a shared parameter once but names it everywhere in the state dict', () => {
    class Tied extends Module {
      readonly a: Linear;
      readonly b: Linear;
      constructor() {
        super();
        this.a = this.registerModule('a', new Linear(3, 3));
        this.b = this.registerModule('b', new Linear(3, 3, { bias: false }));
        this.b.weight.dispose();
        this.b.registerParameter('weight', this.a.weight);
      }
    }
    const m = new Tied();
    expect(m.namedParameters().map(([n]) => n)).toEqual(['a.weight', 'a.bias']);
    expect(Object.keys(m.stateDict())).toEqual(['a.weight', 'a.bias', 'b.weight']);
  });

  it('validates registrations', () => {
    const m = new Module();
    m.registerParameter('w', zeros([2]));
    expect(() => m.registerParameter('a.b', zeros([2]))).toThrow(/without "\."/);
    expect(() => m.registerBuffer('w', zeros([2]))).toThrow(/already registered/);
    expect(() => m.registerParameter('i', tensor([1, 2]))).toThrow(TensorError);
    const x = zeros([2]).requiresGrad_(true);
    const y = x.mul(2);
    expect(() => m.registerParameter('y', y)).toThrow(/leaf/);
    expect(m.registerParameter('none', null)).toBeNull();
    expect(m.namedParameters().map(([n]) => n)).toEqual(['w']);
    for (const t of [x, y]) t.dispose();
    m.dispose();
  });

  it('keeps parameters out of tidy scopes and dispose() frees them all', () => {
    const before = memoryStats().liveBytes;
    const net = tidy(() => new Net());
    expect(net.parameters().every((p) => !p.disposed)).toBe(true);
    tidy(() => {
      const y = net.embed.forward(randn([2, 4]));
      y.sum().backward();
    });
    expect(net.embed.weight.grad).not.toBeNull();
    net.dispose();
    expect(net.parameters().every((p) => p.disposed)).toBe(true);
    expect(memoryStats().liveBytes).toBe(before);
  });

  it('dispose() frees what submodules own besides parameters and buffers (disposeState)', () => {
    class Counter extends Module {
      total: ReturnType<typeof randn> | null = null;
      add(x: ReturnType<typeof randn>) {
        const next = this.total ? this.total.add(x) : x.clone();
        this.total?.dispose();
        this.total = next;
      }
      protected override disposeState(): void {
        this.total?.dispose();
        this.total = null;
      }
    }
    class Outer extends Module {
      inner = this.registerModule('inner', new Counter());
    }
    const outer = new Outer();
    const x = randn([3]);
    // the device the tensors are made on (the conformance run's, or the CPU)
    const live = () => memoryStats(x.device).liveStorages;
    const before = live();
    outer.inner.add(x);
    outer.inner.add(x);
    expect(live()).toBe(before + 1);
    x.dispose();
    outer.dispose();
    expect(outer.inner.total).toBeNull();
    expect(live()).toBe(before - 1);
  });

  it('train() / eval() set the mode recursively', () => {
    const net = new Net();
    expect(net.training).toBe(true);
    net.eval();
    expect(net.modules().every((m) => !m.training)).toBe(true);
    net.train();
    expect(net.layers.get(1).attn.training).toBe(true);
    expect(net.train(false)).toBe(net);
    expect(net.layers.get(0).norm.training).toBe(false);
    net.dispose();
  });

  it('zeroGrad frees or zeroes the gradients', () => {
    const lin = new Linear(3, 2);
    tidy(() =>
      lin
        .forward(ones([1, 3]))
        .sum()
        .backward(),
    );
    lin.zeroGrad(false);
    expect(lin.weight.grad?.toArray()).toEqual([
      [0, 0, 0],
      [0, 0, 0],
    ]);
    lin.zeroGrad();
    expect(lin.weight.grad).toBeNull();
    expect(lin.bias?.grad).toBeNull();
    lin.dispose();
  });
});

describe('stateDict / loadStateDict', () => {
  it('copies values in place (the tensors keep their identity)', () => {
    const a = new Net(1);
    const b = new Net(2);
    const w = b.embed.weight;
    expect(w.toArray()).not.toEqual(a.embed.weight.toArray());
    const res = b.loadStateDict(a.stateDict());
    expect(res).toEqual({ missingKeys: [], unexpectedKeys: [] });
    expect(b.embed.weight).toBe(w);
    for (const [name, t] of Object.entries(a.stateDict()))
      expect(b.stateDict()[name].toArray(), name).toEqual(t.toArray());
    // loading works from a Map too, and does not record autograd history
    b.loadStateDict(new Map(Object.entries(a.stateDict())));
    expect(b.embed.weight.isLeaf).toBe(true);
    a.dispose();
    b.dispose();
  });

  it('reports missing and unexpected keys, shapes and dtypes by name', () => {
    const net = new Net();
    const sd = { ...net.stateDict() };
    delete sd['layers.1.norm.bias'];
    sd['layers.2.norm.bias'] = zeros([8]);
    const err = (() => {
      try {
        net.loadStateDict(sd);
      } catch (e) {
        return e as TensorError;
      }
      throw new Error('expected loadStateDict to throw');
    })();
    expect(err).toBeInstanceOf(TensorError);
    expect(err.code).toBe('INVALID_ARGUMENT');
    expect(err.message).toMatch(/missing keys: layers\.1\.norm\.bias/);
    expect(err.message).toMatch(/unexpected keys: layers\.2\.norm\.bias/);

    const loose = net.loadStateDict(sd, { strict: false });
    expect(loose).toEqual({ missingKeys: ['layers.1.norm.bias'], unexpectedKeys: ['layers.2.norm.bias'] });

    const wrong = {
      ...net.stateDict(),
      'embed.weight': zeros([8, 5]),
      'embed.bias': zeros([8], { dtype: 'bfloat16' }),
    };
    const before = net.embed.weight.toArray();
    expect(() => net.loadStateDict(wrong)).toThrow(
      /"embed\.weight": shape \[8,5\] in the state dict, \[8,4\] in the module/,
    );
    expect(() => net.loadStateDict(wrong)).toThrow(
      /"embed\.bias": dtype bfloat16 in the state dict, float32 in the module/,
    );
    try {
      net.loadStateDict(wrong, { strict: false });
    } catch (e) {
      expect((e as TensorError).code).toBe('SHAPE_MISMATCH');
    }
    // nothing was copied by the failed loads
    expect(net.embed.weight.toArray()).toEqual(before);
    net.dispose();
  });
});

describe('Module.to', () => {
  it('casts parameters and buffers and rebinds module fields', () => {
    const net = new Net(3);
    const ref = net.layers.get(0).attn.qkv.weight.toArray();
    const oldW = net.embed.weight;
    net.to('bfloat16');
    expect(oldW.disposed).toBe(true);
    expect(net.parameters().every((p) => p.dtype === 'bfloat16' && p.requiresGrad)).toBe(true);
    expect(net.buffers().every((b) => b.dtype === 'bfloat16')).toBe(true);
    expect(net.embed.weight.dtype).toBe('bfloat16');
    expect(net.embed.weight).toBe(net.stateDict()['embed.weight']);
    const w = net.layers.get(0).attn.qkv.weight;
    const back = w.to('float32');
    const r = (ref as number[][]).flat();
    (back.toArray() as number[][]).flat().forEach((v, i) => {
      expect(Math.abs(v - r[i])).toBeLessThanOrEqual(Math.abs(r[i]) / 128);
    });
    back.dispose();
    const y = tidy(() => net.embed.forward(ones([2, 4], { dtype: 'bfloat16' })));
    expect(y.dtype).toBe('bfloat16');
    y.dispose();
    expect(() => net.to('int32')).toThrow(TensorError);
    net.dispose();
  });
});

describe('Module.to rebinds fields named differently from their parameter', () => {
  it('a field `normWeight` holding the parameter `layer_norm_weight` follows the cast', () => {
    class Fused extends Module {
      readonly normWeight = this.registerParameter('layer_norm_weight', ones([4]).requiresGrad_());
    }
    const m = new Fused();
    const old = m.normWeight;
    m.to('bfloat16');
    expect(old.disposed).toBe(true);
    expect(m.normWeight.dtype).toBe('bfloat16');
    expect(m.normWeight).toBe(m.namedParameters()[0][1]);
    m.dispose();
  });
});

describe('layers', () => {
  it('Linear computes x W^T + b with torch default init bounds, reproducibly', () => {
    const lin = new Linear(64, 32, { generator: new Generator(7) });
    const same = new Linear(64, 32, { generator: new Generator(7) });
    expect(lin.weight.toArray()).toEqual(same.weight.toArray());
    expect(lin.bias?.toArray()).toEqual(same.bias?.toArray());
    const bound = 1 / Math.sqrt(64);
    const ws = stats(lin.weight);
    expect(ws.min).toBeGreaterThanOrEqual(-bound);
    expect(ws.max).toBeLessThan(bound);
    expect(ws.std).toBeCloseTo(bound / Math.sqrt(3), 2);
    const bs = stats(lin.bias!);
    expect(bs.min).toBeGreaterThanOrEqual(-bound);
    expect(bs.max).toBeLessThan(bound);

    const x = randn([5, 64], { generator: new Generator(1) });
    const y = lin.forward(x);
    const ref = tidy(() => x.matmul(lin.weight.t()).add(lin.bias!));
    expect(y.shape).toEqual([5, 32]);
    values(y).forEach((v, i) => {
      expect(v).toBeCloseTo(values(ref)[i], 5);
    });
    const noBias = new Linear(3, 2, { bias: false });
    expect(noBias.bias).toBeNull();
    expect(noBias.namedParameters().map(([n]) => n)).toEqual(['weight']);
    const meg = new Linear(16, 8, { initMethod: initMethodNormal(0.02), generator: new Generator(2) });
    expect(values(meg.bias!).every((v) => v === 0)).toBe(true);
    for (const t of [x, y, ref]) t.dispose();
    for (const m of [lin, same, noBias, meg]) m.dispose();
  });

  it('Embedding: N(0, 1) init, padding row zero and frozen', () => {
    const emb = new Embedding(10, 6, { paddingIdx: -1, generator: new Generator(4) });
    expect(emb.paddingIdx).toBe(9);
    expect(values(emb.weight).slice(54)).toEqual([0, 0, 0, 0, 0, 0]);
    const big = new Embedding(200, 100, { generator: new Generator(4) });
    const s = stats(big.weight);
    expect(Math.abs(s.mean)).toBeLessThan(0.02);
    expect(Math.abs(s.std - 1)).toBeLessThan(0.02);
    const ids = tensor([
      [1, 9, 3],
      [9, 1, 0],
    ]);
    const out = emb.forward(ids);
    expect(out.shape).toEqual([2, 3, 6]);
    expect((out.toArray() as number[][][])[0][0]).toEqual((emb.weight.toArray() as number[][])[1]);
    tidy(() => out.sum().backward());
    const g = emb.weight.grad!.toArray() as number[][];
    expect(g[1]).toEqual([2, 2, 2, 2, 2, 2]);
    expect(g[9]).toEqual([0, 0, 0, 0, 0, 0]);
    expect(g[5]).toEqual([0, 0, 0, 0, 0, 0]);
    expect(() => new Embedding(4, 2, { paddingIdx: 4 })).toThrow(TensorError);
    for (const t of [ids, out]) t.dispose();
    emb.dispose();
    big.dispose();
  });

  it('Dropout is active only in training mode', () => {
    const d = new Dropout(0.5, { generator: new Generator(5) });
    const x = ones([1000]);
    const y = d.forward(x);
    const v = values(y);
    expect(v.every((e) => e === 0 || e === 2)).toBe(true);
    const kept = v.filter((e) => e === 2).length;
    expect(kept).toBeGreaterThan(400);
    expect(kept).toBeLessThan(600);
    d.eval();
    const z = d.forward(x);
    expect(values(z).every((e) => e === 1)).toBe(true);
    expect(() => new Dropout(1.5)).toThrow(TensorError);
    for (const t of [x, y, z]) t.dispose();
  });

  it('RMSNorm normalises by the root mean square and scales by weight', () => {
    const norm = new RMSNorm(4, { eps: 1e-6 });
    expect(norm.weight.toArray()).toEqual([1, 1, 1, 1]);
    const x = tensor([
      [1, 2, 3, 4],
      [-2, 0, 2, 0],
    ]).to('float32');
    tidy(() => noGrad(() => norm.weight.copy_(tensor([1, 2, 0.5, 1], { dtype: 'float32' }))));
    const y = norm.forward(x);
    const rows = x.toArray() as number[][];
    const w = [1, 2, 0.5, 1];
    const expected = rows.map((r) => {
      const rms = Math.sqrt(r.reduce((s, v) => s + v * v, 0) / 4 + 1e-6);
      return r.map((v, i) => (v / rms) * w[i]);
    });
    (y.toArray() as number[][]).flat().forEach((v, i) => {
      expect(v).toBeCloseTo(expected.flat()[i], 5);
    });
    for (const t of [x, y]) t.dispose();
    norm.dispose();
  });

  it('LayerNorm normalises to zero mean and unit variance, with optional affine', () => {
    const ln = new LayerNorm(4);
    expect(ln.namedParameters().map(([n]) => n)).toEqual(['weight', 'bias']);
    expect(new LayerNorm(4, { bias: false }).bias).toBeNull();
    const plain = new LayerNorm([4], { elementwiseAffine: false });
    expect(plain.parameters()).toEqual([]);
    const x = tensor([[1, 2, 3, 6]], { dtype: 'float32' });
    const y = ln.forward(x);
    const mean = 3;
    const variance = (4 + 1 + 0 + 9) / 4;
    const expected = [1, 2, 3, 6].map((v) => (v - mean) / Math.sqrt(variance + 1e-5));
    values(y).forEach((v, i) => {
      expect(v).toBeCloseTo(expected[i], 5);
    });
    const z = plain.forward(x);
    values(z).forEach((v, i) => {
      expect(v).toBeCloseTo(expected[i], 5);
    });
    for (const t of [x, y, z]) t.dispose();
    ln.dispose();
    plain.dispose();
  });
});

describe('init', () => {
  it('is seeded and reproducible', () => {
    const a = empty([50, 40]);
    const b = empty([50, 40]);
    normal_(a, 0, 1, new Generator(3));
    normal_(b, 0, 1, new Generator(3));
    expect(a.toArray()).toEqual(b.toArray());
    uniform_(b, 0, 1, new Generator(4));
    expect(a.toArray()).not.toEqual(b.toArray());
    for (const t of [a, b]) t.dispose();
  });

  it('fills with the documented distributions', () => {
    const gen = new Generator(12);
    const t = empty([256, 128]);
    normal_(t, 1, 0.5, gen);
    let s = stats(t);
    expect(s.mean).toBeCloseTo(1, 1);
    expect(s.std).toBeCloseTo(0.5, 2);
    uniform_(t, -2, 3, gen);
    s = stats(t);
    expect(s.min).toBeGreaterThanOrEqual(-2);
    expect(s.max).toBeLessThan(3);
    expect(s.mean).toBeCloseTo(0.5, 1);
    kaimingUniform_(t, { generator: gen });
    // gain sqrt(2) (leaky_relu with a = 0), fan_in 128: bound sqrt(6 / 128)
    s = stats(t);
    expect(s.max).toBeLessThanOrEqual(Math.sqrt(6 / 128));
    expect(s.std).toBeCloseTo(Math.sqrt(2 / 128), 2);
    kaimingUniform_(t, { mode: 'fan_out', nonlinearity: 'relu', generator: gen });
    expect(stats(t).std).toBeCloseTo(Math.sqrt(2 / 256), 2);
    xavierUniform_(t, 1, gen);
    s = stats(t);
    expect(s.max).toBeLessThanOrEqual(Math.sqrt(6 / 384));
    expect(s.std).toBeCloseTo(Math.sqrt(2 / 384), 2);
    zeros_(t);
    expect(stats(t).max).toBe(0);
    ones_(t);
    expect(stats(t).min).toBe(1);
    initMethodNormal(0.02)(t, gen);
    expect(stats(t).std).toBeCloseTo(0.02, 3);
    // Megatron's output-layer init: sigma / sqrt(2 * numLayers) = 0.02 / sqrt(2 * 8) = 0.005
    scaledInitMethodNormal(0.02, 8)(t, gen);
    expect(stats(t).std).toBeCloseTo(0.005, 4);
    expect(() => kaimingUniform_(zeros([3]))).toThrow(TensorError);
    expect(() => normal_(tensor([1, 2]))).toThrow(TensorError);
    t.dispose();
  });

  it('draws the same values in every precision (up to rounding)', () => {
    const a = new Linear(8, 4, { generator: new Generator(1) });
    const b = new Linear(8, 4, { generator: new Generator(1), dtype: 'bfloat16' });
    const rounded = a.weight.to('bfloat16');
    expect(b.weight.toArray()).toEqual(rounded.toArray());
    rounded.dispose();
    a.dispose();
    b.dispose();
  });
});
