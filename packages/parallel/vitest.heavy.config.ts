import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/heavy/**/*.test.ts'],
    testTimeout: 900_000,
    hookTimeout: 900_000,
    pool: 'forks',
    setupFiles: ['test/setup-gc.ts'],
    fileParallelism: false,
  },
});
