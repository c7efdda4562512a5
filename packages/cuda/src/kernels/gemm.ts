// The GEMM-family named kernels of the CUDA backend (native/src/kernels/gemm.cu): linear with its
// bias and activation applied in the GEMM's epilogue (cuBLASLt's CUBLASLT_EPILOGUE_BIAS,
// RELU_BIAS, GELU_AUX_BIAS..., or the tiled kernel's store), so the output is written once and a
// 16-bit result is rounded once (the erf GELU, which cuBLASLt has no epilogue for, is the bias
// GEMM then the unary kernel), linear's weight and bias gradients from one GEMM (cuBLASLt's
// CUBLASLT_EPILOGUE_BGRADB, or the tiled kernel and a row sum), and the weight gradient added
// straight into a float32 main gradient (gradient-accumulation fusion: cuBLASLt with 16-bit A and
// B, float32 C and D, beta 1), and linear's output with a residual added (cuBLASLt's C the
// residual, D the output, beta 1).
import type { KernelTable, Tensor } from '@megapatch/tensor';
import { DTYPE_CODES, LINEAR_ACTIVATION_CODES } from '@megapatch/tensor/abi';
import { address, type Entries, ITEMSIZE, noteGemm, pack } from '../pack.js';

type GemmKernels = Pick<
  KernelTable,
  | 'linearBias'
  | 'linearBiasActivation'
  | 'linearWeightBiasGrad'
  | 'linearWeightGradAccumulate'
  | 'linearResidual'
  | 'groupedGemm'
  | 'groupedGemmSized'
>;

/** Problems per groupedGemm call: 11 arguments each within the argument buffer. */
const GROUPED_CHUNK = 256;

/**
 * Writes the head every linear entry starts with (native/src/backend/gemm.cc read_head): the dtype,
 * M, N, K and the operands of one GEMM out [M, N] = a [M, K] @ b [K, N] given by their 2-D strides.
 * The GEMM's dtype is out's unless given (linearWeightGradAccumulate: the operands', out float32).
 */
function packHead(
  out: Tensor,
  M: number,
  N: number,
  K: number,
  a: Tensor,
  aStrides: readonly [number, number],
  b: Tensor,
  bStrides: readonly [number, number],
  dtype = out.dtype,
) {
  const p = pack.begin();
  noteGemm(M, N, K, ITEMSIZE[dtype]);
  return p
    .num(DTYPE_CODES[dtype])
    .num(M)
    .num(N)
    .num(K)
    .num(address(a))
    .num(aStrides[0])
    .num(aStrides[1])
    .num(address(b))
    .num(bStrides[0])
    .num(bStrides[1])
    .num(address(out))
    .num(N);
}

/** linear's x [M, K] @ weight[N, K]^T: the GEMM's B is weight read as [K, N], its strides swapped. */
function packLinear(out: Tensor, x: Tensor, weight: Tensor) {
  const [M, K] = x.shape;
  const N = weight.shape[0];
  return packHead(out, M, N, K, x, [x.strides[0], x.strides[1]], weight, [
    weight.strides[1],
    weight.strides[0],
  ]);
}

export function gemmKernels(call: Entries): GemmKernels {
  return {
    linearBias(out, x, weight, bias) {
      packLinear(out, x, weight).num(address(bias)).num(DTYPE_CODES[bias.dtype]);
      call.linearBias();
    },

    linearResidual(out, x, weight, residual) {
      if (residual.ndim !== 2 || (residual.shape[1] > 1 && residual.strides[1] !== 1))
        throw new Error(
          `linearResidual: the residual must be [M, N] with unit column stride, got ${residual.describe()}`,
        );
      packLinear(out, x, weight).num(address(residual)).num(residual.strides[0]);
      call.linearResidual();
    },

    linearBiasActivation(out, preAct, x, weight, bias, activation) {
      const N = weight.shape[0];
      // a null bias or preAct goes as address 0
      packLinear(out, x, weight)
        .num(bias ? address(bias) : 0)
        .num(DTYPE_CODES[(bias ?? out).dtype])
        .num(preAct ? address(preAct) : 0)
        .num(N)
        .num(DTYPE_CODES[(preAct ?? out).dtype])
        .num(LINEAR_ACTIVATION_CODES[activation]);
      call.linearActivation();
    },

    groupedGemm(problems) {
      for (let i = 0; i < problems.length; i += GROUPED_CHUNK) {
        const chunk = problems.slice(i, i + GROUPED_CHUNK);
        const dtype = chunk[0].c.tensor.dtype;
        const p = pack.begin().num(DTYPE_CODES[dtype]).num(chunk.length);
        for (const { m, n, k, a, b, c } of chunk) {
          for (const t of [a.tensor, b.tensor, c.tensor]) {
            if (t.dtype !== dtype)
              throw new Error(
                `groupedGemm: an operand is ${t.dtype} but the output is ${dtype}; use one dtype`,
              );
          }
          noteGemm(m, n, k, ITEMSIZE[dtype]);
          p.num(m).num(n).num(k);
          p.num(address(a.tensor)).num(a.rs).num(a.cs);
          p.num(address(b.tensor)).num(b.rs).num(b.cs);
          p.num(address(c.tensor)).num(c.rs);
        }
        call.groupedGemm();
      }
    },

    groupedGemmSized({ sizes, split, total, problems }) {
      // one call plans every group on the device (the sizes' prefix crosses any chunking): more
      // groups than an argument buffer holds read their sizes instead
      if (problems.length === 0) return true;
      if (problems.length > GROUPED_CHUNK || sizes.dtype !== 'int64' || !sizes.isContiguous) return false;
      const dtype = problems[0].c.tensor.dtype;
      const p = pack
        .begin()
        .num(DTYPE_CODES[dtype])
        .num(split === 'rows' ? 0 : 1)
        .num(total)
        .num(address(sizes))
        .num(problems.length);
      for (const { m, n, k, a, b, c } of problems) {
        for (const t of [a.tensor, b.tensor, c.tensor]) {
          if (t.dtype !== dtype)
            throw new Error(
              `groupedGemmSized: an operand is ${t.dtype} but the output is ${dtype}; use one dtype`,
            );
        }
        p.num(m).num(n).num(k);
        p.num(address(a.tensor)).num(a.rs).num(a.cs);
        p.num(address(b.tensor)).num(b.rs).num(b.cs);
        p.num(address(c.tensor)).num(c.rs);
      }
      // the profile's FLOPs: the groups' products together (their sizes sum to total)
      const { m, n, k } = problems[0];
      noteGemm(split === 'rows' ? total : m, n, split === 'k' ? total : k, ITEMSIZE[dtype]);
      return call.groupedGemmSized() === true;
    },

    linearWeightBiasGrad(gradWeight, gradBias, g, x) {
      const [M, N] = g.shape;
      const K = x.shape[1];
      // gradWeight [N, K] = g^T [N, M] @ x [M, K]: the GEMM's A is g read transposed (its strides
      // swapped), and gradBias, the row sums of that A, is the epilogue's bias gradient
      packHead(gradWeight, N, K, M, g, [g.strides[1], g.strides[0]], x, [x.strides[0], x.strides[1]])
        .num(address(gradBias))
        .num(DTYPE_CODES[gradBias.dtype]);
      call.linearWeightBiasGrad();
    },

    linearWeightGradAccumulate(mainGrad, g, x) {
      const [M, N] = g.shape;
      const K = x.shape[1];
      if (mainGrad.dtype !== 'float32')
        throw new Error(
          `linearWeightGradAccumulate: the main gradient must be float32, got ${mainGrad.dtype}`,
        );
      if (x.dtype !== g.dtype)
        throw new Error(
          `linearWeightGradAccumulate: the input is ${x.dtype} but the gradient is ${g.dtype}; use one dtype`,
        );
      // mainGrad [N, K] += g^T [N, M] @ x [M, K]: as linearWeightBiasGrad's GEMM, with the GEMM's
      // dtype the operands' (the native entry reads and writes mainGrad as float32)
      packHead(mainGrad, N, K, M, g, [g.strides[1], g.strides[0]], x, [x.strides[0], x.strides[1]], g.dtype);
      call.linearWeightGradAccumulate();
    },
  };
}
