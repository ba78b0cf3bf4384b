"""Run mypy over the clipsearch package and fail unless it checked every source file.

mypy follows the package's subpackage symlinks (clipsearch/retrieval -> ../retrieval, ...);
if a layout change ever made it see fewer files, plain `mypy` would still say "Success",
so this compares the files mypy reports as sources with every .py file under clipsearch/.
Usage: python .ci/typecheck.py  (from the repository root; extra args go to mypy).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "-v", *sys.argv[1:]],
        cwd=root,
        capture_output=True,
        text=True,
    )
    checked = {
        Path(p).resolve()
        for p in re.findall(r"Found source:\s+BuildSource\(path='([^']+)'", proc.stderr)
    }
    expected = {p.resolve() for p in (root / "clipsearch").rglob("*.py")}
    # rglob does not descend into symlinked folders: walk the subpackages' targets too.
    for sub in ("retrieval", "indexer", "cli"):
        expected |= {p.resolve() for p in (root / sub).rglob("*.py")}
    sys.stdout.write(proc.stdout)
    missing = sorted(str(p.relative_to(root)) for p in expected - checked)
    if missing:
        print(f"mypy did not check {len(missing)} source file(s):", *missing, sep="\n  ")
        return 1
    print(f"typecheck: mypy checked all {len(expected)} source files")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
