"""Training logs: train_log.jsonl per decomposer, a tqdm progress bar, and wandb (offline by default).

wandb's `offline` mode opens no socket: runs land in `<out_dir>/wandb/offline-run-*` and can be uploaded
later with `wandb sync <out_dir>/wandb/offline-run-*`. `online` logs live; `disabled` never imports wandb.
A resumed training run is a new wandb run in the same group (the out_dir's name), starting at the step it
resumed from. Only the first process of a multi-process job logs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from dictlearn.files import atomic_write_text

WANDB_MODES = ("offline", "online", "disabled")
LOG_FILE = "train_log.jsonl"


@dataclasses.dataclass
class WandbConfig:
    """The `[wandb]` table."""

    mode: str = "offline"  # offline | online | disabled
    project: str = "dictlearn"  # wandb project
    entity: str | None = None  # wandb entity (user or team)
    name: str | None = None  # run name (default: the out_dir's name)
    group: str | None = None  # wandb run group
    tags: list[str] = dataclasses.field(default_factory=list)  # wandb run tags

    def __post_init__(self) -> None:
        if self.mode not in WANDB_MODES:
            raise ValueError(f"mode must be one of {', '.join(WANDB_MODES)}, got {self.mode!r}")


def truncate_log(path: Path, last_step: int) -> None:
    """Drop records after `last_step` (a resumed run rewrites them), and any torn last line."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if record.get("step", 0) <= last_step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def read_log(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class TrainLogger:
    """Writes metric records for every decomposer of a pass to its jsonl file, wandb and the bar."""

    def __init__(
        self,
        out_dir: Path,
        log_paths: dict[str, Path],
        wandb_cfg: WandbConfig,
        config: dict[str, Any],
        n_steps: int,
        start_step: int,
        progress: bool = True,
        enabled: bool = True,
    ):
        self.enabled = enabled
        self.log_paths = log_paths
        self.run = None
        self.bar = None
        if not enabled:
            return
        for path in log_paths.values():
            path.parent.mkdir(parents=True, exist_ok=True)
            truncate_log(path, start_step)
        if wandb_cfg.mode != "disabled":
            import wandb

            (out_dir / "wandb").mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                # a resumed run logs as a new run in the same group, named after the step it resumed at
                name=(wandb_cfg.name or out_dir.name) + (f"-from-step-{start_step}" if start_step else ""),
                group=wandb_cfg.group or out_dir.name,
                tags=wandb_cfg.tags or None,
                dir=str(out_dir),
                mode=wandb_cfg.mode,
                config={**config, "resumed_at_step": start_step},
                settings=wandb.Settings(console="off", silent=True, save_code=False, disable_git=True),
            )
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=n_steps, initial=start_step, unit="step", dynamic_ncols=True, desc="train")

    def log(self, step: int, records: dict[str, dict[str, float]]) -> None:
        """One record per decomposer at optimiser step `step`."""
        if not self.enabled:
            return
        for name, record in records.items():
            with open(self.log_paths[name], "a") as f:
                f.write(json.dumps({"step": step, **record}) + "\n")
        if self.run is not None:
            flat = {f"{name}/{k}": v for name, record in records.items() for k, v in record.items()}
            self.run.log(flat, step=step)
        if self.bar is not None:
            first = next(iter(records.values()))
            self.bar.set_postfix({k: f"{first[k]:.4g}" for k in ("loss", "fvu", "l0") if k in first}, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self, failed: bool = False) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None
