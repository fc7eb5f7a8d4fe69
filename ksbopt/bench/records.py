"""Run identities and their JSON records (no JAX or Flax import: cheap to load).

A record is written atomically (temporary file + rename) when its run ends, so an interrupted
benchmark leaves only complete records; :func:`load_record` trusts a record only if it is
complete and was made with the same configuration.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["SCHEMA", "RunConfig", "jsonable", "load_record", "record_path", "write_atomic"]

SCHEMA = 1


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What identifies a run. ``hparams`` are overrides of the registry defaults; ``schedule``
    the learning-rate schedule arm (``constant`` or ``cosine``, see :mod:`ksbopt.bench.protocol`).
    """

    experiment: str
    task: str
    optimizer: str
    learning_rate: float
    seed: int
    scale: str
    hparams: tuple[tuple[str, Any], ...] = ()
    steps: int | None = None  # None: the task's default at this scale
    schedule: str = "constant"

    @property
    def run_id(self) -> str:
        hp = "".join(f"_{k}{v:g}" for k, v in self.hparams)
        arm = "" if self.schedule == "constant" else f"__{self.schedule}"
        return (
            f"{self.experiment}__{self.task}__{self.optimizer}{hp}"
            f"__lr{self.learning_rate:g}__s{self.seed}{arm}"
        )

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hparams"] = dict(self.hparams)
        return d


def record_path(out: Path, cfg: RunConfig) -> Path:
    return Path(out) / "runs" / f"{cfg.run_id}.json"


def jsonable(x):
    return json.loads(json.dumps(x))


def load_record(path: Path, config: Mapping | None = None) -> dict | None:
    """The record at ``path`` if it is complete (and holds ``config``, when given)."""
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if rec.get("schema") != SCHEMA or "final" not in rec:
        return None
    if config is not None and rec.get("config") != jsonable(config):
        return None
    return rec


def write_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    # compact: a record holds curves evaluated every <= 2% of the run, per symmetry group
    tmp.write_text(json.dumps(obj, separators=(",", ":"), allow_nan=True))
    os.replace(tmp, path)
