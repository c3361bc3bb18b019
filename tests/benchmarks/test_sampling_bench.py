"""benchmarks.sampling: a revision's sampler loads from git beside the working tree's, and both are timed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from benchmarks import common, sampling


def test_a_revision_against_the_working_tree(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    head = subprocess.run(["git", "-C", str(common.ROOT), "rev-parse", "HEAD"], capture_output=True)
    if head.returncode:
        pytest.skip("not a git checkout")
    old = sampling.sampler_at("HEAD", tmp_path)
    assert old is not sampling.sampler and callable(old.sample_rows)
    monkeypatch.setattr(sampling, "VOCAB", 4096)
    sampling.main(["--against", "HEAD", "--rounds", "1", "--out", str(tmp_path / "out.json")])
    table = capsys.readouterr().out
    for case in sampling.CASES:
        assert f"| {case}, 1 row |" in table and f"| {case}, 5 rows |" in table
    assert f"| {sampling.SAMPLED}, a tree's 3 rows |" in table and (tmp_path / "out.json").is_file()
