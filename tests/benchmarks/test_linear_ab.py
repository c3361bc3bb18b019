"""benchmarks.linear_ab: both matmuls run the stack's passes and the table comes out."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks import common, linear_ab
from specdesk.kernels import cpu_lib

pytestmark = pytest.mark.skipif(not cpu_lib.available(), reason="no working C compiler: the CPU kernels are not built")


def test_both_kernels_time_every_pass(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setattr(linear_ab, "LAYERS", 2)
    monkeypatch.setattr(linear_ab, "ROWS", [1, 5])
    out = tmp_path / "ab.json"
    linear_ab.main(["--threads", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["rows"] for r in rows] == [1, 5]
    assert all(r["int8_ms"] > 0 and r["q4_1_ms"] > 0 for r in rows)
    # 4-bit codes and two float16 scales per 32 weights, against bytes and a float32 scale: 20 / 36.
    assert rows[0]["q4_1_MB"] / rows[0]["int8_MB"] == pytest.approx(20 / 36)
    assert "| 5 |" in capsys.readouterr().out


def test_a_revision_against_the_working_tree_checks_the_bits(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """HEAD's kernels, with the W4A8 tile's minimum term doubled, against the working tree's: the int8 outputs
    are the same bits, the Q4_1 ones are not."""
    head = subprocess.run(["git", "-C", str(common.ROOT), "rev-parse", "HEAD"], capture_output=True)
    if head.returncode:
        pytest.skip("not a git checkout")

    def changed_sources(rev: str, folder: Path) -> Path:
        common.kernel_sources_at(rev, folder)
        q4 = folder / "cpu_q4.c"
        text = q4.read_text()
        assert text.count("sums[r * groups + g]") == 1 and text.count("sums[xi]") == 1
        q4.write_text(
            text.replace("sums[r * groups + g]", "2.0f * sums[r * groups + g]").replace("sums[xi]", "2.0f * sums[xi]")
        )
        return folder

    monkeypatch.setattr(linear_ab, "kernel_sources_at", changed_sources)
    monkeypatch.setattr(linear_ab, "LAYERS", 1)
    monkeypatch.setattr(linear_ab, "ROWS", [1, 5])
    out = tmp_path / "ab.json"
    linear_ab.main(["--against", "HEAD", "--threads", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["rows"] for r in rows] == [1, 5]
    for r in rows:
        assert r["int8"]["same_bits"] and not r["q4_1"]["same_bits"]
        assert all(r[kind][side] > 0 for kind in ("int8", "q4_1") for side in ("old_ms", "new_ms"))
    assert "| 5 | " in capsys.readouterr().out
