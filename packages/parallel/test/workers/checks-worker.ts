// Detail checks on the NCCL path (run with MEGAPATCH_DIST_CHECKS=detail, 2 processes, tensors on the
// emulated CUDA devices): ranks that disagree on a collective or a transfer must all fail with one
// line, quickly, with nothing queued. Prints one `RESULT {"case", "code", "message", "ms",
// "unchanged"}` per case; the group survives each failure, so the cases run one after another.
//   argv[2] = 'all': the mismatches after a matched collective has joined the communicator;
//   argv[2] = 'path-first': a cuda-vs-cpu mismatch as the first collective (before any NCCL setup).
import { fromTypedArray, setDefaultDevice, type Tensor } from '@megapatch/tensor';
import { destroyProcessGroup, initProcessGroup } from '../../src/distributed.js';
import type { DistributedError } from '../../src/errors.js';
import type { GlooProcessGroup } from '../../src/gloo.js';
import { batchIsendIrecv, type P2POp } from '../../src/process-group.js';

await import('@megapatch/cuda/emulator');
const device = `cudaemu:${process.env.LOCAL_RANK ?? 0}`;
setDefaultDevice(device);
const mode = process.argv[2] ?? 'all';

const g = (await initProcessGroup({ timeoutMs: 60_000 })) as GlooProcessGroup;
const { rank } = g;
const mine = <T>(r0: T, r1: T): T => (rank === 0 ? r0 : r1);

const values = (t: Tensor) => Array.from(t.toTypedArray() as ArrayLike<number>, Number);
function filled(n: number, opts: { dtype?: 'float32' | 'float64'; device?: string } = {}): Tensor {
  const data = Float64Array.from({ length: n }, (_, i) => rank * 100 + i);
  return fromTypedArray(data, [n], { device: opts.device ?? device }).to(opts.dtype ?? 'float32');
}

/** Runs `run` (which must throw on every rank) and reports the error and whether `t` kept its values. */
function expectFailure(name: string, watched: Tensor[], run: () => void): void {
  const before = watched.map(values);
  const t0 = Date.now();
  let err: DistributedError | null = null;
  try {
    run();
  } catch (e) {
    err = e as DistributedError;
  }
  const ms = Date.now() - t0;
  const unchanged = watched.every((t, i) => JSON.stringify(values(t)) === JSON.stringify(before[i]));
  console.log(
    `RESULT ${JSON.stringify({ case: name, code: err?.code ?? null, message: err?.message ?? null, ms, unchanged })}`,
  );
}

if (mode === 'path-first') {
  const t = filled(4, { device: mine(device, 'cpu') });
  expectFailure('path-first', [t], () => g.allReduce(t).waitSync());
} else {
  // a matched collective joins the communicator, so the cases below run where NCCL would hang
  const joined = filled(3);
  g.allReduce(joined).waitSync();
  console.log(
    `RESULT ${JSON.stringify({ case: 'joined', values: values(joined), library: g.collectivesFor(device) })}`,
  );

  const sized = filled(mine(10, 12));
  expectFailure('size', [sized], () => g.allReduce(sized).waitSync());

  const typed = filled(10, { dtype: mine('float32', 'float64') });
  expectFailure('dtype', [typed], () => g.allReduce(typed).waitSync());

  const reduced = filled(10);
  expectFailure('reduce', [reduced], () => g.allReduce(reduced, mine('sum', 'max')).waitSync());

  const broadcast = filled(10);
  expectFailure('root', [broadcast], () => g.broadcast(broadcast, mine(0, 1)).waitSync());

  const pathed = filled(4, { device: mine(device, 'cpu') });
  expectFailure('path', [pathed], () => g.allReduce(pathed).waitSync());

  // rank 1 sends one row to rank 0, which expects two from it
  const out = filled(mine(3, 2) * 2).view(-1, 2);
  expectFailure('allToAll', [out], () =>
    g.allToAll(out, filled(4).view(2, 2), mine([1, 2], [1, 1]), [1, 1]).waitSync(),
  );

  // transfers: rank 0 sends 5 elements, rank 1 receives 4, in a batch and as single operations
  const recvBatch = filled(4);
  expectFailure('batchIsendIrecv', mine([], [recvBatch]), () => {
    const op: P2POp = mine(
      { op: 'isend', tensor: filled(5), peer: 1 },
      { op: 'irecv', tensor: recvBatch, peer: 0 },
    );
    for (const w of batchIsendIrecv(g, [op])) w.waitSync();
  });
  const recvSingle = filled(4);
  expectFailure('send/recv', mine([], [recvSingle]), () =>
    mine(
      () => g.send(filled(5), 1),
      () => g.recv(recvSingle, 0),
    )().waitSync(),
  );

  // the group is still usable: matched operations run, in both directions at once
  const after = filled(3);
  g.allReduce(after).waitSync();
  const from = filled(3);
  for (const w of batchIsendIrecv(g, [
    { op: 'isend', tensor: filled(3), peer: 1 - rank },
    { op: 'irecv', tensor: from, peer: 1 - rank },
  ]))
    w.waitSync();
  console.log(`RESULT ${JSON.stringify({ case: 'after', values: values(after), received: values(from) })}`);
}

g.barrier().waitSync();
await destroyProcessGroup();
