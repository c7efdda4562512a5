// `megapatch report <run-dir>`: the run report of a training run — a self-contained HTML page with
// the loss, lr, grad norm, throughput, memory and MoE expert load charts, and a PNG of each — from
// the run's metrics.jsonl (see @megapatch/train). The trainer writes the same report when a run ends.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { z } from 'zod';
import { type Command, withDefaults } from '../command.js';
import { CliError, UsageError } from '../errors.js';
import { type Io, memoryIo } from '../io.js';
import { parseOptions } from '../options.js';
import { type FlagPath, withOutput } from '../outputs.js';

const NAME = 'report';

const schema = z.object({
  out: z.string().min(1, 'must not be empty').optional(),
  json: z.boolean(),
});

/** What `megapatch report --json` prints. */
export interface ReportSummary {
  runDir: string;
  /** The page, `<out>/index.html`. */
  html: string;
  /** One PNG per chart. */
  pngs: string[];
  trainLines: number;
  validLines: number;
  /** Lines of metrics.jsonl that were skipped (an incomplete last line, unknown kinds). */
  warnings: string[];
}

/** Runs `megapatch report`: writes the report of `runDir` into `opts.out` (default `<runDir>/report`). */
export async function runReport(
  runDir: string,
  opts: { out?: string; json?: boolean } = {},
  io: Io = memoryIo(),
): Promise<ReportSummary> {
  // before any lock is taken: claiming `<run-dir>/report` would create a missing run folder
  if (!fs.existsSync(runDir)) {
    throw new UsageError(
      `${runDir}: no such run folder; give the folder a training run writes metrics.jsonl to`,
      NAME,
    );
  }
  if (!fs.statSync(runDir).isDirectory()) {
    throw new UsageError(`${runDir} is not a folder; give the run folder that holds metrics.jsonl`, NAME);
  }
  const train = await import('@megapatch/train');
  const out = opts.out ?? path.join(runDir, train.REPORT_DIR);
  const inputs: FlagPath[] = [train.RUN_METRICS_FILE, train.RUN_CONFIG_FILE]
    .map((f) => path.join(runDir, f))
    .filter((f) => fs.existsSync(f))
    .map((f) => ({ flag: '<run-dir>', path: f }));
  const report = await withOutput(
    io,
    NAME,
    { target: out, outputs: [{ flag: opts.out === undefined ? 'the report' : '--out', path: out }], inputs },
    async (signal) => {
      try {
        return await train.writeRunReport(runDir, { outDir: out, signal });
      } catch (e) {
        if (e instanceof train.ReportError) throw new CliError(e.code, e.message);
        throw e;
      }
    },
  );
  const summary: ReportSummary = {
    runDir,
    html: report.html,
    pngs: report.pngs,
    trainLines: report.trainLines,
    validLines: report.validLines,
    warnings: report.warnings,
  };
  for (const w of report.warnings) io.warn(w);
  if (opts.json) io.out.log(JSON.stringify(summary, null, 2));
  else {
    io.out.log(
      `read ${report.trainLines} training and ${report.validLines} validation lines of ${path.join(runDir, train.RUN_METRICS_FILE)}`,
    );
    io.out.log(`wrote ${report.html} (${report.pngs.length} charts)`);
    for (const png of report.pngs) io.out.log(`wrote ${png}`);
  }
  return summary;
}

export const reportCommand: Command = {
  name: NAME,
  summary: 'HTML page and PNG charts of a run: loss, lr, grad norm, throughput, memory, MoE expert load',
  description:
    "Reads a run folder's metrics.jsonl (and config.json, when there is one) and writes <run-dir>/report/" +
    'index.html, a self-contained page (Vega and the data inline: it opens offline) with the training and ' +
    'validation loss, learning rate, gradient norm, throughput, iteration time, memory, MoE losses and ' +
    'per-layer expert load, and a PNG of each chart beside it for places that show no HTML. Run it while ' +
    'a run goes on, or after. An incomplete last line (a run killed mid-write) is skipped with a warning; ' +
    'any other bad line is an error naming it.',
  positionals: [{ name: 'run-dir', description: 'the run folder holding metrics.jsonl', required: true }],
  options: {
    out: {
      type: 'string',
      value: 'DIR',
      description: 'write the report here instead of <run-dir>/report',
    },
    json: {
      type: 'boolean',
      description:
        'print one {"runDir", "html", "pngs", "trainLines", "validLines", "warnings"} listing the files written',
    },
  },
  examples: ['report runs/qwen3-moe', 'report runs/qwen3-moe --out /srv/www/qwen3-moe --json'],
  run: async ({ options, positionals, io }) => {
    await runReport(positionals[0], parseOptions(schema, withDefaults(reportCommand, options), NAME), io);
  },
};

export default reportCommand;
