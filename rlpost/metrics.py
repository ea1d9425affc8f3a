"""Run metrics: JSONL in the run directory always, wandb when configured, a progress bar on a tty.

wandb is offline unless the user asks for online mode (and has a key): a laptop run never blocks
on a login prompt, and ``wandb sync`` uploads the offline run later.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from tqdm import tqdm

from rlpost.config import LoggerConfig


class MetricsLogger:
    def __init__(self, cfg: LoggerConfig, run_dir: str, run_name: str, total_steps: int,
                 config: dict[str, Any]):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._fh = open(self.path, "a", buffering=1)
        self._t0 = time.time()
        self._wandb = None
        if cfg.backend == "wandb":
            import wandb

            os.environ.setdefault("WANDB_MODE", cfg.wandb_mode)
            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(project=cfg.project, entity=cfg.entity, name=run_name, dir=run_dir,
                                     config=config, mode=os.environ["WANDB_MODE"])
        self._bar = tqdm(total=total_steps, desc="rl", unit="step", dynamic_ncols=True,
                         disable=not cfg.progress, mininterval=1.0)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        # A non-finite value stays visible (as "nan" / "inf", strict JSON), never silently dropped:
        # a NaN loss is exactly what a reader of metrics.jsonl must see.
        shown = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        record = {"step": step, "time_s": round(time.time() - self._t0, 3), **shown}
        self._fh.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        """Rows (dicts with the same keys) as a wandb table; nothing without wandb (the rows are
        in the run dir already)."""
        if self._wandb is None or not rows:
            return
        import wandb

        columns = list(dict.fromkeys(k for r in rows for k in r))  # every row's keys, first-seen order

        def cell(value: Any) -> Any:  # lists and dicts as text: a wandb column keeps one type
            return value if value is None or isinstance(value, (str, int, float, bool)) else json.dumps(value)

        self._wandb.log({name: wandb.Table(columns=columns, data=[[cell(r.get(c)) for c in columns] for r in rows])},
                        step=step)

    def progress(self, step: int, metrics: dict[str, Any]) -> None:
        self._bar.n = step
        self._bar.set_postfix(reward=f"{metrics.get('reward/mean', 0):.3f}",
                              v=metrics.get("weights/version", ""), refresh=False)
        self._bar.refresh()

    def summary(self, values: dict[str, Any]) -> None:
        if self._wandb is not None:
            self._wandb.summary.update(values)

    def close(self) -> None:
        self._bar.close()
        self._fh.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str) -> list[dict[str, Any]]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
