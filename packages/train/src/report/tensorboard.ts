// TensorBoard event files: what Megatron writes with --tensorboard-dir, so that `tensorboard
// --logdir` shows a megapatch run as it shows a Megatron one. A file is a sequence of TFRecords
// (uint64 length, its masked CRC-32C, the bytes, their masked CRC-32C), each one `Event` protocol
// buffer (tensorflow/core/util/event.proto): the first names the file version, each other holds
// one scalar `Summary.Value` (a tag and a float) at a step, as torch.utils.tensorboard writes them.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { crc32c } from '@aws-crypto/crc32c';

/** TFRecord's masked CRC-32C (a checksum of data that itself holds checksums stays distinct). */
export function maskedCrc32c(data: Uint8Array): number {
  const c = crc32c(data);
  return ((((c >>> 15) | (c << 17)) >>> 0) + 0xa282ead8) >>> 0;
}

/** A protocol-buffer varint of a non-negative integer up to 2^53. */
function varint(n: number): Buffer {
  const out: number[] = [];
  let v = n;
  while (v >= 0x80) {
    out.push((v % 0x80) | 0x80);
    v = Math.floor(v / 0x80);
  }
  out.push(v);
  return Buffer.from(out);
}

/** A length-delimited field (wire type 2). */
function bytesField(field: number, data: Buffer): Buffer {
  return Buffer.concat([varint((field << 3) | 2), varint(data.length), data]);
}

/**
 * One `Event`: wall_time (field 1, double), step (2, int64; left out at 0, as proto3 writes it),
 * and either file_version (3) or a summary (5) of one scalar value: tag (1) and simple_value (2,
 * float).
 */
export function encodeEvent(
  e: { wallTime: number; step?: number } & ({ fileVersion: string } | { tag: string; value: number }),
): Buffer {
  const parts: Buffer[] = [];
  if (e.wallTime !== 0) {
    const d = Buffer.alloc(9);
    d[0] = (1 << 3) | 1;
    d.writeDoubleLE(e.wallTime, 1);
    parts.push(d);
  }
  const step = e.step ?? 0;
  if (!(Number.isSafeInteger(step) && step >= 0))
    throw new RangeError(`TensorBoard: step ${step} is not a non-negative integer`);
  if (step !== 0) parts.push(Buffer.concat([varint(2 << 3), varint(step)]));
  if ('fileVersion' in e) parts.push(bytesField(3, Buffer.from(e.fileVersion, 'utf8')));
  else {
    const f = Buffer.alloc(5);
    f[0] = (2 << 3) | 5;
    f.writeFloatLE(e.value, 1);
    const value = Buffer.concat([bytesField(1, Buffer.from(e.tag, 'utf8')), f]);
    parts.push(bytesField(5, bytesField(1, value)));
  }
  return Buffer.concat(parts);
}

/** One TFRecord around `data`. */
export function tfRecord(data: Buffer): Buffer {
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(data.length));
  const head = Buffer.alloc(4);
  head.writeUInt32LE(maskedCrc32c(len));
  const tail = Buffer.alloc(4);
  tail.writeUInt32LE(maskedCrc32c(data));
  return Buffer.concat([len, head, data, tail]);
}

let fileCounter = 0;

/**
 * Writes scalars to a new event file in `dir` (created if needed), named as TensorBoard's writers
 * name theirs: `events.out.tfevents.<seconds>.<host>.<pid>.<n>`. Each call appends whole records
 * at once, so a reader (or a crash) sees complete records; `close()` releases the file.
 */
export class TensorBoardWriter {
  readonly file: string;
  private fd: number | null;
  private readonly now: () => number;

  constructor(dir: string, opts: { now?: () => number } = {}) {
    this.now = opts.now ?? (() => Date.now() / 1000);
    fs.mkdirSync(dir, { recursive: true });
    const t = this.now();
    this.file = path.join(
      dir,
      `events.out.tfevents.${String(Math.floor(t)).padStart(10, '0')}.${os.hostname()}.${process.pid}.${fileCounter++}`,
    );
    this.fd = fs.openSync(this.file, 'wx');
    fs.writeSync(this.fd, tfRecord(encodeEvent({ wallTime: t, fileVersion: 'brain.Event:2' })));
  }

  /** Appends one event per scalar (tag -> value) at `step`; non-numbers are skipped. */
  addScalars(step: number, values: Readonly<Record<string, number | null | undefined>>): void {
    if (this.fd === null) throw new Error(`TensorBoard: ${this.file} is closed`);
    const t = this.now();
    const records: Buffer[] = [];
    for (const [tag, value] of Object.entries(values)) {
      if (typeof value !== 'number') continue;
      records.push(tfRecord(encodeEvent({ wallTime: t, step, tag, value })));
    }
    if (records.length > 0) fs.writeSync(this.fd, Buffer.concat(records));
  }

  close(): void {
    if (this.fd !== null) fs.closeSync(this.fd);
    this.fd = null;
  }
}

/** One decoded scalar event. */
export interface ScalarEvent {
  wallTime: number;
  step: number;
  tag: string;
  value: number;
}

/**
 * Reads the scalar events of an event file (the file-version event is skipped), checking every
 * record's two checksums; a truncated last record (a writer that was killed) ends the list.
 */
export function readScalarEvents(file: string): ScalarEvent[] {
  const b = fs.readFileSync(file);
  const out: ScalarEvent[] = [];
  let at = 0;
  while (at + 12 <= b.length) {
    const n = Number(b.readBigUInt64LE(at));
    if (b.readUInt32LE(at + 8) !== maskedCrc32c(b.subarray(at, at + 8)))
      throw new Error(`${file}: bad length checksum at byte ${at}`);
    if (at + 12 + n + 4 > b.length) break;
    const data = b.subarray(at + 12, at + 12 + n);
    if (b.readUInt32LE(at + 12 + n) !== maskedCrc32c(data))
      throw new Error(`${file}: bad data checksum at byte ${at}`);
    const e = decodeEvent(data);
    if (e) out.push(e);
    at += 12 + n + 4;
  }
  return out;
}

/** The fields of a protocol buffer: field number -> raw value (a number, or bytes for wire type 2). */
function fields(b: Buffer): [number, number, Buffer | number][] {
  const out: [number, number, Buffer | number][] = [];
  let at = 0;
  const readVarint = () => {
    let v = 0;
    let scale = 1;
    for (;;) {
      const byte = b[at++];
      v += (byte & 0x7f) * scale;
      if (byte < 0x80) return v;
      scale *= 0x80;
    }
  };
  while (at < b.length) {
    const key = readVarint();
    const field = Math.floor(key / 8);
    const wire = key % 8;
    if (wire === 0) out.push([field, wire, readVarint()]);
    else if (wire === 1) {
      out.push([field, wire, b.readDoubleLE(at)]);
      at += 8;
    } else if (wire === 5) {
      out.push([field, wire, b.readFloatLE(at)]);
      at += 4;
    } else if (wire === 2) {
      const n = readVarint();
      out.push([field, wire, b.subarray(at, at + n)]);
      at += n;
    } else throw new Error(`TensorBoard: unexpected wire type ${wire}`);
  }
  return out;
}

function decodeEvent(data: Buffer): ScalarEvent | null {
  let wallTime = 0;
  let step = 0;
  let summary: Buffer | null = null;
  for (const [f, , v] of fields(data)) {
    if (f === 1) wallTime = v as number;
    else if (f === 2) step = v as number;
    else if (f === 5) summary = v as Buffer;
  }
  if (!summary) return null;
  let tag = '';
  let value = Number.NaN;
  for (const [f, , v] of fields(summary)) {
    if (f !== 1) continue;
    for (const [g, , w] of fields(v as Buffer)) {
      if (g === 1) tag = (w as Buffer).toString('utf8');
      else if (g === 2) value = w as number;
    }
  }
  return { wallTime, step, tag, value };
}
