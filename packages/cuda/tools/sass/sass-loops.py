#!/usr/bin/env python3
"""The loops of each kernel in a cubin and what they issue: for every backward branch (a loop),
its instruction count and histogram by opcode (HMMA, LDSM, MUFU, FFMA, ... and the spills LDL /
STL; "other": the rest, such as the uniform datapath's UIMAD / UIADD3, shifts and logic). Static counts: with the fast paths forced (hot-paths.py) a kernel's main loop is close to its
per-tile cost.

usage: sass-loops.py CUBIN [NAME-FILTER]. With $SASS_DUMP set to a folder, each kernel's
instructions (as counted: the padding left out) are also written there, one file a kernel, with
the loops marked. Disassembles with $NVDISASM (default: the one run.sh
unpacks), which here is CUDA 12.4's: the cubin's ELF header is rewritten to that release's format
first (OS ABI 0x33, ABI version 7, the sm_90a flags), which its disassembler then reads (the
machine code of sm_90a itself is the same; 12.4 decodes wgmma's HGMMA, 11.8 did not)."""
import collections, os, re, struct, subprocess, sys, tempfile

path = sys.argv[1]
want = sys.argv[2] if len(sys.argv) > 2 else ''
nvdisasm = os.environ.get('NVDISASM', '/tmp/megapatch-cudatk12/usr/bin/nvdisasm')
b = bytearray(open(path, 'rb').read())
b[7] = 0x33                                  # EI_OSABI: CUDA 12's
b[8] = 7                                     # EI_ABIVERSION
struct.pack_into('<I', b, 0x30, 0x5a0d5a)    # e_flags: sm_90a, virtual sm_90, 64-bit addresses
with tempfile.NamedTemporaryFile(suffix='.cubin', delete=False) as f:
    f.write(b)
out = subprocess.run([nvdisasm, '-c', f.name], capture_output=True, text=True, check=True).stdout
os.unlink(f.name)

funcs = collections.OrderedDict()
cur = None
for line in out.split('\n'):
    m = re.match(r'^(_Z\S+):$', line)
    if m:
        cur = m.group(1)
        funcs[cur] = {'ins': [], 'labels': {}}
        continue
    if cur is None:
        continue
    m = re.match(r'^(\.L_x_\d+):', line)
    if m:
        funcs[cur]['labels'][m.group(1)] = len(funcs[cur]['ins'])
        continue
    m = re.match(r'\s+/\*([0-9a-f]{4,})\*/\s+(.*?);', line)
    if m and not m.group(2).startswith('@!PT LDS'):  # never-executed padding after LDGSTS
        funcs[cur]['ins'].append(m.group(2).strip())


def demangle(n):
    d = subprocess.run(['c++filt', n], capture_output=True, text=True).stdout.strip()
    return d.replace('mpc::att::', '').replace('mpc::bf16', 'bf16').replace('(Params)', '')


def opcode(t):
    return re.sub(r'^@!?U?P[T0-9]+\s+', '', t).split()[0].split('.')[0]


keys = ['HMMA', 'HGMMA', 'LDSM', 'MUFU', 'FFMA', 'FMUL', 'FADD', 'FMNMX', 'F2FP', 'SHFL', 'LDS', 'STS', 'LDGSTS',
        'BAR', 'LDL', 'STL', 'ISETP', 'IMAD', 'IADD3', 'LEA', 'MOV', 'SEL', 'FSEL', 'BRA', 'LDG', 'STG', 'RED', 'REDG',
        'ATOMG']
for name, f in funcs.items():
    d = demangle(name)
    if want and want not in d:
        continue
    ins = f['ins']
    hist = collections.Counter(opcode(t) for t in ins)
    print(f"== {d}: {len(ins)} instructions, LDL {hist['LDL']}, STL {hist['STL']}")
    loops = []
    for i, t in enumerate(ins):
        m = re.search(r'BRA\s+(?:`\()?(\.L_x_\d+)', t)
        if m and m.group(1) in f['labels'] and f['labels'][m.group(1)] <= i:
            loops.append((f['labels'][m.group(1)], i))
    loops.sort(key=lambda x: x[0] - x[1])
    if os.environ.get('SASS_DUMP'):
        starts = {j for j, _ in loops[:4]}
        ends = {i for _, i in loops[:4]}
        fn = re.sub(r'[^A-Za-z0-9]+', '_', d).strip('_')[:150] + '.sass'
        with open(os.path.join(os.environ['SASS_DUMP'], fn), 'w') as o:
            for k, t in enumerate(ins):
                o.write(f"{'>>' if k in starts else '<<' if k in ends else '  '} {k:5d}  {t}\n")
    for j, i in loops[:4]:
        h = collections.Counter(opcode(t) for t in ins[j:i + 1])
        rest = sum(n for k, n in h.items() if k not in keys)  # uniform datapath, shifts, logic, ...
        print(f"  loop [{j}..{i}] {i - j + 1} instr: " + ' '.join(f'{k}:{h[k]}' for k in keys if h[k])
              + (f' other:{rest}' if rest else ''))
