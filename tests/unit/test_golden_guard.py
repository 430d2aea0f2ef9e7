"""Golden files can be rewritten on purpose on a developer's machine, never in CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.factsbuilder import GOLDEN, GoldenUpdateInCI, golden_update_requested

REPO = Path(__file__).resolve().parents[2]


def test_update_is_off_unless_asked_for() -> None:
    assert golden_update_requested({}) is False
    assert golden_update_requested({"CI": "true"}) is False
    assert golden_update_requested({"HOMECLUST_UPDATE_GOLDEN": "0", "CI": "1"}) is False
    assert golden_update_requested({"HOMECLUST_UPDATE_GOLDEN": "1"}) is True


@pytest.mark.parametrize("ci", ["true", "1", ""])
def test_update_is_refused_when_ci_is_set(ci: str) -> None:
    with pytest.raises(GoldenUpdateInCI, match="refused in CI"):
        golden_update_requested({"HOMECLUST_UPDATE_GOLDEN": "1", "CI": ci})


def test_a_test_run_asking_for_updates_in_ci_fails_before_writing(tmp_path: Path) -> None:
    golden = GOLDEN / "iptables" / "nat.rules"
    before = golden.read_bytes()
    env = {**os.environ, "HOMECLUST_UPDATE_GOLDEN": "1", "CI": "true"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/unit/test_render_iptables.py::test_nat_matches_golden"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0
    assert "refused in CI" in done.stdout + done.stderr
    assert golden.read_bytes() == before
