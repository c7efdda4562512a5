// detectEnvironment and expandHostlist: each launcher's variables, their priority, the master
// address and port, and a one-line error naming the variable for every bad or missing value.
import { describe, expect, it } from 'vitest';
import { DistributedError } from '../src/errors.js';
import { detectEnvironment, expandHostlist } from '../src/launch/env.js';

/** The error `fn` throws, checked to be a one-line DistributedError with `code`. */
function errorOf(fn: () => unknown, code = 'INVALID_ENVIRONMENT'): DistributedError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(DistributedError);
    const err = e as DistributedError;
    expect(err.code).toBe(code);
    expect(err.message).not.toContain('\n');
    return err;
  }
  throw new Error('expected an error');
}

const envError = (env: NodeJS.ProcessEnv) => errorOf(() => detectEnvironment(env)).message;

describe('expandHostlist', () => {
  it.each([
    [
      'gnode[10,20-22],other[01-03]',
      ['gnode10', 'gnode20', 'gnode21', 'gnode22', 'other01', 'other02', 'other03'],
    ],
    ['login1', ['login1']],
    ['a,b.example.com', ['a', 'b.example.com']],
    ['n[8-10]', ['n8', 'n9', 'n10']],
    ['n[08-10]', ['n08', 'n09', 'n10']],
    ['n[001-002,7]', ['n001', 'n002', 'n7']],
    ['n[098-100,007]', ['n098', 'n099', 'n100', 'n007']],
    ['n[3]', ['n3']],
    ['n[1-2]-ib', ['n1-ib', 'n2-ib']],
    ['rack[1-2]-n[1-2]', ['rack1-n1', 'rack1-n2', 'rack2-n1', 'rack2-n2']],
    ['[1-2]x', ['1x', '2x']],
    ['a[1-2],b,c[5]', ['a1', 'a2', 'b', 'c5']],
  ])('%s', (list, hosts) => {
    expect(expandHostlist(list)).toEqual(hosts);
  });

  it.each([
    ['n[1-', "'[' is never closed"],
    ['n]1', "']' without '['"],
    ['n[[1]]', "nested '['"],
    ['n[3-1]', 'the range 3-1 runs backwards'],
    ['n[a-c]', 'not a number or a range'],
    ['n[1-2-3]', 'not a number or a range'],
    ['n[]', 'not a number or a range'],
    ['', 'empty host name'],
    ['a,,b', 'empty host name'],
    ['a,', 'empty host name'],
    ['a b', 'white space'],
    ['n[0-99999999]', 'more than 1,048,576 hosts'],
    ['n[0-1024]x[0-1023]', 'more than 1,048,576 hosts'],
  ])('rejects %j', (list, why) => {
    const e = errorOf(() => expandHostlist(list), 'INVALID_ARGUMENT');
    expect(e.message).toContain(JSON.stringify(list));
    expect(e.message).toContain(why);
  });
});

describe('detectEnvironment: sources', () => {
  it('no launcher: one process on 127.0.0.1:29500', () => {
    expect(detectEnvironment({})).toEqual({
      rank: 0,
      worldSize: 1,
      localRank: 0,
      localWorldSize: 1,
      nodeRank: 0,
      masterAddr: '127.0.0.1',
      masterPort: 29500,
      source: 'single',
    });
    expect(detectEnvironment({ MASTER_ADDR: 'h', MASTER_PORT: '1234', LOCAL_RANK: '3' })).toMatchObject({
      masterAddr: 'h',
      masterPort: 1234,
      source: 'single',
      localRank: 0,
    });
  });

  it('torchrun / megapatch launch variables', () => {
    const env = {
      RANK: '5',
      WORLD_SIZE: '8',
      LOCAL_RANK: '1',
      LOCAL_WORLD_SIZE: '4',
      GROUP_RANK: '1',
      MASTER_ADDR: 'node0',
      MASTER_PORT: '29600',
    };
    expect(detectEnvironment(env)).toEqual({
      rank: 5,
      worldSize: 8,
      localRank: 1,
      localWorldSize: 4,
      nodeRank: 1,
      masterAddr: 'node0',
      masterPort: 29600,
      source: 'torchrun',
    });
  });

  it('torchrun without LOCAL_*: one node on loopback; with LOCAL_WORLD_SIZE only: nodes filled in order', () => {
    expect(detectEnvironment({ RANK: '2', WORLD_SIZE: '3' })).toMatchObject({
      localRank: 2,
      localWorldSize: 3,
      nodeRank: 0,
      masterAddr: '127.0.0.1',
      masterPort: 29500,
    });
    expect(
      detectEnvironment({ RANK: ' 5 ', WORLD_SIZE: '8', LOCAL_WORLD_SIZE: '4', MASTER_ADDR: 'm' }),
    ).toMatchObject({
      rank: 5,
      localRank: 1,
      nodeRank: 1,
    });
  });

  it('Slurm: ranks from srun, master = the first host of the step node list', () => {
    const env = {
      SLURM_PROCID: '5',
      SLURM_NTASKS: '7',
      SLURM_LOCALID: '1',
      SLURM_NODEID: '2',
      SLURM_STEP_TASKS_PER_NODE: '2(x3),1',
      SLURM_TASKS_PER_NODE: '7',
      SLURM_STEP_NODELIST: 'gpu[07-09],cpu1',
      SLURM_JOB_NODELIST: 'other[1-4]',
    };
    expect(detectEnvironment(env)).toEqual({
      rank: 5,
      worldSize: 7,
      localRank: 1,
      localWorldSize: 2,
      nodeRank: 2,
      masterAddr: 'gpu07',
      masterPort: 29500,
      source: 'slurm',
    });
    const job = { ...env, SLURM_STEP_NODELIST: '', SLURM_STEP_TASKS_PER_NODE: undefined };
    expect(detectEnvironment({ ...job, SLURM_NODEID: '0' })).toMatchObject({
      masterAddr: 'other1',
      localWorldSize: 7,
    });
    expect(detectEnvironment({ ...env, MASTER_ADDR: 'head', MASTER_PORT: '4000' })).toMatchObject({
      masterAddr: 'head',
      masterPort: 4000,
    });
  });

  it('Slurm fallbacks: SLURM_NPROCS, SLURM_NODELIST, SLURM_NTASKS_PER_NODE', () => {
    const env = {
      SLURM_PROCID: '3',
      SLURM_NPROCS: '4',
      SLURM_LOCALID: '1',
      SLURM_NODEID: '1',
      SLURM_NTASKS_PER_NODE: '2',
      SLURM_NODELIST: 'n[2-3]',
    };
    expect(detectEnvironment(env)).toMatchObject({
      rank: 3,
      worldSize: 4,
      localWorldSize: 2,
      nodeRank: 1,
      masterAddr: 'n2',
      source: 'slurm',
    });
  });

  it('Open MPI: node index from the rank (OMPI_COMM_WORLD_NODE_RANK is not the node index)', () => {
    const env = {
      OMPI_COMM_WORLD_RANK: '6',
      OMPI_COMM_WORLD_SIZE: '8',
      OMPI_COMM_WORLD_LOCAL_RANK: '2',
      OMPI_COMM_WORLD_LOCAL_SIZE: '4',
      OMPI_COMM_WORLD_NODE_RANK: '2',
      MASTER_ADDR: 'host0',
    };
    expect(detectEnvironment(env)).toEqual({
      rank: 6,
      worldSize: 8,
      localRank: 2,
      localWorldSize: 4,
      nodeRank: 1,
      masterAddr: 'host0',
      masterPort: 29500,
      source: 'openmpi',
    });
    // every process on this node: loopback needs no MASTER_ADDR
    expect(
      detectEnvironment({
        OMPI_COMM_WORLD_RANK: '1',
        OMPI_COMM_WORLD_SIZE: '2',
        OMPI_COMM_WORLD_LOCAL_RANK: '1',
        OMPI_COMM_WORLD_LOCAL_SIZE: '2',
      }),
    ).toMatchObject({ masterAddr: '127.0.0.1', nodeRank: 0, source: 'openmpi' });
  });

  it('MPICH / Intel MPI (PMI)', () => {
    const env = {
      PMI_RANK: '3',
      PMI_SIZE: '4',
      MPI_LOCALRANKID: '1',
      MPI_LOCALNRANKS: '2',
      MASTER_ADDR: 'h0',
    };
    expect(detectEnvironment(env)).toEqual({
      rank: 3,
      worldSize: 4,
      localRank: 1,
      localWorldSize: 2,
      nodeRank: 1,
      masterAddr: 'h0',
      masterPort: 29500,
      source: 'pmi',
    });
    expect(detectEnvironment({ PMI_RANK: '0', PMI_SIZE: '1', MPI_LOCALRANKID: '0' })).toMatchObject({
      masterAddr: '127.0.0.1',
      source: 'pmi',
    });
  });

  it('priority: torchrun, then Slurm, then Open MPI, then PMI', () => {
    const pmi = { PMI_RANK: '0', PMI_SIZE: '1', MPI_LOCALRANKID: '0' };
    const ompi = {
      OMPI_COMM_WORLD_RANK: '0',
      OMPI_COMM_WORLD_SIZE: '1',
      OMPI_COMM_WORLD_LOCAL_RANK: '0',
      OMPI_COMM_WORLD_LOCAL_SIZE: '1',
    };
    const slurm = {
      SLURM_PROCID: '0',
      SLURM_NTASKS: '1',
      SLURM_LOCALID: '0',
      SLURM_NODEID: '0',
      SLURM_TASKS_PER_NODE: '1',
    };
    const torch = { RANK: '0', WORLD_SIZE: '1' };
    expect(detectEnvironment({ ...pmi }).source).toBe('pmi');
    expect(detectEnvironment({ ...pmi, ...ompi }).source).toBe('openmpi');
    expect(detectEnvironment({ ...pmi, ...ompi, ...slurm }).source).toBe('slurm');
    expect(detectEnvironment({ ...pmi, ...ompi, ...slurm, ...torch }).source).toBe('torchrun');
  });
});

describe('detectEnvironment: errors name the variable, its value and the fix', () => {
  const torch = { RANK: '1', WORLD_SIZE: '4' };
  it.each<[string, NodeJS.ProcessEnv, string[]]>([
    [
      'RANK not an integer',
      { RANK: 'abc', WORLD_SIZE: '2' },
      ['RANK=abc is not a non-negative integer', 'set RANK'],
    ],
    ['RANK fractional', { RANK: '1.5', WORLD_SIZE: '2' }, ['RANK=1.5 is not a non-negative integer']],
    ['RANK negative', { RANK: '-1', WORLD_SIZE: '2' }, ['RANK=-1 is not a non-negative integer']],
    [
      'RANK with spaces inside',
      { RANK: '1 2', WORLD_SIZE: '2' },
      ['RANK="1 2" is not a non-negative integer'],
    ],
    [
      'WORLD_SIZE not an integer',
      { RANK: '0', WORLD_SIZE: '2x' },
      ['WORLD_SIZE=2x is not', 'number of processes'],
    ],
    ['RANK without WORLD_SIZE', { RANK: '1' }, ['RANK=1 is set but WORLD_SIZE is not', 'set WORLD_SIZE']],
    ['WORLD_SIZE without RANK', { WORLD_SIZE: '4' }, ['WORLD_SIZE=4 is set but RANK is not', 'set RANK']],
    [
      'RANK out of range',
      { RANK: '4', WORLD_SIZE: '4' },
      ['RANK=4 is out of range for WORLD_SIZE=4', '0 to 3'],
    ],
    ['WORLD_SIZE 0', { RANK: '0', WORLD_SIZE: '0' }, ['WORLD_SIZE=0', 'at least 1']],
    [
      'LOCAL_RANK out of range',
      { ...torch, LOCAL_RANK: '2', LOCAL_WORLD_SIZE: '2', MASTER_ADDR: 'm' },
      ['LOCAL_RANK=2 is out of range for LOCAL_WORLD_SIZE=2'],
    ],
    [
      'LOCAL_WORLD_SIZE too big',
      { ...torch, LOCAL_WORLD_SIZE: '5' },
      ['LOCAL_WORLD_SIZE=5 must be between 1 and WORLD_SIZE=4'],
    ],
    ['LOCAL_WORLD_SIZE 0', { ...torch, LOCAL_WORLD_SIZE: '0' }, ['LOCAL_WORLD_SIZE=0 must be between 1']],
    [
      'LOCAL_RANK not an integer',
      { ...torch, LOCAL_RANK: 'x' },
      ['LOCAL_RANK=x is not a non-negative integer'],
    ],
    ['GROUP_RANK out of range', { ...torch, GROUP_RANK: '4' }, ['GROUP_RANK=4 is out of range']],
    ['MASTER_PORT not a port', { ...torch, MASTER_PORT: '70000' }, ['MASTER_PORT=70000 is not a TCP port']],
    ['MASTER_PORT 0', { MASTER_PORT: '0' }, ['MASTER_PORT=0 is not a TCP port', 'unset it for 29500']],
    ['MASTER_PORT text', { MASTER_PORT: 'http' }, ['MASTER_PORT=http is not a TCP port']],
    [
      'torchrun across nodes without MASTER_ADDR',
      { ...torch, LOCAL_WORLD_SIZE: '2' },
      ['MASTER_ADDR is not set', 'WORLD_SIZE=4', 'LOCAL_WORLD_SIZE=2', 'set MASTER_ADDR'],
    ],
  ])('%s', (_, env, parts) => {
    const message = envError(env);
    for (const part of parts) expect(message).toContain(part);
  });

  const slurm = {
    SLURM_PROCID: '1',
    SLURM_NTASKS: '4',
    SLURM_LOCALID: '1',
    SLURM_NODEID: '0',
    SLURM_TASKS_PER_NODE: '2(x2)',
    SLURM_JOB_NODELIST: 'n[1-2]',
  };
  it.each<[string, NodeJS.ProcessEnv, string[]]>([
    ['SLURM_PROCID not an integer', { ...slurm, SLURM_PROCID: 'one' }, ['SLURM_PROCID=one is not', 'srun']],
    [
      'no SLURM_NTASKS / SLURM_NPROCS',
      { ...slurm, SLURM_NTASKS: undefined },
      ['neither SLURM_NTASKS nor SLURM_NPROCS', 'srun'],
    ],
    ['no SLURM_LOCALID', { ...slurm, SLURM_LOCALID: undefined }, ['SLURM_LOCALID', 'is not', 'srun']],
    ['no SLURM_NODEID', { ...slurm, SLURM_NODEID: '' }, ['SLURM_NODEID', 'is not']],
    [
      'SLURM_PROCID out of range',
      { ...slurm, SLURM_PROCID: '4' },
      ['SLURM_PROCID=4 is out of range for SLURM_NTASKS=4'],
    ],
    [
      'SLURM_LOCALID past the node',
      { ...slurm, SLURM_LOCALID: '2' },
      ['SLURM_LOCALID=2 is out of range for SLURM_TASKS_PER_NODE=2'],
    ],
    [
      'bad tasks per node',
      { ...slurm, SLURM_TASKS_PER_NODE: '2(y2)' },
      ['SLURM_TASKS_PER_NODE=2(y2) is not a tasks-per-node list'],
    ],
    [
      'node past the list',
      { ...slurm, SLURM_NODEID: '2' },
      ['SLURM_NODEID=2 is past the 2 node(s) of SLURM_TASKS_PER_NODE=2(x2)'],
    ],
    [
      'no tasks per node at all',
      { ...slurm, SLURM_TASKS_PER_NODE: undefined },
      ['SLURM_TASKS_PER_NODE', 'are all unset'],
    ],
    [
      'bad node list',
      { ...slurm, SLURM_JOB_NODELIST: 'n[2-1]' },
      ['SLURM_JOB_NODELIST=n[2-1]', 'runs backwards'],
    ],
    [
      'no node list across nodes',
      { ...slurm, SLURM_JOB_NODELIST: undefined },
      ['MASTER_ADDR is not set', 'SLURM_NTASKS=4', 'scontrol show hostnames'],
    ],
  ])('Slurm: %s', (_, env, parts) => {
    const message = envError(env);
    for (const part of parts) expect(message).toContain(part);
  });

  const ompi = {
    OMPI_COMM_WORLD_RANK: '3',
    OMPI_COMM_WORLD_SIZE: '4',
    OMPI_COMM_WORLD_LOCAL_RANK: '1',
    OMPI_COMM_WORLD_LOCAL_SIZE: '2',
    MASTER_ADDR: 'h',
  };
  const pmi = { PMI_RANK: '1', PMI_SIZE: '4', MPI_LOCALRANKID: '1', MPI_LOCALNRANKS: '2', MASTER_ADDR: 'h' };
  it.each<[string, NodeJS.ProcessEnv, string[]]>([
    [
      'Open MPI without MASTER_ADDR',
      { ...ompi, MASTER_ADDR: undefined },
      ['MASTER_ADDR is not set', 'OMPI_COMM_WORLD_SIZE=4', 'mpirun -x MASTER_ADDR'],
    ],
    [
      'Open MPI without the size',
      { ...ompi, OMPI_COMM_WORLD_SIZE: undefined },
      ['OMPI_COMM_WORLD_SIZE', 'is not', 'mpirun'],
    ],
    [
      'Open MPI without the local rank',
      { ...ompi, OMPI_COMM_WORLD_LOCAL_RANK: undefined },
      ['OMPI_COMM_WORLD_LOCAL_RANK'],
    ],
    [
      'Open MPI without the local size',
      { ...ompi, OMPI_COMM_WORLD_LOCAL_SIZE: undefined },
      ['OMPI_COMM_WORLD_LOCAL_SIZE'],
    ],
    [
      'Open MPI rank out of range',
      { ...ompi, OMPI_COMM_WORLD_RANK: '9' },
      ['OMPI_COMM_WORLD_RANK=9 is out of range for OMPI_COMM_WORLD_SIZE=4'],
    ],
    [
      'Open MPI local size not an integer',
      { ...ompi, OMPI_COMM_WORLD_LOCAL_SIZE: 'two' },
      ['OMPI_COMM_WORLD_LOCAL_SIZE=two is not'],
    ],
    [
      'PMI without MASTER_ADDR',
      { ...pmi, MASTER_ADDR: undefined },
      ['MASTER_ADDR is not set', 'PMI_SIZE=4', 'mpiexec -genv MASTER_ADDR'],
    ],
    [
      'PMI without MPI_LOCALNRANKS may span nodes',
      { ...pmi, MPI_LOCALNRANKS: undefined, MASTER_ADDR: undefined },
      ['MPI_LOCALNRANKS is unset'],
    ],
    ['PMI without PMI_SIZE', { ...pmi, PMI_SIZE: undefined }, ['PMI_SIZE', 'is not', 'mpiexec']],
    ['PMI without MPI_LOCALRANKID', { ...pmi, MPI_LOCALRANKID: undefined }, ['MPI_LOCALRANKID', 'is not']],
    ['PMI rank out of range', { ...pmi, PMI_RANK: '4' }, ['PMI_RANK=4 is out of range for PMI_SIZE=4']],
  ])('MPI: %s', (_, env, parts) => {
    const message = envError(env);
    for (const part of parts) expect(message).toContain(part);
  });
});
