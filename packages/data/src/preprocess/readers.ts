// Streaming readers for preprocessing inputs: JSONL, JSON arrays, parquet and plain text.
//
// Every reader yields records in file order, each tagged with its position so that bad input can
// be reported where the user can find it:
// - JSONL: the 1-based line number; blank lines are skipped silently (as Megatron's reader would
//   choke on them, but they carry no document, so counting them as bad would only add noise).
// - JSON array: the 1-based position of the element in the array.
// - parquet: the 1-based row number.
// - txt: one document per line, the 1-based line number; blank lines are skipped.
// Text inputs (JSONL, JSON, txt) are read as bytes: lines end at "\n" (a "\r" before it is dropped,
// so Windows files give the same records), a UTF-8 byte order mark at the start is skipped, and a
// record whose bytes are not valid UTF-8 is decoded with U+FFFD replacement and flagged
// `invalidUtf8`, so the caller can count it or, in strict mode, refuse it. A NUL byte in the first
// 64 KiB means the file is not text at all, which is reported before anything is read.
import { isUtf8 } from 'node:buffer';
import { closeSync, createReadStream, openSync, readFileSync, readSync, statSync } from 'node:fs';
import { extname } from 'node:path';
import { asyncBufferFromFile, parquetMetadataAsync, parquetReadObjects } from 'hyparquet';
import { DataError } from '../errors.js';

/** The input formats preprocessing reads. */
export type InputFormat = 'jsonl' | 'json' | 'parquet' | 'txt';

/** A record read from the input, with its 1-based line (JSONL/txt), element (JSON) or row (parquet) number. */
export interface InputRecord {
  lineNumber: number;
  record: unknown;
  /** Its bytes were not valid UTF-8 and were decoded with U+FFFD replacement. */
  invalidUtf8?: boolean;
}

/** An input record that could not be read, and why. */
export interface BadRecord {
  lineNumber: number;
  reason: string;
  /** Its bytes were not valid UTF-8 and were decoded with U+FFFD replacement. */
  invalidUtf8?: boolean;
  /** When the reason is a missing field: the fields the record does have, to suggest another key. */
  keys?: string[];
}

/** A document's text and its position in the input. */
export interface InputDocument {
  lineNumber: number;
  text: string;
  /** Its bytes were not valid UTF-8 and were decoded with U+FFFD replacement. */
  invalidUtf8?: boolean;
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

/**
 * Checks an input before it is read and returns its format (given, or guessed from the name):
 * it must be a regular file and, unless it is parquet, text rather than binary or UTF-16.
 */
export function checkInputFile(path: string, format?: InputFormat): InputFormat {
  assertInputFile(path);
  const f = format ?? detectInputFormat(path);
  if (f !== 'parquet') assertTextHead(path);
  return f;
}

/** How much of a text input is inspected up front (format sniffing, binary detection). */
const HEAD_BYTES = 65536;

function readHead(path: string): Buffer {
  const fd = openSync(path, 'r');
  const buf = Buffer.alloc(HEAD_BYTES);
  let n = 0;
  try {
    n = readSync(fd, buf, 0, buf.length, 0);
  } finally {
    closeSync(fd);
  }
  return buf.subarray(0, n);
}

function assertTextHead(path: string): void {
  const head = readHead(path);
  if ((head[0] === 0xff && head[1] === 0xfe) || (head[0] === 0xfe && head[1] === 0xff)) {
    throw new DataError(
      'INVALID_FORMAT',
      'is UTF-16 text; convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)',
      path,
    );
  }
  const nul = head.indexOf(0);
  if (nul >= 0) {
    throw new DataError(
      'INVALID_FORMAT',
      `looks like a binary file, not text (NUL byte at offset ${nul}); the input must be UTF-8 JSONL, JSON or text, or parquet`,
      path,
    );
  }
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
  // The first 64 KiB is enough to skip any realistic leading whitespace; \s covers a BOM too.
  const m = /\S/.exec(readHead(path).toString('utf8'));
  return m ? m[0] : undefined;
}

const BOM = Buffer.from([0xef, 0xbb, 0xbf]);

function stripBom(buf: Buffer): Buffer {
  return buf.subarray(0, 3).equals(BOM) ? buf.subarray(3) : buf;
}

/** The lines of a file as bytes, 1-based, split at "\n" with a trailing "\r" and a leading BOM removed. */
async function* readLines(path: string): AsyncGenerator<{ lineNumber: number; bytes: Buffer }> {
  let lineNumber = 0;
  // The start of the current line when it spans chunks; joined once its end is found.
  let parts: Buffer[] = [];
  const line = (bytes: Buffer): { lineNumber: number; bytes: Buffer } => {
    lineNumber++;
    if (lineNumber === 1) bytes = stripBom(bytes);
    const end = bytes.length > 0 && bytes[bytes.length - 1] === 0x0d ? bytes.length - 1 : bytes.length;
    return { lineNumber, bytes: bytes.subarray(0, end) };
  };
  for await (const chunk of createReadStream(path, { highWaterMark: 1 << 20 }) as AsyncIterable<Buffer>) {
    let start = 0;
    for (let nl = chunk.indexOf(0x0a); nl >= 0; nl = chunk.indexOf(0x0a, start)) {
      const piece = chunk.subarray(start, nl);
      yield line(parts.length > 0 ? Buffer.concat([...parts, piece]) : piece);
      parts = [];
      start = nl + 1;
    }
    if (start < chunk.length) parts.push(chunk.subarray(start));
  }
  if (parts.length > 0) yield line(Buffer.concat(parts));
}

function isJsonSpace(b: number): boolean {
  return b === 0x20 || b === 0x0a || b === 0x0d || b === 0x09;
}

/**
 * The byte ranges of the top-level elements of a JSON array, found by tracking strings and
 * nesting only (no parsing); used to tell which elements hold invalid UTF-8. Multi-byte UTF-8
 * sequences, valid or not, use bytes >= 0x80 and never look like JSON punctuation.
 */
function arrayElementSpans(buf: Buffer): [number, number][] {
  const spans: [number, number][] = [];
  let depth = 0;
  let inString = false;
  let escaped = false;
  let start = -1;
  for (let i = 0; i < buf.length; i++) {
    const b = buf[i];
    if (inString) {
      if (escaped) escaped = false;
      else if (b === 0x5c) escaped = true;
      else if (b === 0x22) inString = false;
      continue;
    }
    if (depth === 1 && start < 0 && b !== 0x2c && b !== 0x5d && !isJsonSpace(b)) start = i;
    if (b === 0x22) {
      inString = true;
    } else if (b === 0x5b || b === 0x7b) {
      depth++;
    } else if (b === 0x5d || b === 0x7d) {
      depth--;
      if (depth === 0 && start >= 0) spans.push([start, i]);
    } else if (depth === 1 && b === 0x2c) {
      if (start >= 0) spans.push([start, i]);
      start = -1;
    }
  }
  return spans;
}

function describe(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** Reads the records of a JSONL, JSON-array, parquet or txt file in order; txt lines become `{text}`. */
export async function* readRecords(
  path: string,
  opts: ReadRecordsOptions = {},
): AsyncGenerator<InputRecord | BadRecord> {
  const format = checkInputFile(path, opts.format);
  switch (format) {
    case 'jsonl':
    case 'txt': {
      // Streamed line by line, so inputs far larger than memory are fine.
      for await (const { lineNumber, bytes } of readLines(path)) {
        const invalid = !isUtf8(bytes);
        const line = bytes.toString('utf8');
        if (line.trim() === '') continue;
        const flag = invalid ? { invalidUtf8: true } : {};
        if (format === 'txt') {
          yield { lineNumber, record: { text: line }, ...flag };
          continue;
        }
        try {
          yield { lineNumber, record: JSON.parse(line) as unknown, ...flag };
        } catch (e) {
          yield { lineNumber, reason: `not valid JSON (${describe(e)})`, ...flag };
        }
      }
      return;
    }
    case 'json': {
      // A JSON array cannot be parsed incrementally without a streaming parser; such files are
      // small in practice (LLaMA-Factory demos), and JSONL is the format for large corpora.
      const buf = stripBom(readFileSync(path));
      // Element positions are only worked out for the rare file that is not valid UTF-8.
      const invalid = new Set<number>();
      if (!isUtf8(buf)) {
        arrayElementSpans(buf).forEach(([a, b], i) => {
          if (!isUtf8(buf.subarray(a, b))) invalid.add(i);
        });
      }
      let records: unknown;
      try {
        records = JSON.parse(buf.toString('utf8'));
      } catch (e) {
        throw new DataError('INVALID_FORMAT', `not valid JSON: ${describe(e)}`, path);
      }
      if (!Array.isArray(records))
        throw new DataError('INVALID_FORMAT', 'a .json input must hold an array', path);
      for (let i = 0; i < records.length; i++) {
        const flag = invalid.has(i) ? { invalidUtf8: true } : {};
        yield { lineNumber: i + 1, record: records[i] as unknown, ...flag };
      }
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
        // The first schema element is the root, not a column.
        const names = metadata.schema.slice(1).map((s) => s.name);
        for (const c of opts.columns) {
          if (!names.includes(c)) {
            const have = names.map((n) => `"${n}"`).join(', ');
            throw new DataError(
              'INVALID_FORMAT',
              `parquet file has no column "${c}" (its columns: ${have})`,
              path,
            );
          }
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
  const format = checkInputFile(path, opts.format);
  const key = format === 'txt' ? 'text' : jsonKey;
  const columns = format === 'parquet' ? [key] : undefined;
  for await (const r of readRecords(path, { format, columns })) {
    if ('reason' in r) {
      yield r;
      continue;
    }
    const flag = r.invalidUtf8 ? { invalidUtf8: true } : {};
    const rec = r.record;
    if (typeof rec !== 'object' || rec === null || Array.isArray(rec)) {
      yield { lineNumber: r.lineNumber, reason: 'record is not a JSON object', ...flag };
      continue;
    }
    const text = (rec as Record<string, unknown>)[key];
    if (text === undefined || text === null) {
      yield { lineNumber: r.lineNumber, reason: `no "${key}" field`, keys: Object.keys(rec), ...flag };
    } else if (typeof text !== 'string') {
      yield { lineNumber: r.lineNumber, reason: `field "${key}" is a ${typeof text}, not a string`, ...flag };
    } else {
      yield { lineNumber: r.lineNumber, text, ...flag };
    }
  }
}
