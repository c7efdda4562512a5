import { defineConfig } from 'tsup';

export default defineConfig({
  entry: ['src/index.ts', 'src/info.ts', 'src/emulator.ts'],
  format: ['esm'],
  dts: true,
  sourcemap: true,
  clean: true,
  target: 'node20',
});
