// Detail checks (checkCollectives: 'detail', MEGAPATCH_DIST_CHECKS=detail). Before a collective
// runs, on NCCL or on Gloo, the ranks of its group agree on what they are about to run: the
// collective, whether its tensors go through the device's library (NCCL) or through Gloo, the
// dtype, the element count, the reduction and the root. They do it as Gloo's own per-collective
// check does (native/src/group.cc, checkAgreement): one small all-reduce of the maximum of every
// word and of its negation over the group's Gloo control connections, after which every rank knows
// whether all agree. Ranks that disagree then gather each other's calls and all throw the same
// one-line MISMATCH, before anything is queued on the device. A send or receive on NCCL involves
// two ranks only, so each side sends its count and dtype to its peer over Gloo instead.
import { DTYPES, type DType, type Tensor } from '@megapatch/tensor';
import { DistributedError } from './errors.js';
import type { ReduceOp } from './process-group.js';

/**
 * How much the process groups check: `false` nothing; `true` (the default) Gloo's per-collective
 * record, so CPU collectives whose ranks disagree fail instead of corrupting memory; `'detail'`
 * also every NCCL collective and send/receive, and which path (NCCL or Gloo) each rank's tensors
 * take, at the price of a host round trip per operation.
 */
export type CollectiveChecks = boolean | 'detail';

/** MEGAPATCH_DIST_CHECKS: 0, 1 (the default) or detail. */
export function collectiveChecksFromEnv(): CollectiveChecks {
  const v = process.env.MEGAPATCH_DIST_CHECKS;
  if (v === undefined || v === '' || v === '1') return true;
  if (v === '0') return false;
  if (v.toLowerCase() === 'detail') return 'detail';
  throw new DistributedError(
    'INVALID_ENVIRONMENT',
    `MEGAPATCH_DIST_CHECKS=${v} must be 0 (no checks), 1 (Gloo's size checks, the default) or detail (also NCCL's, and the device path)`,
  );
}

/** Collectives that meet on the wire (allGather and allGatherIntoTensor are both an all-gather). */
export type CollectiveKind =
  | 'allReduce'
  | 'allGather'
  | 'reduceScatter'
  | 'broadcast'
  | 'allToAll'
  | 'barrier';
const KINDS: readonly CollectiveKind[] = [
  'allReduce',
  'allGather',
  'reduceScatter',
  'broadcast',
  'allToAll',
  'barrier',
];
const REDUCTIONS: readonly ReduceOp[] = ['sum', 'avg', 'max', 'min'];

/** One rank's side of a collective, as the detail check compares it. */
export interface CollectiveCall {
  /** The method called, e.g. 'allGatherIntoTensor'. */
  op: string;
  kind: CollectiveKind;
  /** The device of the tensors ('cpu', 'cuda:0'); '' for a barrier. */
  device: string;
  /** Whether the tensors go through the device's collective library (NCCL); else through Gloo. */
  nccl: boolean;
  dtype?: DType;
  /** Elements per rank: the all-reduced or broadcast tensor, the gathered input, the reduce-scattered output, an all-to-all row. */
  count?: number;
  reduce?: ReduceOp;
  root?: number;
  /** allToAll: rows sent to and received from each rank. */
  splits?: { ins: readonly number[]; outs: readonly number[] };
}

/** Who the group is, for messages. */
export interface GroupShape {
  readonly name: string;
  readonly rank: number;
  readonly size: number;
  readonly ranks: readonly number[];
}

/** Blocking host collectives over the group (its Gloo connections) that the checks run on. */
export interface HostExchange {
  /** The element-wise maximum over the group of `values` (the same length on every rank). */
  max(values: Float64Array): Float64Array;
  /** Every rank's `bytes` (the same length on every rank), in group rank order. */
  gather(bytes: Uint8Array): Uint8Array[];
}

/** The words every rank must agree on. */
function words(c: CollectiveCall): number[] {
  return [
    KINDS.indexOf(c.kind),
    c.nccl ? 1 : 0,
    c.dtype ? DTYPES.indexOf(c.dtype) : -1,
    c.count ?? -1,
    c.reduce ? REDUCTIONS.indexOf(c.reduce) : -1,
    c.root ?? -1,
  ];
}

// each rank's call travels as JSON in a fixed-size record, for the message only
const CALL_BYTES = 512;

function encode(c: CollectiveCall): Uint8Array {
  const { splits: _, ...rest } = c;
  const bytes = new Uint8Array(CALL_BYTES);
  bytes.set(new TextEncoder().encode(JSON.stringify(rest)).subarray(0, CALL_BYTES));
  return bytes;
}

function decode(bytes: Uint8Array): CollectiveCall {
  const end = bytes.indexOf(0);
  return JSON.parse(new TextDecoder().decode(end < 0 ? bytes : bytes.subarray(0, end))) as CollectiveCall;
}

/** 'rank 1', or 'rank 1 (global 5)' in a group whose ranks are not the global ones. */
function who(g: GroupShape, r: number): string {
  return g.ranks[r] === r ? `rank ${r}` : `rank ${r} (global ${g.ranks[r]})`;
}

function call(c: CollectiveCall): string {
  if (c.kind === 'barrier') return c.op;
  let s =
    c.kind === 'allToAll'
      ? `${c.op} of rows of ${c.count} x ${c.dtype}`
      : `${c.op} of ${c.count} x ${c.dtype}`;
  if (c.reduce) s += `, op ${c.reduce}`;
  if (c.root !== undefined) s += `, root ${c.root}`;
  return s;
}

const library = (c: CollectiveCall) => (c.nccl ? 'NCCL' : 'Gloo');
const deviceType = (c: CollectiveCall) => c.device.split(':')[0];

/** "rank 0 passed a cuda tensor (NCCL), rank 1 a cpu tensor (Gloo)", with the op when the ops differ. */
function paths(g: GroupShape, calls: readonly CollectiveCall[]): string {
  const ops = calls.some((c) => c.op !== calls[0].op);
  const parts = calls.map((c, r) => {
    const type = deviceType(c);
    const a = /^[aeiou]/.test(type) ? 'an' : 'a';
    return `${who(g, r)} ${r === 0 ? 'passed ' : ''}${a} ${type} tensor${ops ? ` to ${c.op}` : ''} (${library(c)})`;
  });
  const sameType = calls.every((c) => deviceType(c) === deviceType(calls[0]));
  const advice = sameType
    ? 'the ranks on Gloo move them through host copies: give every rank the device library (NCCL), or set MEGAPATCH_DEVICE_COLLECTIVES alike on every rank'
    : 'put the tensors on the same kind of device on every rank';
  return `${parts.join(', ')}; ${advice}`;
}

/** What differs between the ranks' calls, and each rank's call. */
function disagreement(g: GroupShape, calls: readonly CollectiveCall[]): string {
  const differ = (f: (c: CollectiveCall) => unknown) => calls.some((c) => f(c) !== f(calls[0]));
  if (differ((c) => c.kind)) {
    const shown = differ((c) => c.nccl);
    const list = calls.map(
      (c, r) =>
        `${who(g, r)}: ${call(c)}${shown && c.kind !== 'barrier' ? ` on ${c.device} (${library(c)})` : ''}`,
    );
    return `ranks called different collectives: ${list.join('; ')}`;
  }
  if (differ((c) => c.nccl)) return paths(g, calls);
  const fields: string[] = [];
  if (differ((c) => c.dtype)) fields.push('dtype');
  if (differ((c) => c.count)) fields.push(calls[0].kind === 'allToAll' ? 'row size' : 'element count');
  if (differ((c) => c.reduce)) fields.push('reduction');
  if (differ((c) => c.root)) fields.push('root');
  const named = fields.map((f) => `the ${f}`);
  const what = named.length > 1 ? `${named.slice(0, -1).join(', ')} and ${named.at(-1)}` : named[0];
  return `ranks differ in ${what}: ${calls.map((c, r) => `${who(g, r)}: ${call(c)}`).join('; ')}`;
}

/**
 * Every rank of `g` passes its side of the same collective; returns when all agree, else every
 * rank throws the same one-line DistributedError('MISMATCH') naming the op, the group, what
 * differs and each rank's call. For an all-to-all on NCCL, the split sizes are checked against
 * each other too (Gloo's own check does that on the Gloo path).
 */
export function agreeOnCall(g: GroupShape, c: CollectiveCall, exchange: HostExchange): void {
  if (g.size < 2) return;
  const mine = words(c);
  const n = mine.length;
  const record = new Float64Array(2 * n);
  mine.forEach((w, k) => {
    record[k] = w;
    record[n + k] = -w;
  });
  const top = exchange.max(record);
  let same = true;
  for (let k = 0; k < n; k++) if (top[k] !== -top[n + k]) same = false;
  if (!same) {
    const calls = exchange.gather(encode(c)).map(decode);
    throw new DistributedError('MISMATCH', `${c.op} on group '${g.name}': ${disagreement(g, calls)}`);
  }
  if (c.kind === 'allToAll' && c.nccl && c.splits) agreeOnSplits(g, c, c.splits, exchange);
}

/** Rank src's inputSplitSizes[dst] must be rank dst's outputSplitSizes[src], for every pair. */
function agreeOnSplits(
  g: GroupShape,
  c: CollectiveCall,
  splits: NonNullable<CollectiveCall['splits']>,
  exchange: HostExchange,
): void {
  const n = g.size;
  // each rank fills its own rows; the counts are never negative, so the maximum gathers them
  const rows = new Float64Array(2 * n * n);
  splits.ins.forEach((x, j) => {
    rows[g.rank * n + j] = x;
  });
  splits.outs.forEach((x, j) => {
    rows[n * n + g.rank * n + j] = x;
  });
  const all = exchange.max(rows);
  for (let src = 0; src < n; src++) {
    for (let dst = 0; dst < n; dst++) {
      const sends = all[src * n + dst];
      const expects = all[n * n + dst * n + src];
      if (sends !== expects) {
        throw new DistributedError(
          'MISMATCH',
          `${c.op} on group '${g.name}': ${who(g, src)} sends ${sends} row${sends === 1 ? '' : 's'} to ${who(g, dst)}, whose outputSplitSizes[${src}] is ${expects}`,
        );
      }
    }
  }
}

/**
 * The detail check of a send or receive on NCCL: `post` sends this rank's side of a transfer to
 * `peer` and starts receiving the peer's side of the matching transfer (transfers between two
 * ranks match in issue order, per direction, as NCCL's do); the function it returns waits for the
 * peer's side and throws DistributedError('MISMATCH') when the count or dtype differ.
 */
export interface PeerCheck {
  post(op: string, kind: 'send' | 'recv', peer: number, tensor: Tensor): () => void;
}

/** This rank's side of a transfer: [dtype, element count]. */
export function transferSide(t: Tensor): Float64Array {
  return Float64Array.of(DTYPES.indexOf(t.dtype), t.numel);
}

/** Throws MISMATCH, naming both sides, unless the peer's side `theirs` matches `t`. */
export function compareTransfer(
  g: GroupShape,
  op: string,
  kind: 'send' | 'recv',
  peer: number,
  t: Tensor,
  theirs: Float64Array,
): void {
  const [dtype, count] = theirs;
  if (dtype === DTYPES.indexOf(t.dtype) && count === t.numel) return;
  const mine = `${t.numel} x ${t.dtype}`;
  const other = `${count} x ${DTYPES[dtype] ?? '?'}`;
  const [src, dst, sent, received] =
    kind === 'send' ? [g.rank, peer, mine, other] : [peer, g.rank, other, mine];
  throw new DistributedError(
    'MISMATCH',
    `${op} on group '${g.name}': ${who(g, src)} sends ${sent} to ${who(g, dst)}, which receives ${received} from it; both sides of a transfer need the same element count and dtype`,
  );
}
