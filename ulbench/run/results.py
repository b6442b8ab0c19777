"""``results.jsonl``, the rows of a run: one per metric of each evaluated point, written a point at a time."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ulbench.io import atomic_write, read_json_lines


class ResultsStore:
    """``results.jsonl``: rows keyed by (method, point); a point's rows are written together, atomically. Several
    writers (one SLURM job per method) share the file: ``add`` re-reads it under a lock and adds to what is there."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = self._read()

    def _read(self) -> list[dict]:
        return read_json_lines(self.path) if self.path.is_file() else []

    def done(self, method: str, point: str) -> bool:
        return any(r["method"] == method and r["point"] == point for r in self.rows)

    def add(self, rows: list[dict]) -> None:
        """Stores a point's rows, replacing that point's old ones. A non-finite value is refused, not stored: every
        comparison with NaN is false, so a NaN row would pass a regression check (``ulbench check`` fails one too)."""
        from ulbench.run.lock import file_lock

        bad = [f"{r['method']} {r['point']} {r['metric']} = {r['value']}" for r in rows
               if not math.isfinite(r["value"])]
        if bad:
            raise FloatingPointError(f"{self.path}: not stored, non-finite metric values: {'; '.join(bad)}. The "
                                     "run's weights or samples hold NaN/inf (see the training log's "
                                     "nonfinite_steps); the other rows are kept and --resume retries this point")

        with file_lock(self.path.with_name(".results.lock")):
            self.rows = self._read()
            new = {(r["method"], r["point"]) for r in rows}
            self.rows = [r for r in self.rows if (r["method"], r["point"]) not in new] + rows
            with atomic_write(self.path) as f:
                f.writelines(json.dumps(r, default=float) + "\n" for r in self.rows)
