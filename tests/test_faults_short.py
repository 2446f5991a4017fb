"""The dependency-fault run at CI size: `loadtests/faults.py --short` must pass and write its table.

The run writes into a copy of docs/reliability.md, so the test leaves the working tree alone.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- faults:begin -->", "<!-- faults:end -->"
PHASES = ("baseline", "redis", "bedrock", "stall", "jwks", "dynamodb")


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_the_short_fault_run_passes_and_writes_its_table(tmp_path: Path) -> None:
    doc = tmp_path / "reliability.md"
    shutil.copy(ROOT / "docs" / "reliability.md", doc)
    before = doc.read_text()
    done = subprocess.run(
        [sys.executable, str(ROOT / "loadtests" / "faults.py"), "--short", "--doc", str(doc)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, f"{done.stdout[-6000:]}\n{done.stderr[-4000:]}"
    after = doc.read_text()
    head, rest = after.split(BEGIN)
    table, tail = rest.split(END)
    assert head == before.split(BEGIN)[0] and tail == before.split(END)[1]  # only the table changed
    assert "Result: **pass**" in table and "`short` mode" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| Phase")]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows[1:]] == list(PHASES)
    assert all(row.rstrip(" |").endswith("| 0") for row in rows[1:]), rows  # streams lost: 0
    assert "0 missing, 0 metered twice, 0 unknown" in table
