// NCCL for one device of the backend (native/src/backend/nccl.cc): what @megapatch/parallel's
// process groups use for this device's tensors. The library is loaded on first use; a GPU
// machine without it keeps working, its groups moving device tensors through host copies.
import type { DeviceCollectives, DeviceCommunicator, DeviceReduceOp, Tensor } from '@megapatch/tensor';
import { DTYPE_CODES } from '@megapatch/tensor/abi';
import type { BackendAddon } from './native.js';
import { address, type Entries, pack } from './pack.js';

// ncclRedOp_t
const OPS: Record<DeviceReduceOp, number> = { sum: 0, max: 2, min: 3, avg: 4 };

interface NcclAddon {
  ncclLibrary(): { version?: string; error?: string };
  ncclUniqueId(): Uint8Array;
  ncclCommInit(id: Uint8Array, size: number, rank: number): number;
  ncclCommDestroy(handle: number, abort: boolean): void;
  ncclAsyncError(handle: number): string;
}

/** The NCCL library this addon can use: its version, or why there is none. */
export function ncclLibrary(addon: BackendAddon): { version?: string; error?: string } {
  const a = addon as unknown as Partial<NcclAddon>;
  if (typeof a.ncclLibrary !== 'function')
    return { error: 'this build of @megapatch/cuda has no NCCL entries' };
  return a.ncclLibrary();
}

/** Throws unless `t` is a contiguous tensor of this device. */
function checkTensor(op: string, t: Tensor, device: string): void {
  t.checkAlive(op);
  if (t.device !== device) throw new Error(`${op}: ${t.describe()} is not on ${device}`);
  if (!t.isContiguous) throw new Error(`${op}: ${t.describe()} is not contiguous`);
}

function sameDtype(op: string, a: Tensor, b: Tensor, count: number): void {
  if (a.dtype !== b.dtype) throw new Error(`${op}: ${a.describe()} and ${b.describe()} differ in dtype`);
  if (b.numel !== count) throw new Error(`${op}: ${b.describe()} must have ${count} element(s)`);
}

/**
 * The collectives of device `device` (e.g. 'cuda:0'), or null when NCCL cannot be loaded. `on`
 * makes the device current before each call, as every entry of the backend does.
 */
export function createCollectives(
  addon: BackendAddon,
  device: string,
  on: () => void,
): DeviceCollectives | null {
  const lib = ncclLibrary(addon);
  if (!lib.version) return null;
  const nc = addon as unknown as NcclAddon;
  const call = addon as unknown as Entries;
  const buf = (t: Tensor) => pack.num(address(t)).num(t.numel).num(DTYPE_CODES[t.dtype]);
  return {
    name: `nccl ${lib.version}`,
    idBytes: 128,
    uniqueId: () => nc.ncclUniqueId(),
    connect(id, size, rank): DeviceCommunicator {
      on();
      let handle: number | null = nc.ncclCommInit(id, size, rank);
      const live = (op: string): number => {
        if (handle === null) throw new Error(`${op}: the NCCL communicator was destroyed`);
        on();
        return handle;
      };
      return {
        allReduce(send, recv, op) {
          const h = live('allReduce');
          checkTensor('allReduce', send, device);
          checkTensor('allReduce', recv, device);
          sameDtype('allReduce', send, recv, send.numel);
          pack.begin().num(h);
          buf(send).num(address(recv)).num(OPS[op]);
          call.ncclAllReduce();
        },
        broadcast(send, recv, root) {
          const h = live('broadcast');
          checkTensor('broadcast', send, device);
          checkTensor('broadcast', recv, device);
          sameDtype('broadcast', send, recv, send.numel);
          pack.begin().num(h);
          buf(send).num(address(recv)).num(root);
          call.ncclBroadcast();
        },
        allGather(send, recv) {
          const h = live('allGather');
          checkTensor('allGather', send, device);
          checkTensor('allGather', recv, device);
          sameDtype('allGather', send, recv, send.numel * size);
          pack.begin().num(h);
          buf(send).num(address(recv));
          call.ncclAllGather();
        },
        reduceScatter(send, recv, op) {
          const h = live('reduceScatter');
          checkTensor('reduceScatter', send, device);
          checkTensor('reduceScatter', recv, device);
          sameDtype('reduceScatter', recv, send, recv.numel * size);
          pack.begin().num(h);
          buf(recv).num(address(send)).num(OPS[op]);
          call.ncclReduceScatter();
        },
        sendRecv(ops) {
          const h = live('sendRecv');
          for (const o of ops) {
            checkTensor(o.kind, o.tensor, device);
            if (!Number.isInteger(o.peer) || o.peer < 0 || o.peer >= size) {
              throw new Error(`${o.kind}: peer ${o.peer} is not a rank of the communicator (size ${size})`);
            }
          }
          pack.begin().num(h).num(ops.length);
          for (const o of ops) {
            pack.num(o.kind === 'send' ? 0 : 1).num(o.peer);
            buf(o.tensor);
          }
          call.ncclSendRecv();
        },
        asyncError() {
          return handle === null ? '' : nc.ncclAsyncError(live('asyncError'));
        },
        destroy(abort = false) {
          if (handle === null) return;
          const h = handle;
          handle = null;
          on();
          nc.ncclCommDestroy(h, abort);
        },
      };
    },
  };
}
