import { copyFileSync } from 'node:fs';
import { defineConfig } from 'tsup';

export default defineConfig({
  entry: ['src/index.ts'],
  format: ['esm'],
  dts: true,
  sourcemap: true,
  clean: true,
  target: 'node20',
  // The preprocessing tokenizer worker is plain JS loaded by URL next to the bundle
  // (new URL('./worker.mjs', import.meta.url)), so it is copied rather than bundled.
  onSuccess: async () => {
    copyFileSync('src/preprocess/worker.mjs', 'dist/worker.mjs');
  },
});
