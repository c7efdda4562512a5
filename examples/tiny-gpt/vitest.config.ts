import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    exclude: ['test/heavy.test.ts'],
    testTimeout: 300_000,
    pool: 'forks',
  },
});
