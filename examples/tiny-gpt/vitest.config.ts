import { defineConfig } from 'vitest/config';

// test/heavy.test.ts runs the README's commands end to end (minutes): only with MEGAPATCH_HEAVY=1.
const heavy = process.env.MEGAPATCH_HEAVY === '1';

export default defineConfig({
  test: {
    include: heavy ? ['test/heavy.test.ts'] : ['test/**/*.test.ts'],
    exclude: heavy ? [] : ['test/heavy.test.ts'],
    testTimeout: 600_000,
    pool: 'forks',
  },
});
