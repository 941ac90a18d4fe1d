"""docs/operations.md, run as written: a three-level tree of real processes by hand.

Every ```sh block of the guide runs in order in one bash script; only the
loopback ports 7750-7755 are swapped for free ones, so runs can overlap.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from zcells.devtree import free_ports

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "operations.md"

# Appended after the guide: the removed client must be refused (polled, bounded).
AFTERWARDS = """
refused=0
for _ in $(seq 1 100); do
    if ! zcells cell ping --all --timeout 1 >/dev/null 2>&1; then refused=1; break; fi
    sleep 0.1
done
echo "refused-after-removal=$refused"
"""


def guide_script() -> str:
    blocks = re.findall(r"```sh\n(.*?)```", GUIDE.read_text(), re.S)
    assert len(blocks) >= 7, "the guide lost its command blocks"
    script = "\n".join(blocks)
    for old, new in zip(range(7750, 7756), free_ports(6), strict=True):
        script = script.replace(f":{old}", f":{new}")
    return script


def test_operations_guide_runs_as_written(tmp_path: Path) -> None:
    script = (
        "set -euo pipefail\n"
        "trap 'kill $(jobs -p) 2>/dev/null || true; wait' EXIT\n" + guide_script() + AFTERWARDS
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for var in ("ZCELLS_ENDPOINT", "ZCELLS_SERVER_KEY", "ZCELLS_KEY", "ZCELLS_CONFIG"):
        env.pop(var, None)
    proc = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    logs = "\n".join(f"--- {p}\n{p.read_text()}" for p in tmp_path.glob("*/serve.log"))
    assert proc.returncode == 0, proc.stderr + logs
    out = proc.stdout
    for cell in ("api", "api!eu", "api!eu!eu-1"):
        assert re.search(rf"^{re.escape(cell)}\s+ok\s+[\d.]+ ms", out, re.M), out
    assert "api!eu!eu-1: ok in" in out
    assert "refused-after-removal=1" in out, out + logs
    # the trap stopped every cell: nothing of this run is left running
    left = subprocess.run(
        ["pgrep", "-f", str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert left.stdout.strip() == ""
    for name in ("api", "eu", "eu-1"):
        log = (tmp_path / name / "serve.log").read_text()
        assert "cell.started" in log and "Traceback" not in log
