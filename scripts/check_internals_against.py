"""Check cam-vllm's list of vLLM internals against another vLLM release's Python sources.

    python scripts/check_internals_against.py 0.33.0

Downloads that release's wheel from the configured package index (no dependencies, nothing
installed), unpacks its ``.py`` files, and runs ``internals.check_vllm_internals`` with them first
on ``sys.path`` (the compiled extension is absent: modules that need it at import time are
reported as not importable). Prints every entry that changed; exit status 1 when any did. This is
how a port to a new vLLM starts: it names the internals to look at, it does not prove the port.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CHECK = """
import vllm
from cam_vllm.vllm_plugin import internals
problems = internals.check_vllm_internals(raise_on_error=False)
n = len(internals.INTERNALS)
print(f"vLLM {vllm.__version__} from {vllm.__file__}: {n} internals, {len(problems)} changed")
for p in problems:
    print("  -", p)
raise SystemExit(1 if problems else 0)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version", help="vLLM release, e.g. 0.33.0")
    parser.add_argument("--package", default="vllm", help="distribution name (default: vllm)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheels = Path(tmp, "wheels")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels)]
        subprocess.run([*cmd, f"{args.package}=={args.version}"], check=True)
        wheel = next(wheels.glob("*.whl"))
        src = Path(tmp, "src")
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(src, [n for n in zf.namelist() if n.startswith("vllm/") and n.endswith(".py")])
        env_path = str(src)
        run = subprocess.run(
            [sys.executable, "-c", CHECK],
            env={**os.environ, "PYTHONPATH": env_path},
            capture_output=True,
            text=True,
        )
        print(run.stdout, end="")
        if run.returncode not in (0, 1):
            print(run.stderr[-3000:], file=sys.stderr)
        return run.returncode


if __name__ == "__main__":
    raise SystemExit(main())
