// Lists (one a line, relative to the repository root given as argv[2], default the cwd) the
// node_modules entries that packages/cuda/gpu/run.sh needs on a machine without them: vitest,
// @types/node, and every dependency link of packages/tensor and packages/cuda (cmake-js,
// node-addon-api, node-api-headers, tsx, zod, the @megapatch/tensor workspace link), with their
// transitive closure through pnpm's layout (each node_modules/.pnpm/<name@version> folder holds the
// package and links to its dependencies' folders; the links are followed, and kept as links by tar).
// MEGAPATCH_GPU_PACKAGES (default "tensor cuda") names the workspace packages whose node_modules
// are roots; EXTRA_ROOTS adds more entries (paths relative to the root, space-separated).
import { existsSync, lstatSync, readdirSync, realpathSync } from 'node:fs';
import { join, relative, sep } from 'node:path';

const root = realpathSync(process.argv[2] ?? process.cwd());
const rel = (p) => relative(root, p);
const pnpm = join(root, 'node_modules', '.pnpm') + sep;
const roots = [join(root, 'node_modules/vitest'), join(root, 'node_modules/@types/node')];
for (const e of (process.env.EXTRA_ROOTS ?? '').split(/\s+/).filter(Boolean)) roots.push(join(root, e));

/** The package entries of a node_modules folder (scoped ones as @scope/name), .bin left out. */
function entries(nm) {
  if (!existsSync(nm)) return [];
  const list = [];
  for (const e of readdirSync(nm)) {
    if (e.startsWith('.')) continue;
    if (e.startsWith('@')) for (const s of readdirSync(join(nm, e))) list.push(join(nm, e, s));
    else list.push(join(nm, e));
  }
  return list;
}
const packages = (process.env.MEGAPATCH_GPU_PACKAGES || 'tensor cuda').split(/\s+/).filter(Boolean);
for (const pkg of packages) roots.push(...entries(join(root, 'packages', pkg, 'node_modules')));

const out = new Set(roots.map(rel));
const dirs = new Set();
const pnpmDir = (real) => (real.startsWith(pnpm) ? real.slice(pnpm.length).split(sep)[0] : null);
const queue = [...roots];
while (queue.length) {
  const p = queue.pop();
  if (!existsSync(p)) {
    console.error(`closure: missing ${rel(p)}`);
    process.exitCode = 1;
    continue;
  }
  const dir = pnpmDir(realpathSync(p));
  if (dir === null || dirs.has(dir)) continue; // a workspace package: the link alone
  dirs.add(dir);
  for (const e of entries(join(pnpm, dir, 'node_modules'))) if (lstatSync(e).isSymbolicLink()) queue.push(e);
}
for (const d of dirs) out.add(`node_modules/.pnpm/${d}`);
// pnpm's hidden hoisting folder (packages that import what they do not declare): links into the
// closure only
for (const e of entries(join(pnpm, 'node_modules'))) {
  try {
    if (dirs.has(pnpmDir(realpathSync(e)))) out.add(rel(e));
  } catch {}
}
for (const b of ['node_modules/.bin/vitest', ...packages.map((p) => `packages/${p}/node_modules/.bin`)])
  if (existsSync(join(root, b))) out.add(b);
for (const p of [...out].sort()) console.log(p);
