import { defineConfig } from 'vitest/config';

// test/heavy/: each family's tiny pre-training and SFT runs (about 3 minutes on 2 cores).
export default defineConfig({
  test: {
    include: ['test/heavy/**/*.test.ts'],
    testTimeout: 300_000,
    hookTimeout: 300_000,
    pool: 'forks',
    fileParallelism: false,
  },
});
