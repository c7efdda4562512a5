// `megapatch launch`: torchrun for megapatch. Starts --nproc-per-node workers of the command after
// `--` on this node with torchrun's variables, passes their output on as `[rank<R>]: ` lines,
// forwards SIGINT/SIGTERM, and exits with the first failed worker's code.
import { z } from 'zod';
import type { Command, PositionalSpec } from '../command.js';
import { CliError, EXIT, exitCodeOf, Interrupted, UsageError } from '../errors.js';
import { int, MAX_PARALLEL, parseOptions } from '../options.js';

const NAME = 'launch';

const options = {
  'nproc-per-node': {
    type: 'string',
    value: 'N',
    description: 'workers to start on this node',
    required: true,
    aliases: ['nproc_per_node'],
  },
  nnodes: {
    type: 'string',
    value: 'M',
    description: 'nodes in the job; start megapatch launch on each with its own --node-rank',
    default: '1',
  },
  'node-rank': {
    type: 'string',
    value: 'R',
    description: "this node's index, 0 to M-1",
    default: '0',
    aliases: ['node_rank'],
  },
  'master-addr': {
    type: 'string',
    value: 'HOST',
    description: 'host of node 0 that every node can reach (required with --nnodes > 1; default 127.0.0.1)',
    aliases: ['master_addr'],
  },
  'master-port': {
    type: 'string',
    value: 'PORT',
    description:
      'port of the rendezvous store there (default: a free local port on one node, 29500 on several)',
    aliases: ['master_port'],
  },
  standalone: {
    type: 'boolean',
    description: "one node on a free local port (torchrun's --standalone)",
  },
  'no-prefix': {
    type: 'boolean',
    description: 'pass worker lines on without the [rank<R>]: prefix',
  },
  'kill-grace-s': {
    type: 'string',
    value: 'S',
    description:
      'seconds workers get to exit after SIGTERM (or a first Ctrl-C) before SIGKILL; a training run whose checkpoint takes longer to write needs more',
    default: '10',
  },
} as const;

const Seconds = z
  .string()
  .trim()
  .regex(/^\d+(\.\d+)?$/, 'must be a number of seconds')
  .transform(Number)
  .pipe(z.number().max(3600, 'must be <= 3600'));

const schema = z.object({
  nprocPerNode: int(1, MAX_PARALLEL),
  nnodes: int(1, MAX_PARALLEL),
  nodeRank: int(0, MAX_PARALLEL - 1),
  masterAddr: z.string().trim().min(1, 'must not be empty').optional(),
  masterPort: int(1, 65535).optional(),
  standalone: z.boolean(),
  noPrefix: z.boolean(),
  killGraceS: Seconds,
});

const WORKER: PositionalSpec = {
  name: 'command ...',
  description: 'the program every worker runs, with its arguments, after --',
};

const USAGE = 'megapatch launch --nproc-per-node N [options] -- <command ...>';

/** The worker command: the words after `--`, untouched (a worker's own --debug or --help included). */
function workerCommand(positionals: readonly string[], rest: readonly string[] | null): string[] {
  if (rest === null) {
    throw new UsageError(
      positionals.length > 0
        ? `missing -- before the worker command ${JSON.stringify(positionals.join(' '))}; write ${USAGE}`
        : `missing the worker command; write ${USAGE}`,
      NAME,
    );
  }
  if (positionals.length > 0) {
    throw new UsageError(
      `unexpected argument ${JSON.stringify(positionals[0])} before --; the worker command and its arguments go after --`,
      NAME,
    );
  }
  if (rest.length === 0) throw new UsageError(`missing the worker command after --; write ${USAGE}`, NAME);
  return [...rest];
}

const launchCommand: Command = {
  name: NAME,
  summary: 'start the workers of a distributed job on this node (torchrun for megapatch)',
  description:
    "Starts --nproc-per-node workers of the command after -- with torchrun's variables: RANK, LOCAL_RANK, " +
    'WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, GROUP_WORLD_SIZE, ROLE_RANK, ROLE_WORLD_SIZE, MASTER_ADDR, ' +
    'MASTER_PORT, and MEGAPATCH_NUM_THREADS and OMP_NUM_THREADS set to the cores divided among the workers ' +
    'unless already set. Output lines are prefixed [rank<R>]: . SIGINT and SIGTERM are forwarded to the ' +
    'workers; a second one kills them. When a worker fails the others get SIGTERM, then SIGKILL after ' +
    "--kill-grace-s, and megapatch launch exits with the failed worker's code (128 + the signal number when " +
    'a signal killed it), or 130/143 when it was interrupted. torchrun spellings (--nproc_per_node, --node_rank, ' +
    '--master_addr, --master_port) are accepted.',
  passthrough: WORKER,
  // the launcher ends its workers itself, SIGKILL after --kill-grace-s: no second deadline here
  stopGraceMs: null,
  options,
  examples: [
    'launch --nproc-per-node 4 -- node train.js --tp 2',
    'launch --standalone --nproc_per_node=2 -- node worker.js',
    'launch --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500 --nproc-per-node 8 -- node train.js',
  ],
  async run({ options: values, positionals, io, rest }) {
    const o = parseOptions(schema, values, NAME);
    const [command, ...args] = workerCommand(positionals, rest);
    if (o.nodeRank >= o.nnodes) {
      throw new UsageError(
        `--node-rank ${o.nodeRank} is out of range for --nnodes ${o.nnodes} (0 to ${o.nnodes - 1})`,
        NAME,
      );
    }
    if (o.standalone && (o.nnodes > 1 || o.masterAddr || o.masterPort)) {
      const clash = o.nnodes > 1 ? `--nnodes ${o.nnodes}` : o.masterAddr ? '--master-addr' : '--master-port';
      throw new UsageError(`--standalone runs one node on a free local port; drop it or ${clash}`, NAME);
    }
    if (o.nnodes > 1 && !o.masterAddr) {
      throw new UsageError(
        `--nnodes ${o.nnodes} needs --master-addr, the host of node 0 that every node can reach (and the same --master-port on every node)`,
        NAME,
      );
    }
    const { launch, DistributedError } = await import('@megapatch/parallel/launch');

    // The CLI owns SIGINT/SIGTERM: it aborts io.signal, which is forwarded to the workers here.
    const controller = new AbortController();
    const forward = () => {
      const reason = io.signal.reason;
      controller.abort(reason instanceof Interrupted && reason.reason === 'SIGINT' ? 'SIGINT' : 'SIGTERM');
    };
    io.signal.addEventListener('abort', forward, { once: true });
    // A registered cleanup makes the CLI wait for the workers after the first signal instead of
    // exiting at once, for as long as the launcher gives them (--kill-grace-s: the command's own
    // grace is unlimited). If it exits anyway (a second signal), the launcher's exit hook kills the
    // workers, so the cleanup itself has nothing to do.
    const removeCleanup = io.onHardStop(() => {});
    let result: Awaited<ReturnType<typeof launch>>;
    try {
      if (io.signal.aborted) forward();
      result = await launch({
        command,
        args,
        nprocPerNode: o.nprocPerNode,
        nnodes: o.nnodes,
        nodeRank: o.nodeRank,
        masterAddr: o.masterAddr,
        masterPort: o.masterPort,
        prefixOutput: !o.noPrefix,
        killGraceMs: o.killGraceS * 1000,
        signal: controller.signal,
        handleSignals: false,
        // io.out.log and io.note add the newline back; io.out.log drops lines once stdout is closed.
        stdout: (text) => io.out.log(text.slice(0, -1)),
        stderr: (text) => io.note(text.slice(0, -1)),
      });
    } catch (e) {
      if (e instanceof DistributedError) throw new CliError('LAUNCH', e.message);
      throw e;
    } finally {
      removeCleanup();
      io.signal.removeEventListener('abort', forward);
    }
    if (result.ok) return EXIT.ok;
    const stopped = io.signal.reason;
    if (stopped instanceof Interrupted && stopped.reason === 'EPIPE') return exitCodeOf('EPIPE');
    io.note(`megapatch ${NAME}: ${result.message}`);
    // the first failed worker's own code (3, 137, ...) reaches the caller unchanged
    return result.exitCode === EXIT.ok ? EXIT.failure : result.exitCode;
  },
};

export default launchCommand;
