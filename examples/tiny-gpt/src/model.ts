// A small Llama-style GPT built only from @megapatch/tensor: token embedding, pre-norm blocks of
// RMSNorm + causal self-attention with RoPE + SwiGLU MLP, a final RMSNorm and an output layer
// tied to the embedding. Parameter names follow Megatron-Core's GPT model.
import {
  applyRotaryPosEmb,
  arange,
  checkpoint,
  crossEntropy,
  Embedding,
  Generator,
  initMethodNormal,
  Linear,
  linear,
  Module,
  ModuleList,
  mul,
  RMSNorm,
  ropeCosSin,
  scaledDotProductAttention,
  scaledInitMethodNormal,
  silu,
  type Tensor,
} from '@megapatch/tensor';
import { z } from 'zod';

export const GPTConfig = z.object({
  vocabSize: z.number().int().positive(),
  numLayers: z.number().int().positive(),
  hiddenSize: z.number().int().positive(),
  numAttentionHeads: z.number().int().positive(),
  /** SwiGLU inner size; defaults to a multiple of 8 near 8/3 of the hidden size. */
  ffnHiddenSize: z.number().int().positive().optional(),
  maxSeqLength: z.number().int().positive(),
  rotaryBase: z.number().positive().default(10000),
  normEpsilon: z.number().positive().default(1e-5),
  initStd: z.number().positive().default(0.02),
  /** Recompute each block's activations in backward (activation checkpointing). */
  recompute: z.boolean().default(false),
  seed: z.number().int().default(1234),
});
export type GPTConfig = z.input<typeof GPTConfig>;
type Resolved = z.output<typeof GPTConfig>;

class SelfAttention extends Module {
  readonly linearQkv: Linear;
  readonly linearProj: Linear;
  constructor(private readonly cfg: Resolved) {
    super();
    const h = cfg.hiddenSize;
    this.linearQkv = this.registerModule('linear_qkv', new Linear(h, 3 * h, { bias: false }));
    this.linearProj = this.registerModule('linear_proj', new Linear(h, h, { bias: false }));
  }

  /** x [batch, seq, hidden] -> [batch, seq, hidden]. */
  forward(x: Tensor, cos: Tensor, sin: Tensor): Tensor {
    const [b, s] = x.shape;
    const nh = this.cfg.numAttentionHeads;
    const hd = this.cfg.hiddenSize / nh;
    const [qh, kh, v] = this.linearQkv.forward(x).view(b, s, 3, nh, hd).permute(2, 0, 3, 1, 4).unbind(0);
    const q = applyRotaryPosEmb(qh, cos, sin);
    const k = applyRotaryPosEmb(kh, cos, sin);
    const o = scaledDotProductAttention(q, k, v, { isCausal: true });
    return this.linearProj.forward(o.transpose(1, 2).reshape(b, s, this.cfg.hiddenSize));
  }
}

class SwiGLU extends Module {
  readonly linearFc1: Linear;
  readonly linearFc2: Linear;
  constructor(
    private readonly ffn: number,
    hidden: number,
  ) {
    super();
    // gate and up projections fused in one weight, as Megatron's linear_fc1
    this.linearFc1 = this.registerModule('linear_fc1', new Linear(hidden, 2 * ffn, { bias: false }));
    this.linearFc2 = this.registerModule('linear_fc2', new Linear(ffn, hidden, { bias: false }));
  }

  forward(x: Tensor): Tensor {
    const [gate, up] = this.linearFc1.forward(x).split(this.ffn, -1);
    return this.linearFc2.forward(mul(silu(gate), up));
  }
}

class TransformerLayer extends Module {
  readonly inputLayernorm: RMSNorm;
  readonly selfAttention: SelfAttention;
  readonly preMlpLayernorm: RMSNorm;
  readonly mlp: SwiGLU;
  constructor(cfg: Resolved, ffn: number) {
    super();
    this.inputLayernorm = this.registerModule(
      'input_layernorm',
      new RMSNorm(cfg.hiddenSize, { eps: cfg.normEpsilon }),
    );
    this.selfAttention = this.registerModule('self_attention', new SelfAttention(cfg));
    this.preMlpLayernorm = this.registerModule(
      'pre_mlp_layernorm',
      new RMSNorm(cfg.hiddenSize, { eps: cfg.normEpsilon }),
    );
    this.mlp = this.registerModule('mlp', new SwiGLU(ffn, cfg.hiddenSize));
  }

  forward(x: Tensor, cos: Tensor, sin: Tensor): Tensor {
    const h = x.add(this.selfAttention.forward(this.inputLayernorm.forward(x), cos, sin));
    return h.add(this.mlp.forward(this.preMlpLayernorm.forward(h)));
  }
}

/** The token embedding (Megatron's LanguageModelEmbedding without position embeddings). */
class LanguageModelEmbedding extends Module {
  readonly wordEmbeddings: Embedding;
  constructor(vocab: number, hidden: number) {
    super();
    this.wordEmbeddings = this.registerModule('word_embeddings', new Embedding(vocab, hidden));
  }
}

class TransformerBlock extends Module {
  readonly layers: ModuleList<TransformerLayer>;
  readonly finalLayernorm: RMSNorm;
  constructor(cfg: Resolved, ffn: number) {
    super();
    this.layers = this.registerModule(
      'layers',
      new ModuleList(Array.from({ length: cfg.numLayers }, () => new TransformerLayer(cfg, ffn))),
    );
    this.finalLayernorm = this.registerModule(
      'final_layernorm',
      new RMSNorm(cfg.hiddenSize, { eps: cfg.normEpsilon }),
    );
  }
}

export class GPT extends Module {
  readonly config: Resolved;
  readonly embedding: LanguageModelEmbedding;
  readonly decoder: TransformerBlock;

  constructor(config: GPTConfig) {
    super();
    const cfg = GPTConfig.parse(config);
    if (cfg.hiddenSize % cfg.numAttentionHeads !== 0) {
      throw new Error(
        `hiddenSize ${cfg.hiddenSize} is not divisible by numAttentionHeads ${cfg.numAttentionHeads}`,
      );
    }
    this.config = cfg;
    const ffn = cfg.ffnHiddenSize ?? Math.ceil((cfg.hiddenSize * 8) / 3 / 8) * 8;
    this.embedding = this.registerModule(
      'embedding',
      new LanguageModelEmbedding(cfg.vocabSize, cfg.hiddenSize),
    );
    this.decoder = this.registerModule('decoder', new TransformerBlock(cfg, ffn));
    this.initWeights();
  }

  /** Megatron's initialisation: normal(0, std), output projections scaled by 1/sqrt(2 * layers). */
  private initWeights(): void {
    const { initStd, numLayers, seed } = this.config;
    const init = initMethodNormal(initStd);
    const scaled = scaledInitMethodNormal(initStd, numLayers);
    const generator = new Generator(seed);
    for (const [name, p] of this.namedParameters()) {
      if (name.endsWith('layernorm.weight')) continue;
      if (name.endsWith('linear_proj.weight') || name.endsWith('linear_fc2.weight')) scaled(p, generator);
      else init(p, generator);
    }
  }

  /** tokens [batch, seq] (int) -> logits [batch, seq, vocab]. */
  forward(tokens: Tensor): Tensor {
    const s = tokens.shape[1];
    if (s > this.config.maxSeqLength) {
      throw new Error(`sequence length ${s} exceeds maxSeqLength ${this.config.maxSeqLength}`);
    }
    const hd = this.config.hiddenSize / this.config.numAttentionHeads;
    const pos = arange(s);
    const { cos, sin } = ropeCosSin(pos, hd, { base: this.config.rotaryBase });
    let h = this.embedding.wordEmbeddings.forward(tokens);
    for (const layer of this.decoder.layers) {
      h = this.config.recompute
        ? checkpoint((x) => layer.forward(x, cos, sin), h)
        : layer.forward(h, cos, sin);
    }
    const out = this.decoder.finalLayernorm.forward(h);
    // output layer tied to the input embedding
    return linear(out, this.embedding.wordEmbeddings.weight);
  }

  /** Mean cross-entropy of next-token predictions; labels equal to -100 are ignored. */
  loss(tokens: Tensor, labels: Tensor): Tensor {
    const logits = this.forward(tokens);
    return crossEntropy(logits.view(-1, this.config.vocabSize), labels.view(-1), { ignoreIndex: -100 });
  }
}
