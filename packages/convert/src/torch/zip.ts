// The ZIP container of torch.save files (PKWARE APPNOTE 6.3): a central-directory reader with
// zip64, and a sequential writer of stored (uncompressed) entries whose data start on 64-byte
// boundaries, as torch's own writer lays them out.
import fs from 'node:fs';
import * as zlib from 'node:zlib';
import { ConvertError } from '../errors.js';
import { readExact as readFileExact } from '../safetensors/file.js';

/** One entry of a zip's central directory. */
export interface ZipEntry {
  readonly name: string;
  /** 0 = stored; anything else is compressed. */
  readonly method: number;
  readonly crc32: number;
  /** Uncompressed size in bytes. */
  readonly size: number;
  readonly compressedSize: number;
  /** Offset of the entry's local header in the file. */
  readonly headerOffset: number;
}

const SIG = {
  LOCAL: 0x04034b50,
  CENTRAL: 0x02014b50,
  EOCD: 0x06054b50,
  EOCD64: 0x06064b50,
  LOCATOR: 0x07064b50,
};
const MAX32 = 0xffffffff;
const MAX16 = 0xffff;
const LOCAL_SIZE = 30;
const CENTRAL_SIZE = 46;
const EOCD_SIZE = 22;
const EOCD64_SIZE = 56;
const LOCATOR_SIZE = 20;
/** torch aligns every record's data to this many bytes, so it can be memory-mapped. */
const ZIP_ALIGNMENT = 64;
// Version 4.5 of the APPNOTE is the one that defines zip64; 2.0 suffices otherwise.
const VERSION_ZIP64 = 45;
const VERSION_PLAIN = 20;
const DOS_DATE_1980 = (1 << 5) | 1; // 1980-01-01: a fixed date keeps output reproducible

const dataView = (b: Uint8Array) => new DataView(b.buffer, b.byteOffset, b.byteLength);

function u64(v: DataView, at: number, what: string, file: string): number {
  const x = v.getBigUint64(at, true);
  if (x > BigInt(Number.MAX_SAFE_INTEGER))
    throw new ConvertError('CORRUPT_FILE', `zip ${what} ${x} is too large`, file);
  return Number(x);
}

/**
 * Reads the central directory of the zip open as `fd` (zip64 aware). A missing end record means
 * TRUNCATED_FILE when the file starts like a zip, INVALID_FORMAT otherwise. A zip stored inside a
 * larger file (a torch.save blob in a PyTorch distributed checkpoint) starts at `base` and is
 * `fileSize` bytes long; the offsets it records, and those returned, are relative to `base`.
 */
export function readZipDirectory(fd: number, fileSize: number, file: string, base = 0): ZipEntry[] {
  const readExact = (n: number, at: number, f: string) => readFileExact(fd, n, base + at, f);
  const tailLength = Math.min(fileSize, EOCD_SIZE + MAX16 + LOCATOR_SIZE);
  const tail = readExact(tailLength, fileSize - tailLength, file);
  const tv = dataView(tail);
  let eocd = -1;
  for (let i = tailLength - EOCD_SIZE; i >= 0; i--) {
    if (tv.getUint32(i, true) === SIG.EOCD && i + EOCD_SIZE + tv.getUint16(i + 20, true) <= tailLength) {
      eocd = i;
      break;
    }
  }
  if (eocd < 0) {
    const head = fileSize >= 4 ? dataView(readExact(4, 0, file)).getUint32(0, true) : 0;
    if (head === SIG.LOCAL) {
      throw new ConvertError(
        'TRUNCATED_FILE',
        `zip has no end-of-central-directory record: the file is truncated (an interrupted save or copy?)`,
        file,
      );
    }
    throw new ConvertError('INVALID_FORMAT', 'is not a zip file (no end-of-central-directory record)', file);
  }
  let count = tv.getUint16(eocd + 10, true);
  let cdSize = tv.getUint32(eocd + 12, true);
  let cdOffset = tv.getUint32(eocd + 16, true);
  const eocdAt = fileSize - tailLength + eocd;
  const locator = eocd - LOCATOR_SIZE;
  if (locator >= 0 && tv.getUint32(locator, true) === SIG.LOCATOR) {
    const at = u64(tv, locator + 8, 'zip64 end record offset', file);
    if (at + EOCD64_SIZE > eocdAt)
      throw new ConvertError('CORRUPT_FILE', 'zip64 end record is out of place', file);
    const z = dataView(readExact(EOCD64_SIZE, at, file));
    if (z.getUint32(0, true) !== SIG.EOCD64)
      throw new ConvertError('CORRUPT_FILE', 'zip64 end record is damaged', file);
    count = u64(z, 32, 'entry count', file);
    cdSize = u64(z, 40, 'central directory size', file);
    cdOffset = u64(z, 48, 'central directory offset', file);
  }
  if (cdOffset + cdSize > eocdAt) {
    throw new ConvertError(
      'CORRUPT_FILE',
      `zip central directory [${cdOffset}, ${cdOffset + cdSize}) runs past its end record at ${eocdAt}`,
      file,
    );
  }
  const cd = readExact(cdSize, cdOffset, file);
  const v = dataView(cd);
  const utf8 = new TextDecoder();
  const entries: ZipEntry[] = [];
  let p = 0;
  for (let i = 0; i < count; i++) {
    if (p + CENTRAL_SIZE > cdSize || v.getUint32(p, true) !== SIG.CENTRAL) {
      throw new ConvertError('CORRUPT_FILE', `zip central directory entry ${i} is damaged`, file);
    }
    const nameLength = v.getUint16(p + 28, true);
    const extraLength = v.getUint16(p + 30, true);
    const commentLength = v.getUint16(p + 32, true);
    const name = utf8.decode(cd.subarray(p + CENTRAL_SIZE, p + CENTRAL_SIZE + nameLength));
    let compressedSize = v.getUint32(p + 20, true);
    let size = v.getUint32(p + 24, true);
    let headerOffset = v.getUint32(p + 42, true);
    // The zip64 extra field holds, in this order, exactly the values whose 32-bit field is full.
    let x = p + CENTRAL_SIZE + nameLength;
    const extraEnd = x + extraLength;
    while (x + 4 <= extraEnd) {
      const id = v.getUint16(x, true);
      const len = v.getUint16(x + 2, true);
      if (id === 1) {
        let f = x + 4;
        const next = (what: string) => {
          if (f + 8 > x + 4 + len)
            throw new ConvertError('CORRUPT_FILE', `zip64 field of ${name} is short`, file);
          f += 8;
          return u64(v, f - 8, what, file);
        };
        if (size === MAX32) size = next('size');
        if (compressedSize === MAX32) compressedSize = next('compressed size');
        if (headerOffset === MAX32) headerOffset = next('header offset');
      }
      x += 4 + len;
    }
    entries.push({
      name,
      method: v.getUint16(p + 10, true),
      crc32: v.getUint32(p + 16, true),
      size,
      compressedSize,
      headerOffset,
    });
    p = extraEnd + commentLength;
  }
  return entries;
}

/**
 * Offset of an entry's first data byte (relative to the zip's start, `base` in the file): after its
 * local header, whose name and extra lengths may differ from the central ones.
 */
export function entryDataOffset(fd: number, entry: ZipEntry, file: string, base = 0): number {
  const v = dataView(readFileExact(fd, LOCAL_SIZE, base + entry.headerOffset, file));
  if (v.getUint32(0, true) !== SIG.LOCAL) {
    throw new ConvertError(
      'CORRUPT_FILE',
      `zip local header of ${entry.name} at ${entry.headerOffset} is damaged`,
      file,
    );
  }
  return entry.headerOffset + LOCAL_SIZE + v.getUint16(26, true) + v.getUint16(28, true);
}

/** Writes all of `data` at `position`. */
function writeAll(fd: number, data: Uint8Array, position: number): void {
  for (let done = 0; done < data.byteLength; ) {
    done += fs.writeSync(fd, data, done, Math.min(1 << 30, data.byteLength - done), position + done);
  }
}

interface Written {
  name: Uint8Array;
  size: number;
  crc: number;
  headerOffset: number;
}

/**
 * Writes stored entries one after another to `fd` from offset 0. Each entry's size is declared up
 * front (so its headers are final but for the CRC, which is patched when the entry ends), and
 * its data starts 64-byte aligned: the padding sits in an extra field of id "FB", as torch's.
 */
export class ZipWriter {
  /** Next byte to write. */
  position = 0;
  private readonly done: Written[] = [];
  private current: (Written & { written: number }) | null = null;

  constructor(private readonly fd: number) {}

  /** Starts entry `name` of exactly `size` bytes. */
  begin(name: string, size: number): void {
    if (this.current) throw new ConvertError('INVALID_ARGUMENT', 'a zip entry is still open');
    const nameBytes = new TextEncoder().encode(name);
    const zip64 = size >= MAX32;
    const fixed = LOCAL_SIZE + nameBytes.byteLength + (zip64 ? 20 : 0) + 4;
    const pad = (ZIP_ALIGNMENT - ((this.position + fixed) % ZIP_ALIGNMENT)) % ZIP_ALIGNMENT;
    const h = new Uint8Array(fixed + pad);
    const v = dataView(h);
    v.setUint32(0, SIG.LOCAL, true);
    v.setUint16(4, zip64 ? VERSION_ZIP64 : VERSION_PLAIN, true);
    v.setUint16(12, DOS_DATE_1980, true);
    v.setUint32(18, zip64 ? MAX32 : size, true);
    v.setUint32(22, zip64 ? MAX32 : size, true);
    v.setUint16(26, nameBytes.byteLength, true);
    v.setUint16(28, h.byteLength - LOCAL_SIZE - nameBytes.byteLength, true);
    h.set(nameBytes, LOCAL_SIZE);
    let x = LOCAL_SIZE + nameBytes.byteLength;
    if (zip64) {
      v.setUint16(x, 1, true);
      v.setUint16(x + 2, 16, true);
      v.setBigUint64(x + 4, BigInt(size), true);
      v.setBigUint64(x + 12, BigInt(size), true);
      x += 20;
    }
    v.setUint16(x, 0x4246, true); // "FB"
    v.setUint16(x + 2, pad, true);
    h.fill(0x5a, x + 4); // "Z"
    writeAll(this.fd, h, this.position);
    this.current = { name: nameBytes, size, crc: 0, headerOffset: this.position, written: 0 };
    this.position += h.byteLength;
  }

  /** Appends data to the open entry; more than its declared size is an error. */
  append(chunk: Uint8Array): void {
    const e = this.current;
    if (!e) throw new ConvertError('INVALID_ARGUMENT', 'no zip entry is open');
    if (e.written + chunk.byteLength > e.size)
      throw new ConvertError('INVALID_ARGUMENT', 'zip entry overflows its declared size');
    writeAll(this.fd, chunk, this.position);
    e.crc = zlib.crc32(chunk, e.crc);
    e.written += chunk.byteLength;
    this.position += chunk.byteLength;
  }

  /** Ends the open entry (which must be complete) and patches the CRC into its local header. */
  end(): void {
    const e = this.current;
    if (!e || e.written !== e.size) throw new ConvertError('INVALID_ARGUMENT', 'zip entry is incomplete');
    const crc = new Uint8Array(4);
    dataView(crc).setUint32(0, e.crc, true);
    writeAll(this.fd, crc, e.headerOffset + 14);
    this.done.push(e);
    this.current = null;
  }

  /** A whole entry at once. */
  add(name: string, data: Uint8Array): void {
    this.begin(name, data.byteLength);
    this.append(data);
    this.end();
  }

  /** Writes the central directory and end records (zip64 ones when a count, size or offset needs them). */
  finish(): void {
    if (this.current) throw new ConvertError('INVALID_ARGUMENT', 'zip entry is still open');
    const cdOffset = this.position;
    const parts: Uint8Array[] = [];
    for (const e of this.done) {
      const big = e.size >= MAX32;
      const far = e.headerOffset >= MAX32;
      const extra = big || far ? 4 + (big ? 16 : 0) + (far ? 8 : 0) : 0;
      const c = new Uint8Array(CENTRAL_SIZE + e.name.byteLength + extra);
      const v = dataView(c);
      v.setUint32(0, SIG.CENTRAL, true);
      v.setUint16(4, VERSION_ZIP64, true);
      v.setUint16(6, extra ? VERSION_ZIP64 : VERSION_PLAIN, true);
      v.setUint16(14, DOS_DATE_1980, true);
      v.setUint32(16, e.crc, true);
      v.setUint32(20, big ? MAX32 : e.size, true);
      v.setUint32(24, big ? MAX32 : e.size, true);
      v.setUint16(28, e.name.byteLength, true);
      v.setUint16(30, extra, true);
      v.setUint32(42, far ? MAX32 : e.headerOffset, true);
      c.set(e.name, CENTRAL_SIZE);
      let x = CENTRAL_SIZE + e.name.byteLength;
      if (extra) {
        v.setUint16(x, 1, true);
        v.setUint16(x + 2, extra - 4, true);
        x += 4;
        if (big) {
          v.setBigUint64(x, BigInt(e.size), true);
          v.setBigUint64(x + 8, BigInt(e.size), true);
          x += 16;
        }
        if (far) v.setBigUint64(x, BigInt(e.headerOffset), true);
      }
      parts.push(c);
    }
    const cdSize = parts.reduce((n, p) => n + p.byteLength, 0);
    const count = this.done.length;
    const zip64 = count >= MAX16 || cdOffset >= MAX32 || cdSize >= MAX32;
    const end = new Uint8Array((zip64 ? EOCD64_SIZE + LOCATOR_SIZE : 0) + EOCD_SIZE);
    const v = dataView(end);
    let x = 0;
    if (zip64) {
      v.setUint32(0, SIG.EOCD64, true);
      v.setBigUint64(4, BigInt(EOCD64_SIZE - 12), true);
      v.setUint16(12, VERSION_ZIP64, true);
      v.setUint16(14, VERSION_ZIP64, true);
      v.setBigUint64(24, BigInt(count), true);
      v.setBigUint64(32, BigInt(count), true);
      v.setBigUint64(40, BigInt(cdSize), true);
      v.setBigUint64(48, BigInt(cdOffset), true);
      v.setUint32(56, SIG.LOCATOR, true);
      v.setBigUint64(64, BigInt(cdOffset + cdSize), true);
      v.setUint32(72, 1, true);
      x = EOCD64_SIZE + LOCATOR_SIZE;
    }
    v.setUint32(x, SIG.EOCD, true);
    v.setUint16(x + 8, Math.min(count, MAX16), true);
    v.setUint16(x + 10, Math.min(count, MAX16), true);
    v.setUint32(x + 12, Math.min(cdSize, MAX32), true);
    v.setUint32(x + 16, Math.min(cdOffset, MAX32), true);
    parts.push(end);
    for (const p of parts) {
      writeAll(this.fd, p, this.position);
      this.position += p.byteLength;
    }
  }
}
