// Safety checks on the files preprocessing is about to write, made before anything is created.
//
// An existing output is never replaced by accident: without `overwrite` any existing output is
// refused; with it, only files that preprocessing itself writes are replaced (an `.idx` with
// Megatron's MMIDIDX magic, the `.bin` beside such an `.idx`, a megapatch-sft sidecar), so a
// mistyped prefix cannot destroy unrelated data. An output may also never be the input file or
// sit inside the tokenizer folder. The replacement itself stays atomic: the builders write
// `.tmp-<pid>` files and rename them over the old ones only once complete.
import { closeSync, existsSync, openSync, readFileSync, readSync, realpathSync, statSync } from 'node:fs';
import { basename, dirname, join, resolve, sep } from 'node:path';
import { DataError } from '../errors.js';
import { SFT_FORMAT } from './sft.js';

/** What an output file is, which decides how an existing one is recognised as ours. */
export type OutputKind = 'idx' | 'bin' | 'sidecar';

/** A file preprocessing is about to write. */
export interface PlannedOutput {
  path: string;
  kind: OutputKind;
}

/** The inputs an output must stay clear of, and whether existing outputs may be replaced. */
export interface OutputGuard {
  input: string;
  tokenizerDir: string;
  overwrite: boolean;
}

/** Megatron's index magic, `MMIDIDX\0\0`. */
const INDEX_MAGIC = Buffer.from('MMIDIDX\0\0', 'latin1');
const FIX = 'move it away or choose another --output-prefix';

/** The path with every symlink of its longest existing ancestor resolved, so aliases compare equal. */
function physicalPath(path: string): string {
  let head = resolve(path);
  const tail: string[] = [];
  while (!existsSync(head)) {
    const parent = dirname(head);
    if (parent === head) break;
    tail.unshift(basename(head));
    head = parent;
  }
  return join(existsSync(head) ? realpathSync(head) : head, ...tail);
}

function sameFile(a: string, b: string): boolean {
  if (!existsSync(a) || !existsSync(b)) return false;
  const sa = statSync(a);
  const sb = statSync(b);
  return sa.dev === sb.dev && sa.ino === sb.ino;
}

function hasIndexMagic(path: string): boolean {
  const fd = openSync(path, 'r');
  try {
    const head = Buffer.alloc(INDEX_MAGIC.length);
    return readSync(fd, head, 0, head.length, 0) === head.length && head.equals(INDEX_MAGIC);
  } finally {
    closeSync(fd);
  }
}

function isSftSidecar(path: string): boolean {
  try {
    const meta = JSON.parse(readFileSync(path, 'utf8')) as { format?: unknown };
    return meta.format === SFT_FORMAT.name;
  } catch {
    return false;
  }
}

/** Why an existing output may not be replaced, or undefined when it is a file preprocessing wrote. */
function foreignReason(out: PlannedOutput): string | undefined {
  if (!statSync(out.path).isFile()) return 'is not a regular file';
  switch (out.kind) {
    case 'idx':
      return hasIndexMagic(out.path) ? undefined : 'is not a Megatron index (no MMIDIDX magic)';
    case 'bin': {
      const idx = `${out.path.slice(0, -'.bin'.length)}.idx`;
      return existsSync(idx) && statSync(idx).isFile() && hasIndexMagic(idx)
        ? undefined
        : 'has no Megatron .idx beside it, so preprocessing did not write it';
    }
    case 'sidecar':
      return isSftSidecar(out.path) ? undefined : `is not a ${SFT_FORMAT.name} sidecar`;
  }
}

/**
 * Refuses, before anything is written, an output that is the input file, lies inside the
 * tokenizer folder, or already exists (unless `overwrite` and it is a file preprocessing wrote).
 */
export function checkOutputs(outputs: readonly PlannedOutput[], guard: OutputGuard): void {
  const tokenizerDir = physicalPath(guard.tokenizerDir);
  const input = physicalPath(guard.input);
  for (const out of outputs) {
    const where = physicalPath(out.path);
    if (where === input || sameFile(out.path, guard.input)) {
      throw new DataError(
        'INVALID_ARGUMENT',
        `${out.path} is the input file; choose another --output-prefix`,
      );
    }
    if (where.startsWith(tokenizerDir + sep)) {
      throw new DataError(
        'INVALID_ARGUMENT',
        `${out.path} is inside the tokenizer folder ${guard.tokenizerDir}; choose an --output-prefix outside it`,
      );
    }
  }
  for (const out of outputs) {
    if (!existsSync(out.path)) continue;
    if (!guard.overwrite) {
      throw new DataError('OUTPUT_EXISTS', `${out.path} already exists; pass --overwrite to replace it`);
    }
    const reason = foreignReason(out);
    if (reason !== undefined) {
      throw new DataError('OUTPUT_EXISTS', `${out.path} ${reason}; refusing to replace it: ${FIX}`);
    }
  }
}
