"""Regenerates every PyTorch fixture under test/fixtures/ (pnpm --filter @megapatch/tensor fixtures).

Each fixtures_<family>.py writes test/fixtures/<family>.json deterministically (seeded), so a
re-run reproduces the committed files byte for byte. Run with /usr/bin/python3 (python3-torch).
"""
import glob
import os
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
for script in sorted(glob.glob(os.path.join(here, "fixtures_*.py"))):
    print(f"== {os.path.basename(script)}", flush=True)
    subprocess.run([sys.executable, script], check=True, cwd=os.path.dirname(here))
