// nn.Module: a tree of modules owning parameters and buffers, addressed by dotted names
// ('layers.0.attn.weight'), with train/eval mode and state-dict checkpointing (PyTorch's
// contract, camelCased). A module owns its tensors: they are kept out of tidy() scopes and freed
// by dispose().
import { noGrad } from '../autograd/graph.js';
import { getBackend } from '../backend/backend.js';
import { type DType, isFloating } from '../dtype.js';
import { fmtShape, TensorError } from '../errors.js';
import { toTarget } from '../ops/shape.js';
import { keep } from '../scope.js';
import { sameShape } from '../shape.js';
import { Tensor } from '../tensor.js';

/**
 * A module's tensors by dotted name: the module's own parameter and buffer tensors (not
 * copies), so serialise or clone them before training on.
 */
export type StateDict = Record<string, Tensor>;

/** Options of loadStateDict. */
export interface LoadStateDictOptions {
  /** Require the keys to match exactly (default true). */
  strict?: boolean;
}

/** What a non-strict loadStateDict did not match. */
export interface LoadStateDictResult {
  missingKeys: string[];
  unexpectedKeys: string[];
}

function checkName(kind: string, name: string, taken: boolean): void {
  if (typeof name !== 'string' || name === '' || name.includes('.')) {
    throw new TensorError(
      'INVALID_ARGUMENT',
      `register${kind}: name must be a non-empty string without ".", got "${name}"`,
    );
  }
  if (taken)
    throw new TensorError(
      'INVALID_ARGUMENT',
      `register${kind}: "${name}" is already registered as something else`,
    );
}

/** Base class of layers: register parameters, buffers and submodules in the constructor. */
export class Module {
  /** Training mode (dropout active); set with train() / eval(). */
  training = true;
  private readonly paramTable = new Map<string, Tensor | null>();
  private readonly bufferTable = new Map<string, Tensor | null>();
  private readonly nonPersistent = new Set<string>();
  private readonly moduleTable = new Map<string, Module | null>();

  private taken(name: string, except: Map<string, unknown>): boolean {
    return [this.paramTable, this.bufferTable, this.moduleTable].some((m) => m !== except && m.has(name));
  }

  /**
   * Registers a parameter (a floating-point leaf; it is marked requiresGrad and kept out of
   * tidy scopes). null reserves the name (e.g. a disabled bias). Returns the tensor.
   */
  registerParameter<T extends Tensor | null>(name: string, t: T): T {
    checkName('Parameter', name, this.taken(name, this.paramTable));
    if (t) {
      t.checkAlive('registerParameter');
      if (!t.isLeaf) {
        throw new TensorError(
          'INVALID_ARGUMENT',
          `registerParameter: "${name}" must be a leaf tensor; pass x.detach()`,
        );
      }
      if (!isFloating(t.dtype)) {
        throw new TensorError(
          'DTYPE_MISMATCH',
          `registerParameter: "${name}" must be floating point, got ${t.describe()}`,
        );
      }
      t.requiresGrad_(true);
      t.name ??= name;
      keep(t);
    }
    this.paramTable.set(name, t);
    return t;
  }

  /**
   * Registers a buffer: state that is not trained (e.g. rotary tables). Non-persistent buffers
   * are left out of stateDict(). Returns the tensor.
   */
  registerBuffer<T extends Tensor | null>(name: string, t: T, options: { persistent?: boolean } = {}): T {
    checkName('Buffer', name, this.taken(name, this.bufferTable));
    if (t) {
      t.checkAlive('registerBuffer');
      t.name ??= name;
      keep(t);
    }
    this.bufferTable.set(name, t);
    if (options.persistent === false) this.nonPersistent.add(name);
    else this.nonPersistent.delete(name);
    return t;
  }

  /** Registers a submodule; its tensors appear under `name.`. Returns the module. */
  registerModule<M extends Module | null>(name: string, m: M): M {
    checkName('Module', name, this.taken(name, this.moduleTable));
    if (m && !(m instanceof Module))
      throw new TensorError('INVALID_ARGUMENT', `registerModule: "${name}" is not a Module`);
    this.moduleTable.set(name, m);
    return m;
  }

  /** Direct submodules with their names. */
  namedChildren(): [string, Module][] {
    const out: [string, Module][] = [];
    for (const [n, m] of this.moduleTable) if (m) out.push([n, m]);
    return out;
  }

  /** Direct submodules. */
  children(): Module[] {
    return this.namedChildren().map(([, m]) => m);
  }

  /** This module ('' or prefix) and every submodule below it, each once, with dotted names. */
  namedModules(prefix = ''): [string, Module][] {
    const out: [string, Module][] = [];
    const seen = new Set<Module>();
    const walk = (m: Module, name: string): void => {
      if (seen.has(m)) return;
      seen.add(m);
      out.push([name, m]);
      for (const [n, c] of m.namedChildren()) walk(c, name ? `${name}.${n}` : n);
    };
    walk(this, prefix);
    return out;
  }

  /** Every module in the tree, this one first. */
  modules(): Module[] {
    return this.namedModules().map(([, m]) => m);
  }

  /**
   * Tensors of one kind with dotted names: each tensor once, or (forState) under every name it
   * has, skipping non-persistent buffers.
   */
  private namedTensors(
    kind: 'paramTable' | 'bufferTable',
    prefix: string,
    recurse: boolean,
    forState: boolean,
  ): [string, Tensor][] {
    const out: [string, Tensor][] = [];
    const seen = new Set<Tensor>();
    const mods: [string, Module][] = recurse ? this.namedModules(prefix) : [[prefix, this]];
    for (const [mn, m] of mods) {
      for (const [n, t] of m[kind]) {
        if (!t || (!forState && seen.has(t))) continue;
        if (forState && kind === 'bufferTable' && m.nonPersistent.has(n)) continue;
        seen.add(t);
        out.push([mn ? `${mn}.${n}` : n, t]);
      }
    }
    return out;
  }

  /** Parameters with dotted names; a parameter shared by several modules is listed once. */
  namedParameters(prefix = '', recurse = true): [string, Tensor][] {
    return this.namedTensors('paramTable', prefix, recurse, false);
  }

  /** Every parameter, each once. */
  parameters(recurse = true): Tensor[] {
    return this.namedParameters('', recurse).map(([, t]) => t);
  }

  /** Buffers with dotted names, each once. */
  namedBuffers(prefix = '', recurse = true): [string, Tensor][] {
    return this.namedTensors('bufferTable', prefix, recurse, false);
  }

  /** Every buffer, each once. */
  buffers(recurse = true): Tensor[] {
    return this.namedBuffers('', recurse).map(([, t]) => t);
  }

  /**
   * The parameters and persistent buffers by dotted name (a shared tensor appears under each
   * of its names). The values are the module's own tensors, not copies: clone them to keep a
   * snapshot, and do not dispose them.
   */
  stateDict(): StateDict {
    const sd: StateDict = {};
    for (const [n, t] of this.namedTensors('paramTable', '', true, true)) sd[n] = t;
    for (const [n, t] of this.namedTensors('bufferTable', '', true, true)) sd[n] = t;
    return sd;
  }

  /**
   * Copies the values of a state dict into this module's tensors, in place and outside autograd.
   * Every key, shape and dtype is checked before anything is copied; a problem throws one
   * TensorError listing all of them. With strict = false, missing and unexpected keys are
   * returned instead of thrown.
   */
  loadStateDict(
    sd: StateDict | Map<string, Tensor>,
    options: LoadStateDictOptions = {},
  ): LoadStateDictResult {
    const strict = options.strict ?? true;
    const src = sd instanceof Map ? sd : new Map(Object.entries(sd));
    const own = this.stateDict();
    const missingKeys = Object.keys(own).filter((k) => !src.has(k));
    const unexpectedKeys = [...src.keys()].filter((k) => !Object.hasOwn(own, k));
    const problems: string[] = [];
    let code: 'INVALID_ARGUMENT' | 'SHAPE_MISMATCH' | 'DTYPE_MISMATCH' | null = null;
    if (strict && missingKeys.length) {
      problems.push(`missing keys: ${missingKeys.join(', ')}`);
      code = 'INVALID_ARGUMENT';
    }
    if (strict && unexpectedKeys.length) {
      problems.push(`unexpected keys: ${unexpectedKeys.join(', ')}`);
      code ??= 'INVALID_ARGUMENT';
    }
    for (const [name, dst] of Object.entries(own)) {
      const v = src.get(name);
      if (!v) continue;
      if (!(v instanceof Tensor) || v.disposed) {
        problems.push(`"${name}": not a live Tensor`);
        code ??= 'INVALID_ARGUMENT';
      } else if (!sameShape(v.shape, dst.shape)) {
        problems.push(
          `"${name}": shape ${fmtShape(v.shape)} in the state dict, ${fmtShape(dst.shape)} in the module`,
        );
        code ??= 'SHAPE_MISMATCH';
      } else if (v.dtype !== dst.dtype) {
        problems.push(`"${name}": dtype ${v.dtype} in the state dict, ${dst.dtype} in the module`);
        code ??= 'DTYPE_MISMATCH';
      }
    }
    if (code) {
      throw new TensorError(
        code,
        `loadStateDict: ${problems.length} problem(s) loading into ${this.constructor.name}:\n  ${problems.join('\n  ')}`,
      );
    }
    noGrad(() => {
      for (const [name, dst] of Object.entries(own)) {
        const v = src.get(name);
        if (v && v !== dst && dst.numel > 0) dst.backend.copy(dst, v);
      }
    });
    return { missingKeys, unexpectedKeys };
  }

  /** Sets training mode on this module and every submodule; returns this. */
  train(mode = true): this {
    for (const m of this.modules()) m.training = mode;
    return this;
  }

  /** Evaluation mode (train(false)); returns this. */
  eval(): this {
    return this.train(false);
  }

  /** Frees the parameters' gradients (setToNone, the default) or zeroes them in place. */
  zeroGrad(setToNone = true): void {
    for (const p of this.parameters()) {
      const g = p.grad;
      if (!g) continue;
      if (setToNone) {
        g.dispose();
        p.grad = null;
      } else {
        noGrad(() => g.zero_());
      }
    }
  }

  /**
   * Moves every parameter and buffer to a device and/or casts the floating-point ones to a dtype
   * (PyTorch's Module.to): `to('bfloat16')`, `to('cuda:1')`, `to('cuda', 'bfloat16')`,
   * `to({ device, dtype })`. Integer buffers move but keep their dtype. Each changed tensor is a
   * new Tensor (same name and requiresGrad) that replaces the old one in the module tree and in a
   * module field that held it; the old tensor is disposed. References taken before (an optimizer,
   * parameters() lists) are then stale: move first, then build the optimizer. Returns this.
   */
  to(target: DType | string | { device?: string; dtype?: DType }, dtype?: DType): this {
    const opts = toTarget('Module.to', target, dtype);
    if (opts.dtype !== undefined && !isFloating(opts.dtype))
      throw new TensorError(
        'DTYPE_MISMATCH',
        `Module.to: expected a floating-point dtype, got ${opts.dtype}`,
      );
    const device = opts.device === undefined ? undefined : getBackend(opts.device).device;
    const replaced = new Map<Tensor, Tensor>();
    noGrad(() => {
      for (const m of this.modules()) {
        for (const table of [m.paramTable, m.bufferTable]) {
          for (const t of table.values()) {
            if (!t || replaced.has(t)) continue;
            const cast = opts.dtype !== undefined && isFloating(t.dtype) && t.dtype !== opts.dtype;
            const move = device !== undefined && t.device !== device;
            if (!cast && !move) continue;
            const view = t.detach();
            const fresh = view.to({
              ...(move ? { device } : {}),
              ...(cast ? { dtype: opts.dtype } : {}),
            });
            view.dispose();
            fresh.name = t.name;
            if (t.requiresGrad) fresh.requiresGrad_(true);
            replaced.set(t, fresh);
          }
        }
      }
    });
    this.replaceTensors(replaced);
    return this;
  }

  /**
   * Puts `replacement.get(t)` wherever the tree holds a parameter or buffer `t`: in the parameter
   * and buffer tables and in every own field of a module that points at it, whatever the field's
   * name (a field `layerNormWeight` may hold the parameter `layer_norm_weight`). The old tensors
   * are disposed. Module.to uses it, and so does data parallelism when it moves parameters into
   * a contiguous buffer.
   */
  replaceTensors(replacement: ReadonlyMap<Tensor, Tensor>): void {
    // the module owns them now: no enclosing tidy() scope frees them
    for (const r of replacement.values()) keep(r);
    for (const m of this.modules()) {
      for (const table of [m.paramTable, m.bufferTable]) {
        for (const [name, t] of table) {
          const r = t ? replacement.get(t) : undefined;
          if (r) table.set(name, r);
        }
      }
      for (const key of Object.keys(m)) {
        const v = Reflect.get(m, key);
        const r = v instanceof Tensor ? replacement.get(v) : undefined;
        if (r) Reflect.set(m, key, r);
      }
    }
    for (const old of replacement.keys()) old.dispose();
  }

  /**
   * Frees every parameter and buffer of the tree (and their gradients), and what each module owns
   * besides ({@link Module.disposeState}); the module is unusable afterwards.
   */
  dispose(): void {
    for (const m of this.modules()) {
      for (const table of [m.paramTable, m.bufferTable]) for (const t of table.values()) t?.dispose();
      m.disposeState();
    }
  }

  /**
   * Frees tensors this module owns outside its parameters and buffers (state it keeps between
   * calls, such as a MoE router's running expert load); {@link Module.dispose} calls it on every
   * module of the tree. Nothing by default.
   */
  protected disposeState(): void {}

  [Symbol.dispose](): void {
    this.dispose();
  }

  /** Number of elements in the parameters (each shared parameter counted once). */
  numParameters(): number {
    return this.parameters().reduce((n, p) => n + p.numel, 0);
  }
}

/** An indexable list of submodules, registered under '0', '1', ... */
export class ModuleList<M extends Module = Module> extends Module implements Iterable<M> {
  private readonly items: M[] = [];

  constructor(modules: Iterable<M> = []) {
    super();
    for (const m of modules) this.append(m);
  }

  /** Adds a module at the end; returns this. */
  append(m: M): this {
    this.registerModule(String(this.items.length), m);
    this.items.push(m);
    return this;
  }

  /** Adds several modules at the end; returns this. */
  extend(modules: Iterable<M>): this {
    for (const m of modules) this.append(m);
    return this;
  }

  /** The module at index i (negative counts from the end). */
  get(i: number): M {
    const k = i < 0 ? i + this.items.length : i;
    if (!(k >= 0 && k < this.items.length)) {
      throw new TensorError(
        'INDEX_OUT_OF_RANGE',
        `ModuleList.get: index ${i} is out of range for ${this.items.length} modules`,
      );
    }
    return this.items[k];
  }

  get length(): number {
    return this.items.length;
  }

  [Symbol.iterator](): Iterator<M> {
    return this.items[Symbol.iterator]();
  }
}
