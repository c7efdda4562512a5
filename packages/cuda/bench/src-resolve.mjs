// A Node module-resolution hook for the GPU bench: every `@megapatch/<pkg>[/<sub>]` import resolves
// to that package's TypeScript source (packages/<pkg>/src/…, mapped from the dist file its
// package.json exports name), so the bench runs from sources alone, with no dist build, and the
// tensor package, its backends (@megapatch/cuda) and the trainer share one module instance (one
// device registry). tsx, whose hooks run after this one, compiles the .ts files.
// Registered by ours.mts (module.register) before it imports anything of megapatch's.
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join, resolve as resolvePath } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const packagesDir = resolvePath(dirname(fileURLToPath(import.meta.url)), '../..');
const cache = new Map();

function sourceOf(pkg, sub) {
  const key = `${pkg}${sub}`;
  if (cache.has(key)) return cache.get(key);
  let url = null;
  const manifest = join(packagesDir, pkg, 'package.json');
  if (existsSync(manifest)) {
    const exp = JSON.parse(readFileSync(manifest, 'utf8')).exports ?? {};
    const entry = exp[`.${sub}`];
    const target = typeof entry === 'string' ? entry : (entry?.import ?? entry?.default);
    if (typeof target === 'string' && target.startsWith('./dist/') && target.endsWith('.js')) {
      const src = join(packagesDir, pkg, 'src', `${target.slice('./dist/'.length, -'.js'.length)}.ts`);
      if (existsSync(src)) url = pathToFileURL(src).href;
    }
  }
  cache.set(key, url);
  return url;
}

export async function resolve(specifier, context, nextResolve) {
  const m = /^@megapatch\/([a-z0-9-]+)(\/[a-z0-9/_-]+)?$/.exec(specifier);
  if (m) {
    const url = sourceOf(m[1], m[2] ?? '');
    if (url) return nextResolve(url, context); // tsx (next in the chain) loads the .ts
  }
  try {
    return await nextResolve(specifier, context);
  } catch (e) {
    // a third-party package that the importing workspace package's node_modules lacks (a GPU
    // machine carries the node_modules of a few packages only): the same name from another
    // workspace package's node_modules (pnpm's catalog gives them one version)
    if (e?.code !== 'ERR_MODULE_NOT_FOUND' || specifier.startsWith('.') || specifier.includes(':')) throw e;
    for (const pkg of FALLBACK) {
      const parentURL = pathToFileURL(join(packagesDir, pkg, 'package.json')).href;
      if (parentURL === context.parentURL) continue;
      try {
        return await nextResolve(specifier, { ...context, parentURL });
      } catch {}
    }
    throw e;
  }
}

const FALLBACK = ['tensor', 'cuda', 'train', 'data', 'models', 'convert', 'parallel'];
