import { defineConfig } from 'vitest/config';

// The op tests again, with every tensor on another backend (default the reference backend ref:0;
// MEGAPATCH_TEST_DEVICE picks another registered device): forward and backward against the PyTorch
// fixtures, dtypes, odd shapes, non-contiguous views, gradcheck, autograd, random streams, optimizers.
export default defineConfig({
  test: {
    include: [
      'test/core-ops.test.ts',
      'test/softmax.test.ts',
      'test/norm.test.ts',
      'test/rope.test.ts',
      'test/glu.test.ts',
      'test/linear-activation.test.ts',
      'test/linear-residual.test.ts',
      'test/cross-entropy-shard.test.ts',
      'test/attention.test.ts',
      'test/indexing.test.ts',
      'test/gradcheck.test.ts',
      'test/autograd.test.ts',
      'test/grad-destination.test.ts',
      'test/multi-output.test.ts',
      'test/random.test.ts',
      'test/nn.test.ts',
      'test/optim.test.ts',
      'test/mixed-precision.test.ts',
      'test/post-accumulate-hook.test.ts',
      'test/errors.test.ts',
    ],
    setupFiles: ['test/conformance/setup.ts'],
    testTimeout: 120_000,
    pool: 'forks',
  },
});
