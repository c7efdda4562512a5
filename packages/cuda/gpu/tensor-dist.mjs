// Builds packages/tensor/dist with esbuild as its tsup.config.ts does (the same entries; ESM,
// node20, code splitting, source maps, dependencies left external), without the .d.ts files: for a
// machine that has only the node_modules of packages/cuda/gpu/closure.mjs (no tsup, no typescript).
// gpu/gemm-check.mts and `import('@megapatch/cuda')` outside vitest load the tensor package's dist.
// usage (repository root): node packages/cuda/gpu/tensor-dist.mjs
import { readFileSync, realpathSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join, resolve } from 'node:path';

const root = resolve(process.argv[2] ?? process.cwd());
const tensor = join(root, 'packages/tensor');
// esbuild is no dependency of the workspace packages: take tsx's
const require = createRequire(
  join(realpathSync(join(root, 'packages/cuda/node_modules/tsx')), 'package.json'),
);
const esbuild = require('esbuild');
// the entries of tsup.config.ts (`entry: ['src/index.ts', ...]`)
const config = readFileSync(join(tensor, 'tsup.config.ts'), 'utf8');
const entryPoints = [...(/entry:\s*\[([^\]]*)\]/.exec(config)?.[1] ?? '').matchAll(/'([^']+)'/g)].map(
  (m) => m[1],
);
if (!entryPoints.length) throw new Error('tensor-dist: no entry list in packages/tensor/tsup.config.ts');
rmSync(join(tensor, 'dist'), { recursive: true, force: true });
const result = await esbuild.build({
  absWorkingDir: tensor,
  entryPoints,
  outdir: 'dist',
  bundle: true,
  format: 'esm',
  platform: 'node',
  target: 'node20',
  splitting: true,
  sourcemap: true,
  packages: 'external',
  logLevel: 'warning',
});
if (result.errors.length) process.exit(1);
console.log(
  `tensor-dist: packages/tensor/dist (${entryPoints.join(', ')}) built with esbuild ${esbuild.version}`,
);
