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
SUMMARY_COLUMNS = (("fvu", ".4f"), ("l0", ".1f"), ("target_l0", "g"), ("dead_pct", ".1f"))  # record key, format


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
        self.decomposers = config.get("decomposers", {})  # name -> {"kind", its config fields}
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
        if self.bar is not None:  # the bar has room for one dictionary: the first, named
            name, first = next(iter(records.items()))
            shown = " ".join(f"{k} {first[k]:.4g}" for k in ("loss", "fvu", "l0") if k in first)
            self.bar.set_postfix_str(f"{name}: {shown}" + (f" (+{len(records) - 1} more)" if len(records) > 1 else ""),
                                     refresh=False)

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

    def summary(self) -> str:
        """A table of each dictionary's last logged record: FVU, L0 (and its target_l0, if any), dead fraction."""
        rows = []
        for name, path in self.log_paths.items():
            records = read_log(path) if path.is_file() else []
            if not records:
                continue
            last, settings = records[-1], self.decomposers.get(name, {})
            shown = {**last, "target_l0": settings.get("target_l0"), "dead_pct": 100 * last["dead_frac"] if "dead_frac" in last else None}
            rows.append([name, str(settings.get("kind", "-")), str(last["step"]),
                         *(f"{shown[k]:{form}}" if shown.get(k) is not None else "-" for k, form in SUMMARY_COLUMNS)])
        if not rows:
            return ""
        head = ["dictionary", "kind", "step", "FVU", "L0", "target L0", "dead %"]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in [head, *rows]]
        return "\n".join(["training finished (FVU and L0: means over the last logged steps):", *lines])

    def close(self, failed: bool = False) -> None:
        """Close the bar and wandb; after a run that finished, print the summary table (main process only)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.enabled and not failed:
            table = self.summary()
            if table:
                print(table, flush=True)
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None
