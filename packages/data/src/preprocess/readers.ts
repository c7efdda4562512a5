// Streaming readers for preprocessing inputs: JSONL, JSON arrays, parquet and plain text.
//
// Every reader yields records in file order, each tagged with its position so that bad input can
// be reported where the user can find it:
// - JSONL: the 1-based line number; blank lines are skipped silently (as Megatron's reader would
//   choke on them, but they carry no document, so counting them as bad would only add noise).
// - JSON array: the 1-based position of the element in the array.
// - parquet: the 1-based row number.
// - txt: one document per line, the 1-based line number; blank lines are skipped and a trailing
//   "\r" is dropped, so Windows files give the same documents.
import { closeSync, createReadStream, openSync, readFileSync, readSync, statSync } from 'node:fs';
import { extname } from 'node:path';
import { createInterface } from 'node:readline';
import { asyncBufferFromFile, parquetMetadataAsync, parquetReadObjects } from 'hyparquet';
import { DataError } from '../errors.js';

/** The input formats preprocessing reads. */
export type InputFormat = 'jsonl' | 'json' | 'parquet' | 'txt';

/** A record read from the input, with its 1-based line (JSONL/txt), element (JSON) or row (parquet) number. */
export interface InputRecord {
  lineNumber: number;
  record: unknown;
}

/** An input record that could not be read, and why. */
export interface BadRecord {
  lineNumber: number;
  reason: string;
}

/** A document's text and its position in the input. */
export interface InputDocument {
  lineNumber: number;
  text: string;
}

/** Options of readRecords. */
export interface ReadRecordsOptions {
  /** Force a format instead of guessing it from the extension (and, for .json, the first byte). */
  format?: InputFormat;
  /** Parquet only: read just these columns (all when absent). */
  columns?: string[];
}

/** Fails with MISSING_FILE unless `path` is a readable regular file. */
export function assertInputFile(path: string): void {
  let isFile = false;
  try {
    isFile = statSync(path).isFile();
  } catch {
    throw new DataError('MISSING_FILE', 'input file does not exist', path);
  }
  if (!isFile) throw new DataError('MISSING_FILE', 'input is not a regular file', path);
}

/** Guesses the format of an input file from its extension; `.json` files that are JSONL are detected by content. */
export function detectInputFormat(path: string): InputFormat {
  const ext = extname(path).toLowerCase();
  if (ext === '.parquet' || ext === '.pq') return 'parquet';
  if (ext === '.txt' || ext === '.text') return 'txt';
  if (ext === '.jsonl' || ext === '.ndjson') return 'jsonl';
  if (ext === '.json') {
    // Many ".json" corpora are really JSON lines; an array is the only JSON that starts with '['.
    return firstNonSpaceChar(path) === '[' ? 'json' : 'jsonl';
  }
  throw new DataError(
    'UNSUPPORTED',
    `cannot tell the input format from the extension "${ext}" (expected .jsonl, .json, .parquet or .txt)`,
    path,
  );
}

function firstNonSpaceChar(path: string): string | undefined {
  // The first 64 KiB is enough to skip any realistic leading whitespace.
  const fd = openSync(path, 'r');
  const buf = Buffer.alloc(65536);
  let n = 0;
  try {
    n = readSync(fd, buf, 0, buf.length, 0);
  } finally {
    closeSync(fd);
  }
  const head = buf.subarray(0, n).toString('utf8');
  const m = /\S/.exec(head);
  return m ? m[0] : undefined;
}

function describe(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** Reads the records of a JSONL, JSON-array, parquet or txt file in order; txt lines become `{text}`. */
export async function* readRecords(
  path: string,
  opts: ReadRecordsOptions = {},
): AsyncGenerator<InputRecord | BadRecord> {
  assertInputFile(path);
  const format = opts.format ?? detectInputFormat(path);
  switch (format) {
    case 'jsonl':
    case 'txt': {
      // readline streams the file, so inputs far larger than memory are fine.
      const rl = createInterface({
        input: createReadStream(path, 'utf8'),
        crlfDelay: Number.POSITIVE_INFINITY,
      });
      let lineNumber = 0;
      for await (const line of rl) {
        lineNumber++;
        if (line.trim() === '') continue;
        if (format === 'txt') {
          yield { lineNumber, record: { text: line } };
          continue;
        }
        try {
          yield { lineNumber, record: JSON.parse(line) as unknown };
        } catch (e) {
          yield { lineNumber, reason: `not valid JSON (${describe(e)})` };
        }
      }
      return;
    }
    case 'json': {
      // A JSON array cannot be parsed incrementally without a streaming parser; such files are
      // small in practice (LLaMA-Factory demos), and JSONL is the format for large corpora.
      let records: unknown;
      try {
        records = JSON.parse(readFileSync(path, 'utf8'));
      } catch (e) {
        throw new DataError('INVALID_FORMAT', `not valid JSON: ${describe(e)}`, path);
      }
      if (!Array.isArray(records))
        throw new DataError('INVALID_FORMAT', 'a .json input must hold an array', path);
      for (let i = 0; i < records.length; i++) yield { lineNumber: i + 1, record: records[i] as unknown };
      return;
    }
    case 'parquet': {
      let file: Awaited<ReturnType<typeof asyncBufferFromFile>>;
      let metadata: Awaited<ReturnType<typeof parquetMetadataAsync>>;
      try {
        file = await asyncBufferFromFile(path);
        metadata = await parquetMetadataAsync(file);
      } catch (e) {
        throw new DataError('INVALID_FORMAT', `not a parquet file: ${describe(e)}`, path);
      }
      if (opts.columns) {
        const names = new Set(metadata.schema.map((s) => s.name));
        for (const c of opts.columns) {
          if (!names.has(c)) throw new DataError('INVALID_FORMAT', `parquet file has no column "${c}"`, path);
        }
      }
      // One row group at a time keeps memory bounded by the largest row group.
      let rowStart = 0;
      for (const group of metadata.row_groups) {
        const rowEnd = rowStart + Number(group.num_rows);
        const rows = await parquetReadObjects({ file, metadata, columns: opts.columns, rowStart, rowEnd });
        for (let i = 0; i < rows.length; i++)
          yield { lineNumber: rowStart + i + 1, record: rows[i] as unknown };
        rowStart = rowEnd;
      }
      return;
    }
  }
}

/** Reads the documents of an input: the string field `jsonKey` of each record (txt lines are the text). */
export async function* readDocuments(
  path: string,
  jsonKey: string,
  opts: Omit<ReadRecordsOptions, 'columns'> = {},
): AsyncGenerator<InputDocument | BadRecord> {
  const format = opts.format ?? detectInputFormatChecked(path);
  const key = format === 'txt' ? 'text' : jsonKey;
  const columns = format === 'parquet' ? [key] : undefined;
  for await (const r of readRecords(path, { format, columns })) {
    if ('reason' in r) {
      yield r;
      continue;
    }
    const rec = r.record;
    if (typeof rec !== 'object' || rec === null || Array.isArray(rec)) {
      yield { lineNumber: r.lineNumber, reason: 'record is not a JSON object' };
      continue;
    }
    const text = (rec as Record<string, unknown>)[key];
    if (text === undefined || text === null) {
      yield { lineNumber: r.lineNumber, reason: `no "${key}" field` };
    } else if (typeof text !== 'string') {
      yield { lineNumber: r.lineNumber, reason: `field "${key}" is a ${typeof text}, not a string` };
    } else {
      yield { lineNumber: r.lineNumber, text };
    }
  }
}

function detectInputFormatChecked(path: string): InputFormat {
  assertInputFile(path);
  return detectInputFormat(path);
}
