"""`pixelflow report RUN_DIR [RUN_DIR ...]`: PNG plots of metrics.jsonl for people without wandb.

One figure per quantity (loss per stage, throughput, MFU, data wait, balance, grad norm), every run given
overlaid in its own colour and labelled by the shortest end of its path that tells it from the others
(`a/run` and `b/run`). Quantities no run logged are skipped; a torn last line (a write cut short) is dropped.
"""

from __future__ import annotations

from pathlib import Path

from pixelflow.errors import ConfigError
from pixelflow.records import read_records

PLOTS = {  # file name -> (title, keys: one line per key and run)
    "loss.png": ("loss", ["loss"]),
    "loss_per_stage.png": ("loss per stage", [f"loss_stage{i}" for i in range(8)]),
    "throughput.png": ("images per second", ["img_per_s"]),
    "mfu.png": ("model FLOPs utilisation", ["mfu"]),
    "data_wait.png": ("share of the step waiting for data", ["data_wait_fraction"]),
    "balance.png": ("slowest rank / mean", ["plan_max_over_mean", "busy_max_over_mean"]),
    "grad_norm.png": ("gradient norm", ["grad_norm"]),
}


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no metrics.jsonl (not a run directory, or no step logged yet)")
    return read_records(path)


def distinct_labels(paths: list[Path]) -> list[str]:
    """For each path the fewest trailing components that no other path given ends in."""
    parts = [Path(path).resolve().parts for path in paths]
    labels = []
    for mine in parts:
        for length in range(1, len(mine) + 1):
            tail = mine[-length:]
            if all(other == mine or other[-length:] != tail for other in parts):
                break
        labels.append(str(Path(*tail)))
    return labels


def write_report(run_dirs: list[Path], out: Path) -> tuple[list[str], list[Path]]:
    """Write the plots into `out`; returns (the runs' labels, the files written). One error line when no run
    logged a loss."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    runs = dict(zip(distinct_labels(run_dirs), (read_metrics(run_dir) for run_dir in run_dirs)))
    if not any("loss" in record for records in runs.values() for record in records):
        raise ConfigError(f"{', '.join(map(str, run_dirs))}: no logged losses in metrics.jsonl: nothing to plot")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, keys) in PLOTS.items():
        lines = [
            (run, key, [r["step"] for r in records if key in r], [r[key] for r in records if key in r])
            for run, records in runs.items()
            for key in keys
        ]
        lines = [line for line in lines if line[2]]
        if not lines:
            continue
        figure, axes = pyplot.subplots(figsize=(7, 4))
        for run, key, steps, values in lines:
            label = run if len(keys) == 1 else f"{run}: {key}"
            axes.plot(steps, values, label=label)
        axes.set_title(title)
        axes.set_xlabel("step")
        if name.startswith("loss"):
            axes.set_yscale("log")
        axes.legend(fontsize="small")
        figure.tight_layout()
        figure.savefig(out / name, dpi=100)
        pyplot.close(figure)
        written.append(out / name)
    return list(runs), written
