"""benchmarks.linear_ab: both matmuls run the stack's passes and the table comes out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import linear_ab
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
