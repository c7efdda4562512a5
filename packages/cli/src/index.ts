// The megapatch command line: a thin layer that parses arguments strictly, validates them and calls
// the libraries. Subcommands load lazily so that `megapatch info` never pays for training code.
// This file owns the process: exit codes, one-line errors, SIGINT/SIGTERM and a closed stdout.
import { type Command, type CommandGroup, isGroup, parseCommandArgs } from './command.js';
import {
  CliError,
  describeErrno,
  describeError,
  EXIT,
  exitCodeOf,
  exitCodeOfError,
  Interrupted,
  type StopReason,
  UsageError,
} from './errors.js';
import { commandHelp, groupHelp } from './help.js';
import { type Io, ProcessIo } from './io.js';
import { claimedOutputs } from './outputs.js';
import { extractPlugins, loadPlugins } from './plugins.js';
import { closest } from './suggest.js';
import { readVersion } from './version.js';

export type { Command, CommandGroup, OptionSpec, RunContext } from './command.js';
export { EXIT } from './errors.js';
export type { Io, Output } from './io.js';

/** The command tree. */
export const commands: CommandGroup = {
  name: '',
  summary: 'LLM training in TypeScript, Megatron style',
  commands: {
    info: {
      summary: 'package versions, the native backend in use and CUDA availability',
      load: () => import('./commands/info.js').then((m) => m.default),
    },
    model: {
      summary: 'inspect Hugging Face model configs',
      load: () => import('./commands/model.js').then((m) => m.default),
    },
    preprocess: {
      summary: 'tokenise corpora into Megatron indexed datasets',
      load: () => import('./commands/preprocess.js').then((m) => m.default),
    },
    data: {
      summary: 'inspect training data',
      load: () => import('./commands/data.js').then((m) => m.default),
    },
    convert: {
      summary: 'convert checkpoints between Hugging Face and megapatch layouts',
      load: () => import('./commands/convert.js').then((m) => m.default),
    },
    ckpt: {
      summary: 'inspect megapatch checkpoints',
      load: () => import('./commands/ckpt.js').then((m) => m.default),
    },
    generate: {
      summary: 'continue prompts with a model and its tokenizer (greedy or sampled, KV cache)',
      load: () => import('./commands/generate.js').then((m) => m.default),
    },
    eval: {
      summary: 'mean loss and perplexity of a model on held-out data, with per-token log-probabilities',
      load: () => import('./commands/eval.js').then((m) => m.default),
    },
    train: {
      summary: 'pre-train or fine-tune a model from a run config (Megatron semantics)',
      load: () => import('./commands/train.js').then((m) => m.default),
    },
    launch: {
      summary: 'start the workers of a distributed job on this node (torchrun for megapatch)',
      load: () => import('./commands/launch.js').then((m) => m.default),
    },
    report: {
      summary: 'HTML page and PNG charts of a run: loss, lr, grad norm, throughput, memory, MoE expert load',
      load: () => import('./commands/report.js').then((m) => m.default),
    },
  },
};

/** Seconds a writing command has to stop by itself after SIGINT/SIGTERM before it is cut short. */
const STOP_GRACE_MS = 10_000;

/**
 * @internal MEGAPATCH_STOP_GRACE_S in ms (undefined when unset); a value that is not a positive
 * number of seconds is a usage error, reported before the command runs.
 */
export function stopGraceFromEnv(): number | undefined {
  const env = process.env.MEGAPATCH_STOP_GRACE_S;
  if (env === undefined || env === '') return undefined;
  const s = Number(env);
  if (!(Number.isFinite(s) && s > 0)) {
    throw new UsageError(
      `MEGAPATCH_STOP_GRACE_S=${env} must be a positive number of seconds (how long a command may take to stop after SIGINT/SIGTERM)`,
    );
  }
  return s * 1000;
}

/**
 * @internal The grace after a first signal: MEGAPATCH_STOP_GRACE_S when set, else the command's
 * own (null: no limit), else {@link STOP_GRACE_MS}.
 */
export function stopGraceOf(command: number | null | undefined, env = stopGraceFromEnv()): number | null {
  if (env !== undefined) return env;
  return command === undefined ? STOP_GRACE_MS : command;
}

/** The command being run, for messages (`megapatch convert reshard`) and its grace after a signal. */
interface Current {
  name: string;
  stopGraceMs?: number | null;
}

/** Follows `words` down the tree; returns the node reached and the words left over. */
async function resolve(
  words: readonly string[],
  current: Current = { name: 'megapatch' },
): Promise<{ node: Command | CommandGroup; rest: string[] }> {
  let node: Command | CommandGroup = commands;
  let i = 0;
  while (isGroup(node) && i < words.length && !words[i].startsWith('-')) {
    const group: CommandGroup = node;
    const entry = Object.hasOwn(group.commands, words[i]) ? group.commands[words[i]] : undefined;
    if (!entry) {
      const near = closest(words[i], Object.keys(group.commands));
      const where = group.name ? `${group.name} ` : '';
      const hint = near
        ? ` (did you mean '${where}${near}'?)`
        : `; run 'megapatch help${group.name ? ` ${group.name}` : ''}'`;
      throw new UsageError(`unknown command '${where}${words[i]}'${hint}`, group.name || undefined);
    }
    node = await entry.load();
    current.name = `megapatch ${node.name}`;
    if (!isGroup(node)) current.stopGraceMs = node.stopGraceMs;
    i++;
  }
  return { node, rest: words.slice(i) };
}

/** `megapatch help [words]`: the help of whatever the words name. */
async function help(io: Io, words: readonly string[]): Promise<void> {
  const { node, rest } = await resolve(words);
  if (rest.length > 0)
    throw new UsageError(`help takes command names only, got ${JSON.stringify(rest[0])}`, 'help');
  io.out.log(
    isGroup(node)
      ? groupHelp(node, io.color, node === commands ? readVersion() : undefined)
      : commandHelp(node, io.color),
  );
}

/** Runs the words of a command line (without node and the script); returns the exit code. */
async function dispatch(argv: readonly string[], io: Io, current: Current): Promise<number> {
  const first = argv[0];
  if (first === undefined || first === '--help' || first === '-h') {
    io.out.log(groupHelp(commands, io.color, readVersion()));
    return EXIT.ok;
  }
  if (first === '--version' || first === '-v' || first === 'version') {
    io.out.log(readVersion());
    return EXIT.ok;
  }
  if (first === 'help') {
    await help(io, argv.slice(1));
    return EXIT.ok;
  }
  const { node, rest } = await resolve(argv, current);
  if (isGroup(node)) {
    if (rest.includes('--help') || rest.includes('-h')) {
      io.out.log(groupHelp(node, io.color));
      return EXIT.ok;
    }
    const names = Object.keys(node.commands).join(', ');
    const word = rest[0];
    throw new UsageError(
      word === undefined
        ? `missing command: one of ${names}`
        : `unknown option ${word}: give a command first (${names})`,
      node.name,
    );
  }
  // A passthrough command gets the words after `--` untouched; others parse them as positionals.
  const dashes = node.passthrough ? rest.indexOf('--') : -1;
  const words = dashes < 0 ? rest : rest.slice(0, dashes);
  const parsed = parseCommandArgs(node, words);
  if (parsed.help) {
    io.out.log(commandHelp(node, io.color));
    return EXIT.ok;
  }
  const code = await node.run({
    options: parsed.options,
    positionals: parsed.positionals,
    io,
    rest: dashes < 0 ? null : rest.slice(dashes + 1),
    overrides: parsed.overrides,
  });
  return typeof code === 'number' ? code : EXIT.ok;
}

/**
 * Runs the megapatch command line and returns its exit code: 0 done, 1 failed, 2 bad command line,
 * 130 / 143 interrupted by SIGINT / SIGTERM, 141 stdout closed by its reader. Errors are printed as
 * one line on stderr (with the stack trace under --debug or MEGAPATCH_DEBUG=1).
 */
export async function main(argv: string[], io: ProcessIo = new ProcessIo()): Promise<number> {
  // --debug is ours only before a `--`: what follows belongs to a launched command
  const dashes = argv.indexOf('--');
  const own = dashes < 0 ? argv : argv.slice(0, dashes);
  const debug = own.includes('--debug') || process.env.MEGAPATCH_DEBUG === '1';
  const current: Current = { name: 'megapatch' };
  // MEGAPATCH_STOP_GRACE_S, read (and checked) before the command runs
  let envGrace: number | undefined;
  const stop = (reason: StopReason) => {
    if (reason === 'EPIPE') io.closeStdout();
    const first = io.stop(new Interrupted(reason));
    // Nothing being written: there is nothing to wait for. A second signal: stop now.
    if (!io.writing || !first) hardStop(reason);
    else {
      const grace = stopGraceOf(current.stopGraceMs, envGrace);
      if (grace !== null) setTimeout(() => hardStop(reason), grace).unref();
    }
  };
  const hardStop = (reason: StopReason) => {
    io.runCleanups();
    if (reason !== 'EPIPE') io.error(`${current.name}: interrupted by ${reason}`);
    process.exit(exitCodeOf(reason));
  };
  const onSigint = () => stop('SIGINT');
  const onSigterm = () => stop('SIGTERM');
  let stdoutFailure: CliError | undefined;
  const onStdoutError = (e: NodeJS.ErrnoException) => {
    if (e.code === 'EPIPE') return stop('EPIPE');
    // Any other failure to write results (a full disk under a redirect) ends the run as failed.
    io.closeStdout();
    stdoutFailure ??= new CliError(
      'STDOUT',
      describeErrno(e, 'stdout') ?? `cannot write to stdout: ${e.message}`,
    );
    io.stop(stdoutFailure);
  };
  process.on('SIGINT', onSigint);
  process.on('SIGTERM', onSigterm);
  process.stdout.on('error', onStdoutError);
  try {
    envGrace = stopGraceFromEnv();
    // --debug and --plugin are global: accepted before the command as well as after it.
    const { argv: words, plugins } = extractPlugins([
      ...own.filter((w) => w !== '--debug'),
      ...(dashes < 0 ? [] : argv.slice(dashes)),
    ]);
    await loadPlugins(plugins);
    const code = await dispatch(words, io, current);
    // Let a failed write of the last lines report itself before declaring success.
    await new Promise<void>((r) => setImmediate(r));
    if (stdoutFailure) throw stdoutFailure;
    return code;
  } catch (thrown) {
    const stopped = io.signal.aborted ? (io.signal.reason as Interrupted) : undefined;
    if (stopped instanceof Interrupted) {
      io.runCleanups();
      if (stopped.reason !== 'EPIPE')
        io.error(`${current.name}: interrupted by ${stopped.reason}; its temporary files were removed`);
      if (debug && !(thrown instanceof Interrupted)) io.error(stackOf(thrown));
      return exitCodeOf(stopped.reason);
    }
    io.runCleanups();
    const e = stdoutFailure ?? thrown;
    const where =
      e instanceof UsageError ? (e.command ? `megapatch ${e.command}` : 'megapatch') : current.name;
    io.error(`${where}: ${describeError(e, claimedOutputs()[0])}`);
    if (debug) io.error(stackOf(e));
    return exitCodeOfError(e);
  } finally {
    process.off('SIGINT', onSigint);
    process.off('SIGTERM', onSigterm);
    process.stdout.off('error', onStdoutError);
  }
}

/** The stack trace of an error and of its causes. */
function stackOf(e: unknown): string {
  const parts: string[] = [];
  for (let x: unknown = e, depth = 0; x !== undefined && depth < 5; depth++) {
    parts.push(x instanceof Error ? (x.stack ?? String(x)) : String(x));
    x = x instanceof Error ? x.cause : undefined;
    if (x !== undefined) parts.push('caused by:');
  }
  return parts.join('\n');
}
