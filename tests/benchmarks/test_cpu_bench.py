"""benchmarks.cpu's driver: each thread count's worker gets the run's settings."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks import cpu


@pytest.mark.parametrize(("flag", "expected"), [([], "1.1"), (["--repetition-penalty", "1.0"], "1.0")])
def test_workers_get_the_repetition_penalty(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], flag: list[str], expected: str
) -> None:
    calls: list[list[str]] = []

    def fake_worker(argv: list[str], what: str) -> dict[str, Any]:
        calls.append(argv)
        system = {"teacher_forced_top1_vs_reference_percent": 95.0, "quantization": "q4_1",
                  "identical_with_speculation": 8}  # fmt: skip
        return {"threads": int(argv[argv.index("--worker") + 1]), "turns": 8, "int8_path": "avx2",
                "reference_dtype": "float32", "int8": system, "console": system,
                "int8_vs_reference": {}, "console_vs_reference": {}}  # fmt: skip

    monkeypatch.setattr(cpu, "worker_result", fake_worker)
    monkeypatch.setattr(cpu, "table", lambda results: "")
    cpu.main(["--threads", "1", "2", *flag])
    assert [c[c.index("--worker") + 1] for c in calls] == ["1", "2"]
    assert all(float(c[c.index("--repetition-penalty") + 1]) == float(expected) for c in calls)
    assert f"repetition penalty {float(expected):g}" in capsys.readouterr().out


def test_workers_get_the_consoles_sampling(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[list[str]] = []

    def fake_worker(argv: list[str], what: str) -> dict[str, Any]:
        calls.append(argv)
        system = {"teacher_forced_top1_vs_reference_percent": None, "quantization": "q4_1",
                  "identical_with_speculation": 8}  # fmt: skip
        return {"threads": 2, "turns": 8, "int8_path": "avx2", "reference_dtype": "float32", "int8": system,
                "console": system, "int8_vs_reference": None, "console_vs_reference": None}  # fmt: skip

    monkeypatch.setattr(cpu, "worker_result", fake_worker)
    monkeypatch.setattr(cpu, "table", lambda results: "")
    cpu.main(["--threads", "2", "--temperature", "0.7", "--top-p", "0.9"])
    (argv,) = calls
    assert argv[argv.index("--temperature") + 1] == "0.7" and argv[argv.index("--top-p") + 1] == "0.9"
    out = capsys.readouterr().out
    assert "temperature 0.7, top-p 0.9" in out and "teacher-forced" not in out
    assert "speculation identical to plain on 8 of 8 turns" in out
