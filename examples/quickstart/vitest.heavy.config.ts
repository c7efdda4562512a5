import { defineConfig } from 'vitest/config';

// test/heavy/: the full-size run of the README's `pnpm demo` (minutes), with `pnpm test:heavy`.
export default defineConfig({
  test: {
    include: ['test/heavy/**/*.test.ts'],
    testTimeout: 900_000,
    hookTimeout: 900_000,
    pool: 'forks',
  },
});
