// JSON-lines input and output of the evaluation commands: a file's lines read in chunks, one
// record per line (a one-line error naming the line otherwise), and a writer that publishes its
// file only when complete.
import * as fs from 'node:fs';
import { CliError } from '../errors.js';

/** The lines of a file, read in chunks, with their 1-based numbers (blank lines skipped). */
export function* fileLines(file: string): Generator<{ line: number; text: string }> {
  const fd = fs.openSync(file, 'r');
  try {
    const chunk = Buffer.alloc(1 << 20);
    const decoder = new TextDecoder();
    let rest = '';
    let line = 0;
    for (;;) {
      const n = fs.readSync(fd, chunk, 0, chunk.length, null);
      rest += n > 0 ? decoder.decode(chunk.subarray(0, n), { stream: true }) : decoder.decode();
      const parts = rest.split('\n');
      rest = n > 0 ? (parts.pop() as string) : '';
      for (const text of parts) {
        line++;
        if (text.trim() !== '') yield { line, text };
      }
      if (n === 0) return;
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** One JSONL record as an object; anything else is a one-line error naming the line. */
export function parseRecord(file: string, line: number, text: string): Record<string, unknown> {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (e) {
    throw new CliError('INVALID_INPUT', `${file} line ${line}: not valid JSON (${(e as Error).message})`);
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) {
    throw new CliError('INVALID_INPUT', `${file} line ${line}: expected a JSON object`);
  }
  return v as Record<string, unknown>;
}

/** Writes JSON lines to `<file>.tmp-<pid>`, renamed to `file` when complete. */
export class LineWriter {
  private readonly tmp: string;
  private fd: number | undefined;

  constructor(private readonly file: string) {
    this.tmp = `${file}.tmp-${process.pid}`;
    this.fd = fs.openSync(this.tmp, 'w');
  }

  write(line: string): void {
    fs.writeSync(this.fd as number, `${line}\n`);
  }

  commit(): void {
    fs.fsyncSync(this.fd as number);
    fs.closeSync(this.fd as number);
    this.fd = undefined;
    fs.renameSync(this.tmp, this.file);
  }

  /** Writes `lines` to `file` as one JSON-lines file, published only when complete. */
  static writeAll(file: string, lines: readonly string[]): void {
    const w = new LineWriter(file);
    try {
      for (const l of lines) w.write(l);
      w.commit();
    } catch (e) {
      w.abort();
      throw e;
    }
  }

  abort(): void {
    if (this.fd !== undefined) fs.closeSync(this.fd);
    this.fd = undefined;
    fs.rmSync(this.tmp, { force: true });
  }
}
