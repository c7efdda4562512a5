import { defineConfig } from 'vitest/config';

// The default suite: every run config of every family validates (milliseconds). The tiny training
// runs are in test/heavy/ (pnpm test:heavy).
export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    exclude: ['test/heavy/**'],
    testTimeout: 60_000,
    pool: 'forks',
  },
});
