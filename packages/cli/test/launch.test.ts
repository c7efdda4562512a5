// `megapatch launch` through the real binary: usage errors, torchrun's spellings, the worker
// command after `--` passed on untouched, exit codes of failed workers, and SIGTERM forwarded.
import * as fs from 'node:fs';
import { createServer } from 'node:net';
import { describe, expect, it } from 'vitest';
import { finished, megapatch, oneLine, startMegapatch, waitFor } from './helpers.js';

const NODE = process.execPath;
/** A worker that prints its place in the job. */
const PRINT_RANKS =
  "const e = process.env; console.log(['RANK', e.RANK, 'LOCAL_RANK', e.LOCAL_RANK, 'WORLD_SIZE', e.WORLD_SIZE, 'GROUP_RANK', e.GROUP_RANK, 'MASTER_PORT', e.MASTER_PORT].join(' '))";

/** Whether process `pid` runs (a zombie no longer does). */
function running(pid: number): boolean {
  try {
    return !/\) Z /.test(fs.readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => resolve(typeof address === 'object' && address ? address.port : 0));
    });
  });
}

describe('megapatch launch: usage errors exit 2 with one line', () => {
  it.each<[string, string[], string]>([
    [
      'a command without --',
      ['--nproc-per-node', '2', 'node', 'train.js'],
      'missing -- before the worker command "node train.js"',
    ],
    [
      'no command',
      ['--nproc-per-node', '2'],
      'missing the worker command; write megapatch launch --nproc-per-node N',
    ],
    ['nothing after --', ['--nproc-per-node', '2', '--'], 'missing the worker command after --'],
    ['a word before --', ['--nproc-per-node', '2', 'x', '--', 'node'], 'unexpected argument "x" before --'],
    ['--nproc-per-node 0', ['--nproc-per-node', '0', '--', 'node'], '--nproc-per-node: must be >= 1'],
    ['no --nproc-per-node', ['--', 'node'], 'missing --nproc-per-node N (workers to start on this node)'],
    [
      'several nodes without an address',
      ['--nproc-per-node', '1', '--nnodes', '2', '--', 'node'],
      '--nnodes 2 needs --master-addr',
    ],
    [
      'a node rank past the nodes',
      ['--nproc-per-node', '1', '--nnodes', '2', '--node_rank', '2', '--master_addr', 'h', '--', 'node'],
      '--node-rank 2 is out of range for --nnodes 2 (0 to 1)',
    ],
    [
      '--standalone on several nodes',
      ['--standalone', '--nproc-per-node', '1', '--nnodes', '2', '--', 'node'],
      '--standalone runs one node on a free local port; drop it or --nnodes 2',
    ],
    [
      'a bad port',
      ['--nproc-per-node', '1', '--master-port', '70000', '--', 'node'],
      '--master-port: must be <= 65,535',
    ],
    [
      'a bad grace period',
      ['--nproc-per-node', '1', '--kill-grace-s', 'soon', '--', 'node'],
      '--kill-grace-s: must be a number of seconds',
    ],
    [
      'an option twice under both spellings',
      ['--nproc-per-node', '1', '--nproc_per_node', '2', '--', 'node'],
      '--nproc-per-node and --nproc_per_node are the same option',
    ],
  ])('%s', (_, args, message) => {
    const r = megapatch(['launch', ...args]);
    expect(r.status, r.stderr).toBe(2);
    expect(oneLine(r.stderr)).toContain(`megapatch launch: ${message}`);
    expect(r.stdout).toBe('');
  });
});

describe('megapatch launch: runs', () => {
  it("starts the workers with torchrun's spellings and prefixes their lines", () => {
    const r = megapatch(['launch', '--standalone', '--nproc_per_node=2', '--', NODE, '-e', PRINT_RANKS]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stderr).toBe('');
    const lines = r.stdout.trimEnd().split('\n').sort();
    expect(lines).toHaveLength(2);
    const port = /MASTER_PORT (\d+)$/.exec(lines[0])?.[1];
    expect(lines).toEqual([
      `[rank0]: RANK 0 LOCAL_RANK 0 WORLD_SIZE 2 GROUP_RANK 0 MASTER_PORT ${port}`,
      `[rank1]: RANK 1 LOCAL_RANK 1 WORLD_SIZE 2 GROUP_RANK 0 MASTER_PORT ${port}`,
    ]);
  });

  it('passes every word after -- to the workers, flags such as --debug and --help included', () => {
    const r = megapatch([
      'launch',
      '--no-prefix',
      '--nproc-per-node',
      '1',
      '--',
      NODE,
      '-e',
      'console.log(JSON.stringify(process.argv.slice(1)))',
      '--',
      '--debug',
      '--help',
      '--',
      'x y',
    ]);
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual(['--debug', '--help', '--', 'x y']);
  });

  it('two launchers with --nnodes 2 give world ranks 0..3', async () => {
    const port = String(await freePort());
    const node = (rank: number) =>
      finished(
        startMegapatch([
          'launch',
          '--nnodes',
          '2',
          '--node_rank',
          String(rank),
          '--master_addr',
          '127.0.0.1',
          '--master_port',
          port,
          '--nproc-per-node',
          '2',
          '--',
          NODE,
          '-e',
          PRINT_RANKS,
        ]),
      );
    const [a, b] = await Promise.all([node(0), node(1)]);
    expect([a.status, b.status]).toEqual([0, 0]);
    const lines = (a.stdout + b.stdout).trimEnd().split('\n').sort();
    expect(lines).toEqual(
      [0, 1, 2, 3].map(
        (r) =>
          `[rank${r}]: RANK ${r} LOCAL_RANK ${r % 2} WORLD_SIZE 4 GROUP_RANK ${Math.floor(r / 2)} MASTER_PORT ${port}`,
      ),
    );
  });
});

describe('megapatch launch: failures', () => {
  it("a failing worker's exit code is the launcher's, with one line naming the rank", () => {
    const r = megapatch([
      'launch',
      '--nproc-per-node',
      '2',
      '--',
      NODE,
      '-e',
      "if (process.env.RANK === '1') process.exit(3); setTimeout(() => {}, 30000)",
    ]);
    expect(r.status).toBe(3);
    expect(oneLine(r.stderr)).toMatch(
      /^megapatch launch: rank 1 \(local rank 1, pid \d+\) exited with code 3; stopped the 1 other worker still running$/,
    );
  });

  it('a worker killed by a signal: exit 128 + its number', () => {
    const r = megapatch([
      'launch',
      '--nproc-per-node',
      '1',
      '--',
      NODE,
      '-e',
      "process.kill(process.pid, 'SIGKILL')",
    ]);
    expect(r.status).toBe(137);
    expect(oneLine(r.stderr)).toMatch(
      /^megapatch launch: rank 0 \(local rank 0, pid \d+\) was killed by SIGKILL$/,
    );
  });

  it('a command that cannot be started: exit 1, one line naming it', () => {
    const r = megapatch(['launch', '--nproc-per-node', '2', '--', 'megapatch-no-such-program', '--flag']);
    expect(r.status).toBe(1);
    expect(oneLine(r.stderr)).toBe(
      'megapatch launch: cannot start the worker command "megapatch-no-such-program": no such program (ENOENT); check its name, that it is on PATH, or give its path',
    );
  });

  it('SIGTERM is forwarded to the workers and the launcher exits 143', async () => {
    const trap =
      "process.on('SIGTERM', () => { console.log('got SIGTERM'); process.exit(0); }); console.log('ready'); setTimeout(() => {}, 30000)";
    const child = startMegapatch(['launch', '--nproc-per-node', '2', '--', NODE, '-e', trap]);
    let ready = 0;
    child.stdout?.on('data', (d: Buffer) => {
      const lines = d.toString().split('\n');
      const before = ready;
      ready += lines.filter((l) => l.endsWith(': ready')).length;
      // Once only: a second signal would kill the workers.
      if (before < 2 && ready >= 2) child.kill('SIGTERM');
    });
    const r = await finished(child);
    expect(r.status).toBe(143);
    expect(r.stdout).toContain('[rank0]: got SIGTERM\n');
    expect(r.stdout).toContain('[rank1]: got SIGTERM\n');
    expect(oneLine(r.stderr)).toBe(
      'megapatch launch: interrupted by SIGTERM; forwarded it to the 2 worker(s)',
    );
  });

  it('a second SIGTERM ends the launcher at once, and its exit kills workers that ignored the first', async () => {
    const stubborn =
      "process.on('SIGTERM', () => console.log('ignoring SIGTERM')); console.log('ready ' + process.pid); setTimeout(() => {}, 30000)";
    const child = startMegapatch(['launch', '--nproc-per-node', '2', '--', NODE, '-e', stubborn]);
    const pids: number[] = [];
    let ignoring = 0;
    child.stdout?.on('data', (d: Buffer) => {
      for (const l of d.toString().split('\n')) {
        const m = /: ready (\d+)$/.exec(l);
        if (m && pids.push(Number(m[1])) === 2) child.kill('SIGTERM');
        if (l.endsWith(': ignoring SIGTERM') && ++ignoring === 2) child.kill('SIGTERM');
      }
    });
    const r = await finished(child);
    expect(r.status).toBe(143);
    expect(oneLine(r.stderr)).toBe('megapatch launch: interrupted by SIGTERM');
    expect(pids).toHaveLength(2);
    await waitFor(() => !pids.some(running), 5_000, 'the workers to be killed');
  });
});
