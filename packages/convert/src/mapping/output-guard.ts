// Where a conversion may write. An output never is, lies inside or holds its input (compared by
// real path, so `..` and symbolic links cannot hide it), and `overwrite` replaces only what
// megapatch itself produced: a checkpoint iteration holding nothing but the files its metadata.json
// lists, or a Hugging Face folder it exported, recognised by the marker file it leaves there.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { z } from 'zod';
import {
  CHECKPOINT_METADATA_FILE,
  type CheckpointMetadata,
  HF_FILES_DIR,
  readCheckpointMetadata,
} from '../checkpoint/metadata.js';
import { ConvertError } from '../errors.js';

/** How path `a` lies relative to path `b`. */
export type PathRelation = 'same' | 'inside' | 'contains' | 'apart';

/** Name of the marker megapatch writes into every Hugging Face folder it exports. */
export const HF_EXPORT_MARKER_FILE = '.megapatch-export.json';

/** The marker's contents: which files the export wrote, and from which checkpoint. */
export const HfExportMarker = z.object({
  format: z.literal('megapatch-hf-export'),
  version: z.literal(1),
  /** Every file of the folder besides the marker (plain names: exports are flat). */
  files: z.array(
    z.string().refine((s) => s === path.basename(s) && s !== '.' && s !== '..' && !s.includes('\\')),
  ),
  source: z.object({
    /** Absolute path of the checkpoint root that was exported. */
    checkpoint: z.string(),
    iteration: z.number().int().nonnegative(),
  }),
});
/** The marker of an exported Hugging Face folder. */
export type HfExportMarker = z.infer<typeof HfExportMarker>;

/** `p` with every symbolic link of its longest existing ancestor resolved (the rest appended). */
function realPath(p: string): string {
  const rest: string[] = [];
  let cur = path.resolve(p);
  for (;;) {
    try {
      return path.join(fs.realpathSync.native(cur), ...rest.reverse());
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      const parent = path.dirname(cur);
      if ((code !== 'ENOENT' && code !== 'ENOTDIR') || parent === cur)
        return path.join(cur, ...rest.reverse());
      rest.push(path.basename(cur));
      cur = parent;
    }
  }
}

/** How absolute, already resolved path `a` lies relative to `b`. */
function relationOf(a: string, b: string): PathRelation {
  if (a === b) return 'same';
  const under = (x: string, y: string) => {
    const r = path.relative(y, x);
    return r !== '' && r !== '..' && !r.startsWith(`..${path.sep}`) && !path.isAbsolute(r);
  };
  if (under(a, b)) return 'inside';
  if (under(b, a)) return 'contains';
  return 'apart';
}

/**
 * How path `a` lies relative to path `b`: the same place, inside it, containing it, or apart.
 * Both are compared as real paths (symbolic links of their longest existing ancestor resolved),
 * so `x/../x` and a link to `x` are both the same as `x`; neither path needs to exist.
 */
export function pathRelation(a: string, b: string): PathRelation {
  return relationOf(realPath(a), realPath(b));
}

/** Refuses an output that is, lies inside or contains the input, before anything is written. */
export function checkOutputApart(output: string, input: string): void {
  const rel = pathRelation(output, input);
  if (rel === 'apart') return;
  const how = { same: 'is the same as', inside: 'is inside', contains: 'contains' }[rel];
  const fix = {
    same: 'write the output somewhere else',
    inside: 'pick an output outside the input',
    contains: 'pick an output that does not hold the input',
  }[rel];
  const links =
    relationOf(path.resolve(output), path.resolve(input)) === rel ? '' : ' (after resolving symbolic links)';
  throw new ConvertError('INVALID_ARGUMENT', `output ${output} ${how} the input ${input}${links}; ${fix}`);
}

/** `"a", "b", "c" (and 2 more)`. */
function listEntries(names: readonly string[]): string {
  const shown = names
    .slice(0, 3)
    .map((n) => JSON.stringify(n))
    .join(', ');
  return names.length > 3 ? `${shown} (and ${names.length - 3} more)` : shown;
}

/** Entries of `dir`, sorted by name. */
function entriesOf(dir: string): fs.Dirent[] {
  return fs.readdirSync(dir, { withFileTypes: true }).sort((a, b) => (a.name < b.name ? -1 : 1));
}

/** An entry as an error message shows it: folders with a trailing `/`. */
const shownName = (e: fs.Dirent, prefix = '') => `${prefix}${e.name}${e.isDirectory() ? '/' : ''}`;

/** Stats `p`, or null when nothing is there. */
function lstatOrNull(p: string): fs.Stats | null {
  try {
    return fs.lstatSync(p);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw e;
  }
}

/** Entries of an iteration folder that a megapatch checkpoint with metadata `meta` would not hold. */
function foreignCheckpointEntries(dir: string, meta: CheckpointMetadata | null): string[] {
  const files = new Set<string>();
  const hfFiles = new Set(meta?.huggingface?.files ?? []);
  if (meta) {
    files.add(CHECKPOINT_METADATA_FILE);
    for (const t of Object.values(meta.tensors)) for (const p of t.pieces) files.add(p.file);
  }
  const foreign: string[] = [];
  for (const e of entriesOf(dir)) {
    if (files.has(e.name) && e.isFile()) continue;
    if (e.name === HF_FILES_DIR && hfFiles.size > 0 && e.isDirectory()) {
      for (const s of entriesOf(path.join(dir, HF_FILES_DIR))) {
        if (!(hfFiles.has(s.name) && s.isFile())) foreign.push(shownName(s, `${HF_FILES_DIR}/`));
      }
      continue;
    }
    foreign.push(shownName(e));
  }
  return foreign;
}

/** `remove it` or `remove them`. */
const removeThem = (n: number) => `remove ${n === 1 ? 'it' : 'them'} or pick another output`;

/**
 * Checks that a checkpoint may be written to iteration folder `iterDir`: it is absent or empty,
 * or `overwrite` is set and it is a megapatch checkpoint (a metadata.json megapatch can read, and
 * nothing besides the piece files and `huggingface/` side files it lists). A Megatron torch_dist
 * checkpoint uses the same `iter_` names; it is never replaced. What would stop an overwrite is
 * reported first, so that the message never suggests an overwrite that would be refused.
 */
export function checkCheckpointTarget(iterDir: string, overwrite: boolean | undefined): void {
  const st = lstatOrNull(iterDir);
  if (!st) return;
  if (st.isDirectory() && fs.readdirSync(iterDir).length === 0) return;
  if (!st.isDirectory()) {
    throw new ConvertError(
      'INVALID_ARGUMENT',
      `checkpoint path ${iterDir} is not a folder, so not a megapatch checkpoint; overwrite replaces only ` +
        `a megapatch checkpoint: ${removeThem(1)}`,
    );
  }
  let meta: CheckpointMetadata | null = null;
  let why = '';
  try {
    meta = readCheckpointMetadata(iterDir);
  } catch (e) {
    why = ` (${e instanceof ConvertError && e.code === 'MISSING_FILE' ? `no ${CHECKPOINT_METADATA_FILE}` : `${CHECKPOINT_METADATA_FILE} is not megapatch metadata`})`;
  }
  const foreign = foreignCheckpointEntries(iterDir, meta);
  if (foreign.length > 0) {
    throw new ConvertError(
      'INVALID_ARGUMENT',
      `checkpoint ${iterDir} holds ${listEntries(foreign)}, which megapatch did not write${why}; ` +
        `overwrite replaces only a megapatch checkpoint: ${removeThem(foreign.length)}`,
    );
  }
  if (!overwrite) {
    throw new ConvertError(
      'INVALID_ARGUMENT',
      `checkpoint ${iterDir} already exists (pass overwrite to replace it)`,
    );
  }
}

/** The marker of an exported folder, or null when it is absent or not one megapatch wrote. */
export function readHfExportMarker(dir: string): HfExportMarker | null {
  try {
    const r = HfExportMarker.safeParse(
      JSON.parse(fs.readFileSync(path.join(dir, HF_EXPORT_MARKER_FILE), 'utf8')),
    );
    return r.success ? r.data : null;
  } catch {
    return null;
  }
}

/**
 * Checks that a Hugging Face folder may be exported to `dir`: it is absent or empty, or
 * `overwrite` is set and it holds {@link HF_EXPORT_MARKER_FILE} and only the files that lists
 * (what would stop an overwrite is reported first, as for checkpoints).
 */
export function checkExportTarget(dir: string, overwrite: boolean | undefined): void {
  const st = lstatOrNull(dir);
  if (!st) return;
  if (!st.isDirectory()) {
    throw new ConvertError(
      'INVALID_ARGUMENT',
      `output ${dir} exists and is not a folder; remove it or pick another output`,
    );
  }
  if (fs.readdirSync(dir).length === 0) return;
  const marker = readHfExportMarker(dir);
  const ours = new Set(marker ? [HF_EXPORT_MARKER_FILE, ...marker.files] : []);
  const foreign = entriesOf(dir)
    .filter((e) => !(ours.has(e.name) && e.isFile()))
    .map((e) => shownName(e));
  if (foreign.length > 0) {
    const why = marker ? '' : ` (it has no ${HF_EXPORT_MARKER_FILE}, so megapatch did not export it)`;
    throw new ConvertError(
      'INVALID_ARGUMENT',
      `output folder ${dir} holds ${listEntries(foreign)}, which megapatch did not write${why}; ` +
        `overwrite replaces only a folder megapatch exported: ${removeThem(foreign.length)}`,
    );
  }
  if (!overwrite) {
    throw new ConvertError(
      'INVALID_ARGUMENT',
      `output folder ${dir} already exists (pass overwrite to replace it)`,
    );
  }
}
