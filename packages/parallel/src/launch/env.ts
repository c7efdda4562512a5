// Where this process sits in a distributed job, read from the variables its launcher set:
// megapatch launch / torchrun first, then Slurm's srun, Open MPI's mpirun, MPICH / Intel MPI
// (PMI), else a job of one. Every value is checked, and a bad one is a one-line error that names
// the variable, its value and the fix.
import { DistributedError } from '../errors.js';

/** The launcher whose variables described the job. */
export type EnvironmentSource = 'torchrun' | 'slurm' | 'openmpi' | 'pmi' | 'single';

/** This process's place in the job. */
export interface DistributedEnvironment {
  /** Global rank, 0 .. worldSize-1. */
  rank: number;
  /** Number of processes in the job. */
  worldSize: number;
  /** Rank among the processes on this node, 0 .. localWorldSize-1 (picks the GPU). */
  localRank: number;
  /** Number of processes on this node. */
  localWorldSize: number;
  /** Index of this node in the job. */
  nodeRank: number;
  /** Host of the rendezvous store (rank 0's host, or the launcher's). */
  masterAddr: string;
  /** TCP port of the rendezvous store. */
  masterPort: number;
  source: EnvironmentSource;
}

/** The port torchrun and Megatron use when none is given. */
export const DEFAULT_MASTER_PORT = 29500;

/** The master address of a job that runs on one node. */
export const LOOPBACK_ADDR = '127.0.0.1';

/** A number read from a variable, kept with the variable's name for messages. */
interface Read {
  readonly name: string;
  readonly value: number;
}

/** The layout one source found, before the master address is settled. */
interface Layout {
  source: Exclude<EnvironmentSource, 'single'>;
  rank: Read;
  worldSize: Read;
  localRank: Read;
  localWorldSize: Read;
  nodeRank: Read;
  /** The master host the source itself names (Slurm's first host), if any. */
  host?: string;
  /** False when the source does not say how many processes run on this node. */
  nodeSizeKnown: boolean;
  /** How to set MASTER_ADDR with this launcher, for the message when it is missing. */
  masterHint: string;
}

const invalid = (message: string) => new DistributedError('INVALID_ENVIRONMENT', message);

/** A value as it appears in a message: bare when plain, JSON-quoted when it has spaces or odd characters. */
const shown = (raw: string) => (/^[\w.:/@+,[\]()-]+$/.test(raw) ? raw : JSON.stringify(raw));

/** Reads variables: unset and empty (`RANK=`) are the same. */
function reader(env: NodeJS.ProcessEnv) {
  const text = (name: string): string | undefined => {
    const v = env[name]?.trim();
    return v ? v : undefined;
  };
  /** A non-negative integer, or undefined when unset; `fix` says what the variable should hold. */
  const int = (name: string, fix: string): Read | undefined => {
    const raw = text(name);
    if (raw === undefined) return undefined;
    const value = Number(raw);
    if (!/^\d+$/.test(raw) || !Number.isSafeInteger(value)) {
      throw invalid(`${name}=${shown(env[name] ?? '')} is not a non-negative integer; ${fix}`);
    }
    return { name, value };
  };
  return { text, int };
}

type Reader = ReturnType<typeof reader>;

/**
 * The hosts of a Slurm hostlist, in order: `gnode[10,20-22],other[01-03]` gives gnode10,
 * gnode20, gnode21, gnode22, other01, other02, other03. Entries are separated by commas outside
 * brackets; an entry may hold several bracket groups (`rack[1-2]-n[1-2]`, expanded with the
 * first group varying slowest); a range keeps the zero padding of its lower bound (`[08-10]`).
 */
export function expandHostlist(list: string): string[] {
  const hosts: string[] = [];
  for (const entry of splitEntries(list)) {
    const choices = parseEntry(entry, list);
    const count = choices.reduce((n, c) => n * c.length, 1);
    if (hosts.length + count > MAX_HOSTS) {
      throw badHostlist(list, `it names more than ${MAX_HOSTS.toLocaleString('en-US')} hosts`);
    }
    let names = [''];
    for (const c of choices) names = names.flatMap((prefix) => c.map((part) => prefix + part));
    for (const name of names) hosts.push(name);
  }
  return hosts;
}

/** More hosts than any cluster has: a typo such as `n[0-99999999]` fails instead of filling memory. */
const MAX_HOSTS = 1 << 20;

const badHostlist = (list: string, why: string) =>
  new DistributedError(
    'INVALID_ARGUMENT',
    `hostlist ${JSON.stringify(list)} is malformed: ${why}; write it as Slurm does, e.g. node[01-04,07],login1`,
  );

/** Splits a hostlist at the commas outside brackets, checking that brackets pair up and do not nest. */
function splitEntries(list: string): string[] {
  const entries: string[] = [];
  let depth = 0;
  let start = 0;
  for (let i = 0; i <= list.length; i++) {
    const c = list[i];
    if (c === '[') {
      if (depth > 0) throw badHostlist(list, `nested '[' at character ${i + 1}`);
      depth = 1;
    } else if (c === ']') {
      if (depth === 0) throw badHostlist(list, `']' without '[' at character ${i + 1}`);
      depth = 0;
    } else if (i === list.length || (c === ',' && depth === 0)) {
      if (i === list.length && depth > 0) throw badHostlist(list, `'[' is never closed`);
      const entry = list.slice(start, i);
      if (entry === '') throw badHostlist(list, 'it has an empty host name');
      if (/\s/.test(entry)) throw badHostlist(list, `${JSON.stringify(entry)} contains white space`);
      entries.push(entry);
      start = i + 1;
    }
  }
  return entries;
}

/** One entry as a sequence of choices: a literal is one choice, a bracket group its expansion. */
function parseEntry(entry: string, list: string): string[][] {
  const choices: string[][] = [];
  const re = /\[([^\]]*)\]/g;
  let last = 0;
  for (let m = re.exec(entry); m !== null; m = re.exec(entry)) {
    if (m.index > last) choices.push([entry.slice(last, m.index)]);
    choices.push(expandGroup(m[1], list));
    last = m.index + m[0].length;
  }
  if (last < entry.length) choices.push([entry.slice(last)]);
  return choices;
}

/** `10,20-22` → 10, 20, 21, 22; `01-03` → 01, 02, 03. */
function expandGroup(group: string, list: string): string[] {
  const out: string[] = [];
  for (const item of group.split(',')) {
    const m = /^(\d+)(?:-(\d+))?$/.exec(item);
    if (!m) throw badHostlist(list, `[${group}] holds ${JSON.stringify(item)}, not a number or a range a-b`);
    const lo = Number(m[1]);
    const hi = m[2] === undefined ? lo : Number(m[2]);
    if (hi < lo) throw badHostlist(list, `the range ${item} runs backwards`);
    if (out.length + hi - lo + 1 > MAX_HOSTS) {
      throw badHostlist(list, `it names more than ${MAX_HOSTS.toLocaleString('en-US')} hosts`);
    }
    for (let n = lo; n <= hi; n++) out.push(String(n).padStart(m[1].length, '0'));
  }
  return out;
}

/** Slurm's tasks-per-node list, `4(x2),3` → [4, 4, 3]; undefined when it is not one. */
function parseTasksPerNode(text: string): number[] | undefined {
  const counts: number[] = [];
  for (const item of text.split(',')) {
    const m = /^(\d+)(?:\(x(\d+)\))?$/.exec(item.trim());
    if (!m) return undefined;
    const repeat = m[2] === undefined ? 1 : Number(m[2]);
    if (repeat > MAX_HOSTS - counts.length) return undefined;
    for (let i = 0; i < repeat; i++) counts.push(Number(m[1]));
  }
  return counts;
}

/** RANK, WORLD_SIZE, LOCAL_RANK, ... as torchrun and megapatch launch set them. */
function fromTorchrun(r: Reader): Layout | undefined {
  if (r.text('RANK') === undefined && r.text('WORLD_SIZE') === undefined) return undefined;
  const both = 'megapatch launch and torchrun set RANK and WORLD_SIZE together';
  const rank = r.int('RANK', "set RANK to this process's rank, 0 to WORLD_SIZE-1");
  const worldSize = r.int('WORLD_SIZE', 'set WORLD_SIZE to the number of processes in the job');
  if (!worldSize) {
    throw invalid(
      `RANK=${rank?.value} is set but WORLD_SIZE is not; set WORLD_SIZE to the number of processes (${both})`,
    );
  }
  if (!rank) {
    throw invalid(
      `WORLD_SIZE=${worldSize.value} is set but RANK is not; set RANK to this process's rank, 0 to WORLD_SIZE-1 (${both})`,
    );
  }
  const localWorldSize = r.int('LOCAL_WORLD_SIZE', 'set it to the number of processes on this node') ?? {
    name: 'WORLD_SIZE',
    value: worldSize.value,
  };
  // Without the LOCAL_* variables the job is taken to run on one node; with LOCAL_WORLD_SIZE only,
  // ranks are taken to fill the nodes in order, as torchrun places them.
  const size = Math.max(1, localWorldSize.value);
  return {
    source: 'torchrun',
    rank,
    worldSize,
    localRank: r.int('LOCAL_RANK', "set it to this process's rank on its node") ?? {
      name: 'RANK',
      value: rank.value % size,
    },
    localWorldSize,
    nodeRank: r.int('GROUP_RANK', 'set it to the index of this node') ?? {
      name: 'RANK',
      value: Math.floor(rank.value / size),
    },
    nodeSizeKnown: true,
    masterHint: 'set MASTER_ADDR to the host of rank 0 (megapatch launch and torchrun set it)',
  };
}

/** SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID and the node list, as srun sets them. */
function fromSlurm(r: Reader): Layout | undefined {
  if (r.text('SLURM_PROCID') === undefined) return undefined;
  const srun = 'start the processes with srun, which sets it';
  const rank = r.int('SLURM_PROCID', `it is this task's rank; ${srun}`) as Read;
  const worldSize = r.int('SLURM_NTASKS', srun) ?? r.int('SLURM_NPROCS', srun);
  if (!worldSize) {
    throw invalid(
      `SLURM_PROCID=${rank.value} is set but neither SLURM_NTASKS nor SLURM_NPROCS is; start the processes with srun --ntasks N`,
    );
  }
  const need = (name: string, what: string): Read => {
    const v = r.int(name, `it is ${what}; ${srun}`);
    if (!v) throw invalid(`SLURM_PROCID=${rank.value} is set but ${name} (${what}) is not; ${srun}`);
    return v;
  };
  const localRank = need('SLURM_LOCALID', "the task's rank on its node");
  const nodeRank = need('SLURM_NODEID', "the index of the task's node");
  const localWorldSize = slurmTasksOnNode(r, nodeRank.value);
  let host: string | undefined;
  for (const name of ['SLURM_STEP_NODELIST', 'SLURM_JOB_NODELIST', 'SLURM_NODELIST']) {
    const list = r.text(name);
    if (list === undefined) continue;
    try {
      host = expandHostlist(list)[0];
    } catch (e) {
      throw invalid(`${name}=${shown(list)}: ${(e as Error).message}`);
    }
    break;
  }
  return {
    source: 'slurm',
    rank,
    worldSize,
    localRank,
    localWorldSize,
    nodeRank,
    host,
    nodeSizeKnown: true,
    masterHint: 'export MASTER_ADDR in the batch script (e.g. the first host of `scontrol show hostnames`)',
  };
}

/** The number of tasks on node `node`, from the step's (or the job's) tasks-per-node list. */
function slurmTasksOnNode(r: Reader, node: number): Read {
  for (const name of ['SLURM_STEP_TASKS_PER_NODE', 'SLURM_TASKS_PER_NODE']) {
    const text = r.text(name);
    if (text === undefined) continue;
    const counts = parseTasksPerNode(text);
    if (!counts) {
      throw invalid(
        `${name}=${shown(text)} is not a tasks-per-node list like 4(x2),3; start the processes with srun`,
      );
    }
    if (node >= counts.length) {
      throw invalid(
        `SLURM_NODEID=${node} is past the ${counts.length} node(s) of ${name}=${shown(text)}; start the processes with srun`,
      );
    }
    return { name, value: counts[node] };
  }
  const perNode = r.int('SLURM_NTASKS_PER_NODE', 'it is the number of tasks on each node');
  if (perNode) return perNode;
  throw invalid(
    'SLURM_STEP_TASKS_PER_NODE, SLURM_TASKS_PER_NODE and SLURM_NTASKS_PER_NODE are all unset, so the tasks on this node are unknown; start the processes with srun',
  );
}

/** The OMPI_COMM_WORLD_* variables of Open MPI's mpirun. */
function fromOpenMpi(r: Reader): Layout | undefined {
  if (r.text('OMPI_COMM_WORLD_RANK') === undefined) return undefined;
  const mpirun = "start the processes with Open MPI's mpirun, which sets it";
  const rank = r.int('OMPI_COMM_WORLD_RANK', mpirun) as Read;
  const need = (name: string, what: string): Read => {
    const v = r.int(name, `it is ${what}; ${mpirun}`);
    if (!v)
      throw invalid(`OMPI_COMM_WORLD_RANK=${rank.value} is set but ${name} (${what}) is not; ${mpirun}`);
    return v;
  };
  const worldSize = need('OMPI_COMM_WORLD_SIZE', 'the number of processes');
  const localRank = need('OMPI_COMM_WORLD_LOCAL_RANK', "the process's rank on its node");
  const localWorldSize = need('OMPI_COMM_WORLD_LOCAL_SIZE', 'the number of processes on the node');
  return {
    source: 'openmpi',
    rank,
    worldSize,
    localRank,
    localWorldSize,
    // OMPI_COMM_WORLD_NODE_RANK is not the node's index (it counts processes on the node across all
    // jobs), so the index assumes mpirun's default placement: ranks fill the nodes in order.
    nodeRank: {
      name: 'OMPI_COMM_WORLD_RANK',
      value: Math.floor(rank.value / Math.max(1, localWorldSize.value)),
    },
    nodeSizeKnown: true,
    masterHint: 'pass it with mpirun -x MASTER_ADDR=<host of rank 0> (MPI does not say where rank 0 runs)',
  };
}

/** PMI_RANK, PMI_SIZE and MPI_LOCALRANKID of MPICH's and Intel MPI's mpiexec (Hydra). */
function fromPmi(r: Reader): Layout | undefined {
  if (r.text('PMI_RANK') === undefined) return undefined;
  const mpiexec = "start the processes with MPICH's or Intel MPI's mpiexec, which sets it";
  const rank = r.int('PMI_RANK', mpiexec) as Read;
  const need = (name: string, what: string): Read => {
    const v = r.int(name, `it is ${what}; ${mpiexec}`);
    if (!v) throw invalid(`PMI_RANK=${rank.value} is set but ${name} (${what}) is not; ${mpiexec}`);
    return v;
  };
  const worldSize = need('PMI_SIZE', 'the number of processes');
  const localRank = need('MPI_LOCALRANKID', "the process's rank on its node");
  // Hydra also sets MPI_LOCALNRANKS; without it the node's size is unknown, and the job is
  // treated as spanning nodes, so MASTER_ADDR is required.
  const localWorldSize = r.int('MPI_LOCALNRANKS', 'it is the number of processes on the node');
  const size = localWorldSize?.value ?? worldSize.value;
  return {
    source: 'pmi',
    rank,
    worldSize,
    localRank,
    localWorldSize: localWorldSize ?? { name: 'PMI_SIZE', value: size },
    nodeRank: { name: 'PMI_RANK', value: Math.floor(rank.value / Math.max(1, size)) },
    nodeSizeKnown: localWorldSize !== undefined,
    masterHint:
      'pass it with mpiexec -genv MASTER_ADDR <host of rank 0> (MPI does not say where rank 0 runs)',
  };
}

/** Checks the numbers against each other; messages name the variables they came from. */
function checkLayout(l: Layout): void {
  const { rank, worldSize, localRank, localWorldSize, nodeRank } = l;
  if (worldSize.value < 1) throw invalid(`${worldSize.name}=0 is not a job size; it must be at least 1`);
  if (rank.value >= worldSize.value) {
    throw invalid(
      `${rank.name}=${rank.value} is out of range for ${worldSize.name}=${worldSize.value} (ranks run from 0 to ${worldSize.value - 1}); check both variables`,
    );
  }
  if (localWorldSize.value < 1 || localWorldSize.value > worldSize.value) {
    throw invalid(
      `${localWorldSize.name}=${localWorldSize.value} must be between 1 and ${worldSize.name}=${worldSize.value} (the processes on this node)`,
    );
  }
  if (localRank.value >= localWorldSize.value) {
    throw invalid(
      `${localRank.name}=${localRank.value} is out of range for ${localWorldSize.name}=${localWorldSize.value} (local ranks run from 0 to ${localWorldSize.value - 1}); check both variables`,
    );
  }
  if (nodeRank.value >= worldSize.value) {
    throw invalid(
      `${nodeRank.name}=${nodeRank.value} is out of range: a job of ${worldSize.name}=${worldSize.value} processes has at most ${worldSize.value} nodes`,
    );
  }
}

/** MASTER_PORT if set (checked), else the default. */
function masterPort(r: Reader): number {
  const raw = r.text('MASTER_PORT');
  if (raw === undefined) return DEFAULT_MASTER_PORT;
  const port = Number(raw);
  if (!/^\d+$/.test(raw) || port < 1 || port > 65535) {
    throw invalid(
      `MASTER_PORT=${shown(raw)} is not a TCP port (1 to 65535); set it to a free port on the master host, or unset it for ${DEFAULT_MASTER_PORT}`,
    );
  }
  return port;
}

/**
 * Where this process sits in its job, from the launcher's environment variables (torchrun /
 * megapatch launch, then Slurm, Open MPI, MPICH/Intel MPI, else a job of one process).
 * MASTER_ADDR and MASTER_PORT, when set, override what the launcher implies; the port defaults to
 * 29500, and the address to 127.0.0.1 when every process runs on this node. Throws a
 * `DistributedError('INVALID_ENVIRONMENT')` naming the variable when a value is missing, not an
 * integer or out of range.
 */
export function detectEnvironment(env: NodeJS.ProcessEnv = process.env): DistributedEnvironment {
  const r = reader(env);
  const layout = fromTorchrun(r) ?? fromSlurm(r) ?? fromOpenMpi(r) ?? fromPmi(r);
  const port = masterPort(r);
  const addr = r.text('MASTER_ADDR');
  if (!layout) {
    return {
      rank: 0,
      worldSize: 1,
      localRank: 0,
      localWorldSize: 1,
      nodeRank: 0,
      masterAddr: addr ?? LOOPBACK_ADDR,
      masterPort: port,
      source: 'single',
    };
  }
  checkLayout(layout);
  const { worldSize, localWorldSize } = layout;
  const oneNode = worldSize.value === 1 || (layout.nodeSizeKnown && localWorldSize.value === worldSize.value);
  const masterAddr = addr ?? layout.host ?? (oneNode ? LOOPBACK_ADDR : undefined);
  if (masterAddr === undefined) {
    const span = layout.nodeSizeKnown
      ? `span more nodes than this one (${localWorldSize.name}=${localWorldSize.value})`
      : 'may span several nodes (MPI_LOCALNRANKS is unset)';
    throw invalid(
      `MASTER_ADDR is not set, and the ${worldSize.name}=${worldSize.value} processes ${span}; ${layout.masterHint}`,
    );
  }
  return {
    rank: layout.rank.value,
    worldSize: layout.worldSize.value,
    localRank: layout.localRank.value,
    localWorldSize: layout.localWorldSize.value,
    nodeRank: layout.nodeRank.value,
    masterAddr,
    masterPort: port,
    source: layout.source,
  };
}
