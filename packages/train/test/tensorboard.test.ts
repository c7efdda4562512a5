// TensorBoard event files byte for byte against the protobuf library's own encoding
// (fixtures/tensorboard/make_events.py, Debian's python3-protobuf), and read back.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { crc32c } from '@aws-crypto/crc32c';
import { afterAll, describe, expect, it } from 'vitest';
import { encodeEvent, readScalarEvents, TensorBoardWriter, tfRecord } from '../src/report/tensorboard.js';
import { tempDir } from './helpers.js';

const root = tempDir('mp-tb-');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));
const fixture = fs.readFileSync(path.join(import.meta.dirname, 'fixtures', 'tensorboard', 'events.bin'));

// the events of make_events.py
const scalars = [
  { wallTime: 1765000001.5, step: 0, tag: 'lm loss', value: 10.375 },
  { wallTime: 1765000001.5, step: 1, tag: 'learning-rate', value: 0.0003 },
  { wallTime: 1765000002.125, step: 300, tag: 'grad-norm', value: 0 },
  { wallTime: 1765000002.125, step: 123456789012, tag: 'lm loss vs samples', value: -2.5 },
  { wallTime: 1765000003.0, step: 7, tag: 'Durchsatz µ', value: 1.2345678901 },
];

describe('TensorBoard event files', () => {
  it('CRC-32C gives the standard check value', () => {
    expect(crc32c(Buffer.from('123456789'))).toBe(0xe3069283);
  });

  it('encodes records as the protobuf library does, byte for byte', () => {
    const ours = Buffer.concat([
      tfRecord(encodeEvent({ wallTime: 1765000000.25, fileVersion: 'brain.Event:2' })),
      ...scalars.map((s) => tfRecord(encodeEvent(s))),
    ]);
    expect(ours.equals(fixture)).toBe(true);
  });

  it('the writer writes the same file, named as TensorBoard names event files', () => {
    const times = [1765000000.25, ...scalars.map((s) => s.wallTime)];
    const w = new TensorBoardWriter(path.join(root, 'run'), { now: () => times.shift() as number });
    for (const s of scalars) w.addScalars(s.step, { [s.tag]: s.value, skipped: null });
    w.close();
    expect(path.basename(w.file)).toMatch(/^events\.out\.tfevents\.1765000000\.[^.]+.*\.\d+\.\d+$/);
    expect(fs.readFileSync(w.file).equals(fixture)).toBe(true);
    expect(() => w.addScalars(1, { x: 1 })).toThrow(/is closed/);
  });

  it('reads the scalars back, checking each record; a cut last record ends the list', () => {
    const read = readScalarEvents(path.join(import.meta.dirname, 'fixtures', 'tensorboard', 'events.bin'));
    expect(read).toEqual(scalars.map((s) => ({ ...s, value: Math.fround(s.value) })));
    const cut = path.join(root, 'cut.bin');
    fs.writeFileSync(cut, fixture.subarray(0, fixture.length - 10));
    expect(readScalarEvents(cut).map((e) => e.tag)).toEqual(scalars.slice(0, 4).map((s) => s.tag));
    const bad = Buffer.from(fixture);
    bad[60] ^= 1;
    fs.writeFileSync(cut, bad);
    expect(() => readScalarEvents(cut)).toThrow(/bad data checksum at byte 40/);
  });
});
