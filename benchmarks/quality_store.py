"""The stored results of ``quality.py``: one JSON file per measured row under ``results/quality/``.

- ``run.json``: the command, its settings and the planned rows in table order;
- ``row_<scheme>_<tool>_<method>.json``: one table row, with the settings it was measured with and where,
  when and at which commit (``measured``), its per-layer weight SQNR and the name of its plot;
- ``speed_<i>.json``: one row of the decode-speed table.

A row's file is written when the row is finished, so a stopped run keeps every finished row; ``--resume``
skips the rows whose file is written, and RESULTS.md is rendered from these files alone.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

NOT_REACHED = "not reached"
DONE = ("ok", "n/a")
"""Statuses a resumed run keeps; an ``error`` row is measured again."""


@dataclasses.dataclass
class Row:
    scheme: str
    tool: str
    method: str
    status: str = "ok"
    """ok | error | n/a | not reached"""
    note: str = ""
    format: str = ""
    perplexity: float | None = None
    tokens: int | None = None
    delta_pct: float | None = dataclasses.field(default=None, metadata={"stored": False})
    rel_to_ort_best: float | None = dataclasses.field(default=None, metadata={"stored": False})
    """Our perplexity increase divided by onnxruntime's smallest increase at this scheme (both derived:
    ``fill_deltas`` computes them from the rows at hand)."""
    model_mb: float | None = None
    bits_per_weight: float | None = None
    mean_weight_sqnr_db: float | None = None
    quant_seconds: float | None = None
    peak_rss_anon_mb: float | None = None
    eval_seconds: float | None = None
    site_counts: dict[str, int] | None = None
    """Per-site proxy-loss ordering (``quantizers.site_counts``), for our calibrated methods."""
    weight_sqnr_db: dict[str, float] | None = None
    plot: str | None = None
    settings: dict[str, Any] | None = None
    measured: dict[str, Any] | None = None
    """date, machine, commit and load average of the measurement."""
    path: str = dataclasses.field(default="", metadata={"stored": False})
    """The quantized model while the run lasts (a scratch folder: not stored)."""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.scheme, self.tool, self.method)


class Store:
    def __init__(self, results: Path) -> None:
        self.dir = results / "quality"

    def row_file(self, key: tuple[str, str, str]) -> Path:
        return self.dir / f"row_{'_'.join(key)}.json"

    def _write(self, path: Path, data: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
        tmp.replace(path)  # a row file is whole or absent

    def clear(self) -> None:
        """A fresh run: the rows of an earlier one are gone."""
        for f in self.dir.glob("*.json"):
            f.unlink()

    def write_run(self, run: dict[str, Any]) -> None:
        self._write(self.dir / "run.json", run)

    def read_run(self) -> dict[str, Any]:
        return json.loads((self.dir / "run.json").read_text())

    def write_row(self, row: Row) -> None:
        data = {
            f.name: getattr(row, f.name) for f in dataclasses.fields(Row) if f.metadata.get("stored", True)
        }
        self._write(self.row_file(row.key), data)

    def read_rows(self) -> dict[tuple[str, str, str], Row]:
        rows = (Row(**json.loads(f.read_text())) for f in sorted(self.dir.glob("row_*.json")))
        return {r.key: r for r in rows}

    def write_speed(self, rows: list[dict[str, Any]]) -> None:
        for i, r in enumerate(rows):
            self._write(self.dir / f"speed_{i}.json", r)

    def read_speed(self) -> list[dict[str, Any]]:
        files = sorted(self.dir.glob("speed_*.json"), key=lambda f: int(f.stem.split("_")[1]))
        return [json.loads(f.read_text()) for f in files]

    def planned_rows(self) -> list[Row]:
        """The run's rows in table order: stored ones as measured, the others *not reached*."""
        stored = self.read_rows()
        rows = []
        for scheme, tool, method, fmt in self.read_run()["plan"]:
            row = stored.get((scheme, tool, method)) or Row(scheme, tool, method, NOT_REACHED, format=fmt)
            rows.append(row)
        fill_deltas(rows)
        return rows


def fill_deltas(rows: list[Row]) -> None:
    """Perplexity increase over fp32, and ours relative to onnxruntime's best at the same scheme."""
    base = next((r.perplexity for r in rows if r.tool == "fp32"), None)
    if base is None:
        return
    for r in rows:
        r.rel_to_ort_best = None
        if r.perplexity is not None:
            r.delta_pct = 100.0 * (r.perplexity - base) / base
    for r in rows:
        if r.tool != "ours" or r.delta_pct is None:
            continue
        ort = [
            o.delta_pct
            for o in rows
            if o.scheme == r.scheme and o.tool == "onnxruntime" and o.delta_pct is not None
        ]
        if ort and min(ort) > 0:
            r.rel_to_ort_best = r.delta_pct / min(ort)
