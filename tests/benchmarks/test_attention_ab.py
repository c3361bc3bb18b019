"""benchmarks.attention_ab: a revision's kernel sources are the ones git holds, a build compared with itself
gives the same bits, and the table comes out for a revision against the working tree."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from benchmarks import attention_ab, common
from specdesk.kernels import cpu_lib

pytestmark = pytest.mark.skipif(not cpu_lib.available(), reason="no working C compiler: the CPU kernels are not built")
TINY = {"prefill": ([40], [24], False), "tree": ([50], [5], True)}


def _git_has_head() -> bool:
    head = subprocess.run(["git", "-C", str(common.ROOT), "rev-parse", "HEAD"], capture_output=True)
    return head.returncode == 0


def test_a_build_compared_with_itself_gives_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention_ab, "CASES", TINY)
    monkeypatch.setattr(attention_ab, "COLD_CASES", {"cold": ([30], [1], False)})
    monkeypatch.setattr(attention_ab, "LAYERS", 3)
    lib = cpu_lib.library()
    assert lib is not None
    rows = attention_ab.compare({"old": lib, "new": lib}, threads=2, rounds=1)
    assert [r["case"] for r in rows] == [*TINY, "cold"]
    assert all(r["same_bits"] and r["old_ms"] > 0 and r["new_ms"] > 0 and r["paired_ratio"] > 0 for r in rows)


@pytest.mark.skipif(not _git_has_head(), reason="not a git checkout")
def test_head_against_the_working_tree(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sources = common.kernel_sources_at("HEAD", tmp_path)
    for path in [*cpu_lib._SOURCES, *cpu_lib._HEADERS]:
        rel = path.relative_to(common.ROOT).as_posix()
        held = subprocess.run(["git", "-C", str(common.ROOT), "show", f"HEAD:{rel}"], capture_output=True)
        assert (sources / path.name).read_bytes() == (held.stdout if held.returncode == 0 else b"")
    monkeypatch.setattr(attention_ab, "CASES", TINY)
    monkeypatch.setattr(attention_ab, "COLD_CASES", {})
    attention_ab.main(["--against", "HEAD", "--rounds", "1"])
    table = capsys.readouterr().out
    assert "| prefill |" in table and "| tree |" in table and "median round, old / new" in table
