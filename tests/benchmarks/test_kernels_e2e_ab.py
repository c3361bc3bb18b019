"""benchmarks.kernels_e2e_ab: two kernel builds on one engine, end to end, each turn under each build."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks import kernels_e2e_ab
from specdesk.kernels import cpu_lib
from tests.tiny_models import make_tiny_model, make_tiny_speculator

pytestmark = [
    pytest.mark.usefixtures("restore_threads"),
    pytest.mark.skipif(not cpu_lib.available(), reason="no working C compiler: the CPU kernels are not built"),
]


def test_using_routes_every_lookup_to_the_build_and_puts_the_library_back() -> None:
    build = cpu_lib.library()
    other: Any = object()
    with pytest.raises(RuntimeError), kernels_e2e_ab.using(other):
        assert cpu_lib.library() is other
        raise RuntimeError  # a failed turn still puts the process's own build back
    assert cpu_lib.library() is build


def test_a_build_against_itself_gives_the_same_replies_and_exact_speculation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_tiny_model("llama", tmp_path, max_position_embeddings=4096)  # room for persona prompts
    lib = cpu_lib.library()
    assert lib is not None
    lookups: list[str] = []  # which library each kernel lookup went to, in order

    class Counting:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getattr__(self, attr: str) -> Any:
            if attr.startswith("sd_"):
                lookups.append(self.name)
            return getattr(lib, attr)

    own = Counting("own")  # the process's library: the engine's start-up may use it, no turn may
    monkeypatch.setattr(cpu_lib, "library", lambda: own)
    timed: list[tuple[str, bool]] = []
    real_using = kernels_e2e_ab.using

    @contextlib.contextmanager
    def using(build: Any) -> Iterator[None]:
        start = len(lookups)
        with real_using(build):
            yield
        timed.append((build.name, lookups[start:] == [build.name] * (len(lookups) - start) != []))

    monkeypatch.setattr(kernels_e2e_ab, "using", using)
    libs: dict[str, Any] = {"old": Counting("old"), "new": Counting("new")}
    mlp = make_tiny_speculator(model, tmp_path / "mlp")  # random drafts: the policy soon rests them, or not
    result = kernels_e2e_ab.run(libs, threads=1, turns=2, n=8, penalty=1.1, reference="float32", model=str(model),
                                speculator=str(mlp))  # fmt: skip
    # each build's warm-up, 2 turns of 4 runs in rotating order, each build's top-1 pass: every block made kernel
    # lookups, all of them to the build it named
    order = ["old", "new", "old", "old", "new", "new", "old", "new", "new", "old", "old", "new"]
    assert timed == [(name, True) for name in order]
    assert "own" not in lookups[lookups.index("old") :]  # no kernel call bypassed the build in use
    assert result["replies_equal_between_builds"] == 2  # one build, the same bits
    for name in ("old", "new"):
        row = result[name]
        assert row["identical_with_speculation"] == 2
        assert row["plain_tok_s"] > 0 and row["spec_tok_s"] > 0
        assert row["tokens_per_verification"] is None or row["tokens_per_verification"] >= 1.0
        assert 0.0 <= row["teacher_forced_top1_vs_float32_percent"] <= 100.0
    top1 = [result[name]["teacher_forced_top1_vs_float32_percent"] for name in ("old", "new")]
    assert top1[0] == top1[1]


def test_the_table_reports_both_builds(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    row = {"plain_tok_s": 10.0, "spec_tok_s": 12.0, "plain_decode_tok_s": 20.0, "spec_decode_tok_s": 30.0,
           "tokens_per_verification": 1.5, "identical_with_speculation": 2}  # fmt: skip
    fake = {"threads": 1, "turns": 2, "max_tokens": 8, "repetition_penalty": 1.1, "quantization": "int8",
            "old": row, "new": {**row, "plain_tok_s": 11.0}, "replies_equal_between_builds": 2}  # fmt: skip
    built: list[Path | None] = []

    def build(sources: Path | None, cache: Path) -> ctypes.CDLL:
        built.append(sources)
        return ctypes.CDLL(None)

    monkeypatch.setattr(kernels_e2e_ab, "build_kernels", build)
    monkeypatch.setattr(kernels_e2e_ab, "kernel_sources_at", lambda rev, folder: folder)
    monkeypatch.setattr(kernels_e2e_ab, "run", lambda *a, **k: fake)
    kernels_e2e_ab.main(["--threads", "1"])
    out = capsys.readouterr().out
    assert built[0] is not None and built[1] is None  # the revision's sources, then the working tree's
    assert "| old | 10.0 |" in out and "| new | 11.0 |" in out and "plain 1.100x" in out
