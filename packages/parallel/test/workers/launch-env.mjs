// A worker for the launcher tests: prints the launcher's variables as one `ENV {json}` line, a line
// on stderr, one line written in three pieces, and a last line without its newline.
const KEYS = [
  'RANK',
  'LOCAL_RANK',
  'WORLD_SIZE',
  'LOCAL_WORLD_SIZE',
  'GROUP_RANK',
  'GROUP_WORLD_SIZE',
  'ROLE_RANK',
  'ROLE_WORLD_SIZE',
  'MASTER_ADDR',
  'MASTER_PORT',
  'MEGAPATCH_NUM_THREADS',
  'OMP_NUM_THREADS',
];
const rank = process.env.RANK;
process.stdout.write(`ENV ${JSON.stringify(Object.fromEntries(KEYS.map((k) => [k, process.env[k]])))}\n`);
process.stderr.write(`to stderr from ${rank}\n`);
// Spaced out, so that the launcher receives the pieces of the line separately.
for (const piece of ['piece-a ', 'piece-b ', `piece-c ${rank}\n`]) {
  process.stdout.write(piece);
  await new Promise((r) => setTimeout(r, 30));
}
process.stdout.write(`tail without newline ${rank}`);
