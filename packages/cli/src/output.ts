// What every command shares: where it writes, and how zod errors become CLI messages.
import type { z } from 'zod';

/** Where the command writes: lines of text, and whether stdout is a terminal. */
export interface Output {
  log: (line: string) => void;
  isTTY: boolean;
}

/** stdout, with its terminal flag. */
export const defaultOutput = (): Output => ({
  log: (line) => process.stdout.write(`${line}\n`),
  isTTY: process.stdout.isTTY === true,
});

/** Parses options with `schema`, or throws one error listing every bad `--flag` of `command`. */
export function parseOrThrow<S extends z.ZodType>(schema: S, raw: unknown, command: string): z.output<S> {
  const parsed = schema.safeParse(raw);
  if (parsed.success) return parsed.data;
  const issues = parsed.error.issues.map(
    (i) => `  --${String(i.path[0]).replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}: ${i.message}`,
  );
  throw new Error(`${command}: invalid options\n${issues.join('\n')}`);
}
