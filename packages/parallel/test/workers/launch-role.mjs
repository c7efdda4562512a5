// A worker for the launcher tests. Argument RANK (or the last one) says what this rank does:
//   ok        exit 0 at once
//   exit=N    exit with code N after 200 ms
//   signal=S  kill itself with signal S after 200 ms
//   sleep     wait (default SIGTERM handling: dies)
//   trap      on SIGTERM or SIGINT print `got <signal>` and exit 0
//   ignore    print `ignoring <signal>` on SIGTERM or SIGINT and keep going
// Every worker prints `ready` once its handlers are in place; one left running exits 9 after
// 30 s, so that a test cannot hang.
const args = process.argv.slice(2);
const role = args[Number(process.env.RANK)] ?? args[args.length - 1];
const [what, arg] = role.split('=');
const waitLong = () => setTimeout(() => process.exit(9), 30_000);
if (what === 'exit') setTimeout(() => process.exit(Number(arg)), 200);
else if (what === 'signal') setTimeout(() => process.kill(process.pid, arg), 200);
else if (what === 'sleep') waitLong();
else if (what === 'trap' || what === 'ignore') {
  for (const sig of ['SIGTERM', 'SIGINT']) {
    process.on(sig, () => {
      console.log(what === 'trap' ? `got ${sig}` : `ignoring ${sig}`);
      if (what === 'trap') process.exit(0);
    });
  }
  waitLong();
} else if (what !== 'ok') {
  console.error(`unknown role ${role}`);
  process.exit(64);
}
console.log('ready');
