// Python's pickle format, as far as torch.save files need it: a reader of the binary opcodes of
// protocols 1-5 and a protocol-2 writer (torch.save's default). Opcode meanings follow CPython's
// pickletools documentation.
import { ConvertError } from '../errors.js';

/** A Python object of a class the reader does not map: module.name, the arguments it was built with, the state BUILD set. */
export class PyObject {
  /** What APPENDS / SETITEMS added, for instances of list or dict subclasses. */
  declare items?: unknown[] | Map<unknown, unknown>;
  constructor(
    readonly module: string,
    readonly name: string,
    readonly args: unknown[] = [],
    public state: unknown = undefined,
  ) {}
}

/** A reference to a Python global (a class or a value such as torch.bfloat16). */
export class PyGlobal {
  constructor(
    readonly module: string,
    readonly name: string,
  ) {}
}

/** Writes a Python tuple (JS arrays are written as lists). Reading gives tuples as frozen JS arrays. */
export class PyTuple {
  constructor(readonly items: readonly unknown[]) {}
}

/** Writes a Python float even when the value is integral (3.0). Reading gives floats as plain numbers. */
export class PyFloat {
  constructor(readonly value: number) {}
}

/** Hooks of {@link unpickle}. */
export interface UnpickleOptions {
  /** A JS function standing for a Python global (called by REDUCE / NEWOBJ), or undefined for the default. */
  findClass?(module: string, name: string): ((...args: unknown[]) => unknown) | undefined;
  /** The object a persistent id (BINPERSID) stands for; without it a persistent id is an error. */
  persistentLoad?(pid: unknown): unknown;
}

/** Hooks of {@link pickle}. */
export interface PickleOptions {
  /** A value to write as a persistent id (BINPERSID) in place of `value`, or undefined to write `value` itself. */
  persistentId?(value: unknown): unknown | undefined;
}

const OP = {
  MARK: 0x28,
  STOP: 0x2e,
  POP: 0x30,
  POP_MARK: 0x31,
  DUP: 0x32,
  BINBYTES: 0x42,
  SHORT_BINBYTES: 0x43,
  BINFLOAT: 0x47,
  BININT: 0x4a,
  BININT1: 0x4b,
  BININT2: 0x4d,
  NONE: 0x4e,
  BINPERSID: 0x51,
  REDUCE: 0x52,
  BINSTRING: 0x54,
  SHORT_BINSTRING: 0x55,
  BINUNICODE: 0x58,
  EMPTY_LIST: 0x5d,
  APPEND: 0x61,
  BUILD: 0x62,
  GLOBAL: 0x63,
  DICT: 0x64,
  APPENDS: 0x65,
  BINGET: 0x68,
  LONG_BINGET: 0x6a,
  LIST: 0x6c,
  BINPUT: 0x71,
  LONG_BINPUT: 0x72,
  SETITEM: 0x73,
  TUPLE: 0x74,
  SETITEMS: 0x75,
  EMPTY_TUPLE: 0x29,
  EMPTY_DICT: 0x7d,
  PROTO: 0x80,
  NEWOBJ: 0x81,
  TUPLE1: 0x85,
  TUPLE2: 0x86,
  TUPLE3: 0x87,
  NEWTRUE: 0x88,
  NEWFALSE: 0x89,
  LONG1: 0x8a,
  LONG4: 0x8b,
  SHORT_BINUNICODE: 0x8c,
  BINUNICODE8: 0x8d,
  BINBYTES8: 0x8e,
  EMPTY_SET: 0x8f,
  ADDITEMS: 0x90,
  FROZENSET: 0x91,
  NEWOBJ_EX: 0x92,
  STACK_GLOBAL: 0x93,
  MEMOIZE: 0x94,
  FRAME: 0x95,
  BYTEARRAY8: 0x96,
} as const;

const bad = (message: string) => new ConvertError('CORRUPT_FILE', `pickle: ${message}`);
const utf8 = new TextDecoder('utf-8');

function latin1Bytes(s: string): Uint8Array {
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c > 0xff) throw bad(`_codecs.encode: ${JSON.stringify(s.slice(i, i + 8))} is not latin-1`);
    out[i] = c;
  }
  return out;
}

/** Python's bytes() / bytearray() / _codecs.encode() arguments as bytes. */
function toBytes(x: unknown = new Uint8Array(0), encoding: unknown = 'latin1'): Uint8Array {
  if (x instanceof Uint8Array) return x.slice();
  if (Array.isArray(x)) return Uint8Array.from(x as number[]);
  if (typeof x !== 'string') throw bad(`cannot make bytes of ${typeof x}`);
  const enc = String(encoding).toLowerCase().replace(/[-_]/g, '');
  if (enc === 'latin1' || enc === 'iso88591') return latin1Bytes(x);
  if (enc === 'utf8') return new TextEncoder().encode(x);
  throw bad(`_codecs.encode with encoding ${JSON.stringify(encoding)} is not supported`);
}

// Globals every reader needs: containers, and how protocol 2 writes bytes and sets.
const DEFAULT_CLASSES: Record<string, (...args: unknown[]) => unknown> = {
  'collections.OrderedDict': (items) => new Map((items ?? []) as Iterable<[unknown, unknown]>),
  'collections.defaultdict': () => new Map(),
  'builtins.set': (items) => new Set((items ?? []) as Iterable<unknown>),
  'builtins.frozenset': (items) => new Set((items ?? []) as Iterable<unknown>),
  'builtins.bytes': (x, enc) => toBytes(x, enc),
  'builtins.bytearray': (x, enc) => toBytes(x, enc),
  '_codecs.encode': (x, enc) => toBytes(x, enc),
  // Python 3.11 pickles enum members as getattr(EnumClass, 'MEMBER').
  'builtins.getattr': (obj, name) =>
    obj instanceof PyGlobal
      ? new PyGlobal(obj.module, `${obj.name}.${name}`)
      : new PyObject('builtins', 'getattr', [obj, name]),
  'copyreg._reconstructor': (cls, _base, state) => call(cls, state == null ? [] : [state]),
};
const MODULE_ALIASES: Record<string, string> = { __builtin__: 'builtins', copy_reg: 'copyreg' };

function call(fn: unknown, args: readonly unknown[]): unknown {
  if (typeof fn === 'function') return fn(...args);
  if (fn instanceof PyGlobal) return new PyObject(fn.module, fn.name, [...args]);
  throw bad(`cannot call ${typeof fn} as a class or function`);
}

/**
 * Reads one pickle (the binary opcodes of protocols 1-5). None → null, int → number (bigint
 * beyond 2^53), float → number, str → string, bytes / bytearray → Uint8Array, list → Array,
 * tuple → frozen Array, dict and OrderedDict → Map, set / frozenset → Set, a global → PyGlobal
 * (or what `findClass` gives), an instance of any other class → PyObject.
 */
export function unpickle(data: Uint8Array, opts: UnpickleOptions = {}): unknown {
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const stack: unknown[] = [];
  const marks: number[] = [];
  const memo = new Map<number, unknown>();
  let pos = 0;

  const take = (n: number): number => {
    if (!Number.isSafeInteger(n) || n < 0 || pos + n > data.byteLength) {
      throw bad(`ends inside an opcode at byte ${pos} (need ${n} more bytes)`);
    }
    pos += n;
    return pos - n;
  };
  const u8 = () => data[take(1)];
  const u16 = () => view.getUint16(take(2), true);
  const u32 = () => view.getUint32(take(4), true);
  const u64 = () => Number(view.getBigUint64(take(8), true));
  const bytes = (n: number) => data.slice(take(n), pos);
  const text = (n: number) => utf8.decode(data.subarray(take(n), pos));
  const line = () => {
    const end = data.indexOf(0x0a, pos);
    if (end < 0) throw bad(`unterminated line at byte ${pos}`);
    return text(end - pos + 1).slice(0, -1);
  };
  const long = (n: number): number | bigint => {
    const b = data.subarray(take(n), pos);
    let v = 0n;
    for (let i = n - 1; i >= 0; i--) v = (v << 8n) | BigInt(b[i]);
    if (n > 0 && b[n - 1] & 0x80) v -= 1n << BigInt(8 * n);
    return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
  };
  const pop = () => {
    if (stack.length === 0 || stack.length === marks[marks.length - 1])
      throw bad(`stack underflow at byte ${pos}`);
    return stack.pop();
  };
  const popMark = () => {
    const m = marks.pop();
    if (m === undefined) throw bad(`no MARK before byte ${pos}`);
    return stack.splice(m);
  };
  const top = () => {
    if (stack.length === 0) throw bad(`stack underflow at byte ${pos}`);
    return stack[stack.length - 1];
  };
  const get = (i: number) => {
    if (!memo.has(i)) throw bad(`memo key ${i} is not set (byte ${pos})`);
    return memo.get(i);
  };
  const resolve = (module: unknown, name: unknown) => {
    if (typeof module !== 'string' || typeof name !== 'string') throw bad(`bad global name at byte ${pos}`);
    const mod = MODULE_ALIASES[module] ?? module;
    return opts.findClass?.(mod, name) ?? DEFAULT_CLASSES[`${mod}.${name}`] ?? new PyGlobal(mod, name);
  };
  const setItems = (target: unknown, kv: unknown[]) => {
    const map = target instanceof PyObject ? (target.items ??= new Map()) : target;
    if (!(map instanceof Map)) throw bad(`SETITEMS on a non-dict at byte ${pos}`);
    for (let i = 0; i + 1 < kv.length; i += 2) map.set(kv[i], kv[i + 1]);
  };
  const append = (target: unknown, items: unknown[]) => {
    const list = target instanceof PyObject ? (target.items ??= []) : target;
    if (!Array.isArray(list) || Object.isFrozen(list)) throw bad(`APPENDS on a non-list at byte ${pos}`);
    for (const x of items) list.push(x);
  };

  const tupleOf = (n: number) => {
    if (stack.length - n < (marks[marks.length - 1] ?? 0)) throw bad(`stack underflow at byte ${pos}`);
    stack.push(Object.freeze(stack.splice(stack.length - n)));
  };
  const callWith = (fn: unknown, args: unknown) => {
    if (!Array.isArray(args)) throw bad(`arguments before byte ${pos} are not a tuple`);
    stack.push(call(fn, args));
  };
  const push = (v: unknown) => {
    stack.push(v);
  };
  const handlers: Record<number, () => void> = {
    [OP.PROTO]: () => {
      const v = u8();
      if (v > 5) throw new ConvertError('UNSUPPORTED', `pickle: protocol ${v} is newer than 5`);
    },
    [OP.FRAME]: () => take(8),
    [OP.MARK]: () => marks.push(stack.length),
    [OP.POP]: () => pop(),
    [OP.POP_MARK]: () => popMark(),
    [OP.DUP]: () => push(top()),
    [OP.NONE]: () => push(null),
    [OP.NEWTRUE]: () => push(true),
    [OP.NEWFALSE]: () => push(false),
    [OP.BININT]: () => push(view.getInt32(take(4), true)),
    [OP.BININT1]: () => push(u8()),
    [OP.BININT2]: () => push(u16()),
    [OP.LONG1]: () => push(long(u8())),
    [OP.LONG4]: () => push(long(view.getInt32(take(4), true))),
    [OP.BINFLOAT]: () => push(view.getFloat64(take(8), false)),
    // Python 2 str (BINSTRING) reads as text, as torch.load's default encoding='utf-8' does.
    [OP.SHORT_BINSTRING]: () => push(text(u8())),
    [OP.BINSTRING]: () => push(text(view.getInt32(take(4), true))),
    [OP.SHORT_BINUNICODE]: () => push(text(u8())),
    [OP.BINUNICODE]: () => push(text(u32())),
    [OP.BINUNICODE8]: () => push(text(u64())),
    [OP.SHORT_BINBYTES]: () => push(bytes(u8())),
    [OP.BINBYTES]: () => push(bytes(u32())),
    [OP.BINBYTES8]: () => push(bytes(u64())),
    [OP.BYTEARRAY8]: () => push(bytes(u64())),
    [OP.EMPTY_LIST]: () => push([]),
    [OP.EMPTY_DICT]: () => push(new Map()),
    [OP.EMPTY_SET]: () => push(new Set()),
    [OP.EMPTY_TUPLE]: () => push(Object.freeze([])),
    [OP.TUPLE1]: () => tupleOf(1),
    [OP.TUPLE2]: () => tupleOf(2),
    [OP.TUPLE3]: () => tupleOf(3),
    [OP.TUPLE]: () => push(Object.freeze(popMark())),
    [OP.LIST]: () => push(popMark()),
    [OP.DICT]: () => {
      const kv = popMark();
      push(new Map());
      setItems(top(), kv);
    },
    [OP.FROZENSET]: () => push(new Set(popMark())),
    [OP.APPEND]: () => {
      const v = pop();
      append(top(), [v]);
    },
    [OP.APPENDS]: () => {
      const items = popMark();
      append(top(), items);
    },
    [OP.SETITEM]: () => {
      const v = pop();
      const k = pop();
      setItems(top(), [k, v]);
    },
    [OP.SETITEMS]: () => {
      const kv = popMark();
      setItems(top(), kv);
    },
    [OP.ADDITEMS]: () => {
      const items = popMark();
      const set = top();
      if (!(set instanceof Set)) throw bad(`ADDITEMS on a non-set before byte ${pos}`);
      for (const x of items) set.add(x);
    },
    [OP.BINPUT]: () => memo.set(u8(), top()),
    [OP.LONG_BINPUT]: () => memo.set(u32(), top()),
    [OP.MEMOIZE]: () => memo.set(memo.size, top()),
    [OP.BINGET]: () => push(get(u8())),
    [OP.LONG_BINGET]: () => push(get(u32())),
    [OP.GLOBAL]: () => {
      const module = line();
      push(resolve(module, line()));
    },
    [OP.STACK_GLOBAL]: () => {
      const name = pop();
      push(resolve(pop(), name));
    },
    [OP.REDUCE]: () => {
      const args = pop();
      callWith(pop(), args);
    },
    [OP.NEWOBJ]: () => {
      const args = pop();
      callWith(pop(), args);
    },
    [OP.NEWOBJ_EX]: () => {
      pop(); // keyword arguments: no class this reader builds takes any
      const args = pop();
      callWith(pop(), args);
    },
    [OP.BUILD]: () => {
      const state = pop();
      const obj = top();
      // Objects the reader maps to JS values (tensors, Maps) keep their mapped form.
      if (obj instanceof PyObject) obj.state = state;
    },
    [OP.BINPERSID]: () => {
      const pid = pop();
      if (!opts.persistentLoad) throw bad(`persistent id before byte ${pos} but no persistentLoad`);
      push(opts.persistentLoad(pid));
    },
  };

  for (;;) {
    const at = pos;
    const op = u8();
    if (op === OP.STOP) return pop();
    const handler = handlers[op];
    if (!handler) {
      throw new ConvertError(
        'UNSUPPORTED',
        `pickle: opcode 0x${op.toString(16)} (${JSON.stringify(String.fromCharCode(op))}) at byte ${at} is not supported`,
      );
    }
    handler();
  }
}

/** A growable byte buffer. */
class Out {
  private buf = new Uint8Array(1 << 12);
  private view = new DataView(this.buf.buffer);
  length = 0;
  /** Reserves n bytes and returns where they start; may replace buf and view, so call it before reading them. */
  private room(n: number): number {
    if (this.length + n > this.buf.length) {
      const bigger = new Uint8Array(Math.max(this.buf.length * 2, this.length + n));
      bigger.set(this.buf.subarray(0, this.length));
      this.buf = bigger;
      this.view = new DataView(bigger.buffer);
    }
    this.length += n;
    return this.length - n;
  }
  u8(...xs: number[]) {
    const at = this.room(xs.length);
    this.buf.set(xs, at);
  }
  u16(x: number) {
    const at = this.room(2);
    this.view.setUint16(at, x, true);
  }
  i32(x: number) {
    const at = this.room(4);
    this.view.setInt32(at, x, true);
  }
  u32(x: number) {
    const at = this.room(4);
    this.view.setUint32(at, x, true);
  }
  f64(x: number) {
    const at = this.room(8);
    this.view.setFloat64(at, x, false);
  }
  bytes(b: Uint8Array) {
    const at = this.room(b.byteLength);
    this.buf.set(b, at);
  }
  result(): Uint8Array {
    return this.buf.slice(0, this.length);
  }
}

const isPlainObject = (v: object) => [Object.prototype, null].includes(Object.getPrototypeOf(v));

/**
 * Writes `value` as a protocol-2 pickle (what torch.save writes). Objects are memoized, so a
 * value referenced twice is written once and unpickles as one object.
 */
export function pickle(value: unknown, opts: PickleOptions = {}): Uint8Array {
  const out = new Out();
  const memo = new Map<unknown, number>();
  const globals = new Map<string, number>();
  const utf8Encoder = new TextEncoder();

  let next = 0;
  const put = (key: unknown, map: Map<unknown, number> = memo) => {
    const i = next++;
    map.set(key, i);
    if (i < 256) out.u8(OP.BINPUT, i);
    else {
      out.u8(OP.LONG_BINPUT);
      out.u32(i);
    }
  };
  const getMemo = (i: number) => {
    if (i < 256) out.u8(OP.BINGET, i);
    else {
      out.u8(OP.LONG_BINGET);
      out.u32(i);
    }
  };
  const str = (s: string) => {
    const b = utf8Encoder.encode(s);
    out.u8(OP.BINUNICODE);
    out.u32(b.byteLength);
    out.bytes(b);
  };
  const int = (v: number | bigint) => {
    if (v >= 0 && v < 0x100) out.u8(OP.BININT1, Number(v));
    else if (v >= 0 && v < 0x10000) {
      out.u8(OP.BININT2);
      out.u16(Number(v));
    } else if (v >= -0x80000000 && v < 0x80000000) {
      out.u8(OP.BININT);
      out.i32(Number(v));
    } else {
      // LONG1: little-endian two's complement, as few bytes as keep the sign.
      const b: number[] = [];
      let x = BigInt(v);
      do {
        b.push(Number(x & 0xffn));
        x >>= 8n;
      } while (!((x === 0n && !(b[b.length - 1] & 0x80)) || (x === -1n && b[b.length - 1] & 0x80)));
      out.u8(OP.LONG1, b.length, ...b);
    }
  };
  // Protocol 2 has no dotted global names; Python reaches A.B (an enum member) as getattr(A, 'B').
  const global = (module: string, name: string) => {
    const key = `${module}\n${name}`;
    const seen = globals.get(key);
    if (seen !== undefined) return getMemo(seen);
    const dot = name.lastIndexOf('.');
    if (dot < 0) out.bytes(utf8Encoder.encode(`c${module}\n${name}\n`));
    else {
      global('builtins', 'getattr');
      global(module, name.slice(0, dot));
      str(name.slice(dot + 1));
      out.u8(OP.TUPLE2, OP.REDUCE);
    }
    put(key, globals);
  };
  const tuple = (items: readonly unknown[]) => {
    if (items.length > 3) out.u8(OP.MARK);
    for (const x of items) save(x);
    out.u8(items.length === 0 ? OP.EMPTY_TUPLE : items.length > 3 ? OP.TUPLE : OP.TUPLE1 + items.length - 1);
  };

  const float = (x: number) => {
    out.u8(OP.BINFLOAT);
    out.f64(x);
  };

  function save(v: unknown, usePid = true): void {
    const pid = usePid ? opts.persistentId?.(v) : undefined;
    if (pid !== undefined) {
      save(pid, false);
      out.u8(OP.BINPERSID);
    } else if (v === null || v === undefined) out.u8(OP.NONE);
    else if (typeof v === 'boolean') out.u8(v ? OP.NEWTRUE : OP.NEWFALSE);
    else if (typeof v === 'bigint' || (Number.isSafeInteger(v) && !Object.is(v, -0)))
      int(v as number | bigint);
    else if (typeof v === 'number') float(v);
    else if (v instanceof PyFloat) float(v.value);
    else if (typeof v === 'string') str(v);
    else if (typeof v !== 'object')
      throw new ConvertError('INVALID_ARGUMENT', `pickle: cannot write a ${typeof v}`);
    else if (memo.has(v)) getMemo(memo.get(v)!);
    else saveObject(v);
  }
  function saveObject(v: object): void {
    if (v instanceof PyGlobal) global(v.module, v.name);
    else if (v instanceof Uint8Array) {
      global('_codecs', 'encode');
      str(Buffer.from(v.buffer, v.byteOffset, v.byteLength).toString('latin1'));
      str('latin1');
      out.u8(OP.TUPLE2, OP.REDUCE);
      put(v);
    } else if (v instanceof PyTuple || (Array.isArray(v) && Object.isFrozen(v))) {
      tuple(v instanceof PyTuple ? v.items : v);
      put(v);
    } else if (Array.isArray(v)) {
      out.u8(OP.EMPTY_LIST);
      put(v);
      appends(v);
    } else if (v instanceof Map || isPlainObject(v)) {
      out.u8(OP.EMPTY_DICT);
      put(v);
      setItems(v instanceof Map ? v : new Map(Object.entries(v)));
    } else if (v instanceof Set) {
      global('builtins', 'set');
      out.u8(OP.EMPTY_LIST);
      appends([...v]);
      out.u8(OP.TUPLE1, OP.REDUCE);
      put(v);
    } else if (v instanceof PyObject) {
      global(v.module, v.name);
      tuple(v.args);
      out.u8(OP.REDUCE);
      put(v);
      if (Array.isArray(v.items)) appends(v.items);
      else if (v.items) setItems(v.items);
      if (v.state !== undefined) {
        save(v.state);
        out.u8(OP.BUILD);
      }
    } else {
      throw new ConvertError('INVALID_ARGUMENT', `pickle: cannot write a ${v.constructor?.name ?? 'object'}`);
    }
  }
  function appends(items: readonly unknown[]) {
    if (items.length === 0) return;
    out.u8(OP.MARK);
    for (const x of items) save(x);
    out.u8(OP.APPENDS);
  }
  function setItems(map: ReadonlyMap<unknown, unknown>) {
    if (map.size === 0) return;
    out.u8(OP.MARK);
    for (const [k, x] of map) {
      save(k);
      save(x);
    }
    out.u8(OP.SETITEMS);
  }

  out.u8(OP.PROTO, 2);
  save(value);
  out.u8(OP.STOP);
  return out.result();
}
