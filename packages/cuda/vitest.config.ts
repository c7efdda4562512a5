import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

const here = dirname(fileURLToPath(import.meta.url));

export default defineConfig({
  resolve: {
    // the tests and the backend share the tensor package's sources (one registry of devices)
    alias: [
      { find: /^@megapatch\/tensor$/, replacement: resolve(here, '../tensor/src/index.ts') },
      { find: /^@megapatch\/tensor\/abi$/, replacement: resolve(here, '../tensor/src/abi.ts') },
    ],
  },
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    pool: 'forks',
  },
});
