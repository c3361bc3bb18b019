"""What every benchmark suite prints: rows of SpecDesk against a baseline, measured in the same run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Row:
    name: str
    specdesk: float
    baseline: float | None
    baseline_name: str
    unit: str
    target: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        # For latencies lower is better, so the ratio is baseline / ours either way ("x better").
        return self.baseline / self.specdesk if self.unit == "s" else self.specdesk / self.baseline


def print_table(rows: list[Row], header: str) -> str:
    lines = [header, "", "| measurement | SpecDesk | baseline | baseline value | ratio | target |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        base = "n/a" if r.baseline is None else f"{r.baseline:.3f} {r.unit}"
        ratio = "n/a" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(f"| {r.name} | {r.specdesk:.3f} {r.unit} | {r.baseline_name} | {base} | {ratio} | {r.target} |")
    text = "\n".join(lines)
    print(text)
    return text
