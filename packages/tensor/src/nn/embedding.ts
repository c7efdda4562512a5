// Embedding lookup table.
import type { DType } from '../dtype.js';
import { TensorError } from '../errors.js';
import { empty } from '../ops/creation.js';
import { embedding } from '../ops/indexing.js';
import type { Generator } from '../random.js';
import type { Tensor } from '../tensor.js';
import { type InitMethod, normal_ } from './init.js';
import { Module } from './module.js';

/** Options of Embedding. */
export interface EmbeddingOptions {
  /** A row that starts at zero and receives no gradient (negative counts from the end). */
  paddingIdx?: number;
  dtype?: DType;
  device?: string;
  generator?: Generator;
  /** Initialises the weight instead of torch's N(0, 1) (e.g. Megatron's initMethodNormal). */
  initMethod?: InitMethod;
}

/** A [num, dim] table looked up by integer ids (torch.nn.Embedding; weight ~ N(0, 1)). */
export class Embedding extends Module {
  readonly numEmbeddings: number;
  readonly embeddingDim: number;
  readonly paddingIdx: number | null;
  readonly weight: Tensor;

  constructor(numEmbeddings: number, embeddingDim: number, options: EmbeddingOptions = {}) {
    super();
    if (
      !(
        Number.isInteger(numEmbeddings) &&
        numEmbeddings > 0 &&
        Number.isInteger(embeddingDim) &&
        embeddingDim >= 0
      )
    ) {
      throw new TensorError(
        'INVALID_ARGUMENT',
        `Embedding: sizes must be positive integers, got ${numEmbeddings} x ${embeddingDim}`,
      );
    }
    this.numEmbeddings = numEmbeddings;
    this.embeddingDim = embeddingDim;
    let pad = options.paddingIdx ?? null;
    if (pad !== null) {
      if (!(Number.isInteger(pad) && pad >= -numEmbeddings && pad < numEmbeddings)) {
        throw new TensorError(
          'INDEX_OUT_OF_RANGE',
          `Embedding: paddingIdx ${pad} is out of range for ${numEmbeddings} embeddings`,
        );
      }
      if (pad < 0) pad += numEmbeddings;
    }
    this.paddingIdx = pad;
    this.weight = this.registerParameter(
      'weight',
      empty([numEmbeddings, embeddingDim], { dtype: options.dtype ?? 'float32', device: options.device }),
    );
    if (options.initMethod) options.initMethod(this.weight, options.generator);
    else normal_(this.weight, 0, 1, options.generator);
    if (pad !== null) {
      const row = this.weight.select(0, pad);
      row.backend.fill(row, 0);
      row.dispose();
    }
  }

  forward(ids: Tensor): Tensor {
    return embedding(ids, this.weight, { paddingIdx: this.paddingIdx });
  }
}
