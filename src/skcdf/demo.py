"""`skcdf demo`: the whole job on the built-in phantom, on a CPU, in about ten minutes.

phantom → train SKCDF and, beside it, the labeled-only VNet (`phantom_tiny` preset, same budget) →
predict the held-out test cases → evaluate → a per-class table of both in the paper's layout, an
overlay PNG, training curves, and ``report.md`` linking them, with the paired comparison of the two
runs over the test cases (:mod:`skcdf.compare`). Every stage reuses what an earlier,
interrupted demo in the same folder left, so running the same command again resumes.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

from skcdf import methods
from skcdf.methods import Method
from skcdf.utils import atomic_write_text

# The functions below import torch, the trainer and prediction where they use them: `skcdf --help`
# imports this module (for DEFAULT_MINUTES), and should not wait seconds for them.

#: The demo's training configuration (a preset) and the phantom it is sized for.
PRESET = "phantom_tiny"
PHANTOM_SHAPE = (32, 48, 48)
#: Default budget in minutes for the training, the timed trial included (2 CPU cores: see README).
DEFAULT_MINUTES = 7.0
#: Epochs of the timed trial that sizes the training to the budget.
TRIAL_EPOCHS = 4


def _log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


@dataclass(frozen=True)
class Trial:
    """What the timed trial measured: its whole wall-clock time, start-up included, and the pace of
    the runs once they are going (seconds per epoch of both runs, side by side or one after the other)."""

    seconds: float
    seconds_per_epoch: float


def epochs_in_budget(minutes: float, trial: Trial) -> int:
    """Epochs of the real runs that fit in ``minutes`` after the trial (at least 1).

    The trial's time is spent from the budget, and the real runs pay its start-up again: everything
    the trial took beyond TRIAL_EPOCHS epochs at the measured pace (process start, data loading and
    the first, slow epoch). Counting the first epoch twice, and the trial at all, errs short.
    """
    start_up = max(0.0, trial.seconds - TRIAL_EPOCHS * trial.seconds_per_epoch)
    left = minutes * 60 - trial.seconds - start_up
    return max(1, int(left / trial.seconds_per_epoch))


def planned_epochs(out: Path, minutes: float, device_type: str, trial: Callable[[], Trial]) -> int:
    """Epochs each of the demo's runs trains, on any device: ``trial()`` times a short run of both
    (:func:`_time_trial`) and :func:`epochs_in_budget` fills ``minutes`` at that pace. The plan is
    saved as OUT/plan.json, so a resumed demo trains to the same length without a second trial."""
    plan = out / "plan.json"
    if plan.is_file():
        return int(json.loads(plan.read_text())["epochs"])
    timing = trial()
    epochs = epochs_in_budget(minutes, timing)
    atomic_write_text(plan, json.dumps({"device": device_type, "minutes": minutes, "trial_seconds": timing.seconds,
                                        "seconds_per_epoch": timing.seconds_per_epoch, "epochs": epochs}) + "\n")
    return epochs


_EPOCH_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) epoch (\d+):", re.MULTILINE)


def epoch_pace(log: Path) -> float | None:
    """Seconds per epoch of a run from its train.log: from the first epoch's line to the last (the
    first epoch, which warms up, is left out). None with fewer than two epochs logged."""
    lines = _EPOCH_LINE.findall(log.read_text()) if log.is_file() else []
    if len(lines) < 2:
        return None
    (first_time, first), (last_time, last) = lines[0], lines[-1]
    clock = (lambda stamp: datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp())
    return (clock(last_time) - clock(first_time)) / (int(last) - int(first))


def _time_trial(out: Path, data: Path, settings: list[str], jobs: int,
                clock: Callable[[], float] = time.monotonic) -> Trial:
    """Train both runs for TRIAL_EPOCHS the way the demo will (side by side when ``jobs`` > 1) and time
    them (the trial is deleted). The pace comes from the runs' logs; without it, the whole trial's."""
    from skcdf.ablate import train_runs

    _log(f"2/5 train: timing {TRIAL_EPOCHS} epochs of both runs to fit the training in the budget")
    trial = out / "trial"
    shutil.rmtree(trial, ignore_errors=True)
    todo = {trial / run.method.name: [*settings, f"variant={run.method.name}", f"epochs={TRIAL_EPOCHS}", "val_every=0"]
            for run in demo_runs()}
    started = clock()
    train_runs(PRESET, data, todo, jobs)
    seconds = clock() - started
    paces = [epoch_pace(run / "train.log") for run in todo]
    shutil.rmtree(trial)
    if None in paces:
        return Trial(seconds, seconds / TRIAL_EPOCHS)
    return Trial(seconds, max(paces) if jobs > 1 else sum(paces))


@dataclass(frozen=True)
class DemoRun:
    """One of the demo's runs (skcdf.methods.demo_methods: SKCDF, and the same network trained on the
    labeled cases alone) and its folders in OUT: run, predictions and evaluation, e.g. ``run`` and
    ``run-labeled-only``."""

    method: Method

    @property
    def suffix(self) -> str:
        return "" if self.method.name == methods.MAIN else "-" + self.method.name.replace("_", "-")

    @property
    def run(self) -> str:
        return "run" + self.suffix

    @property
    def predictions(self) -> str:
        return "predictions" + self.suffix

    @property
    def evaluation(self) -> str:
        return "eval" + self.suffix


def demo_runs() -> list[DemoRun]:
    """The demo's runs, SKCDF first."""
    return [DemoRun(method) for method in methods.demo_methods()]


def run_demo(out: str | Path = "demo_out", minutes: float = DEFAULT_MINUTES, seed: int = 0,
             device: str = "auto") -> Path:
    """Run the demo into ``out`` and return the path of its ``report.md``.

    SKCDF and the labeled-only VNet train side by side for the same number of iterations (each on
    one CPU core, or together on one GPU), then both predict and are evaluated on the test cases.
    ``minutes`` is the training budget, a timed trial included: on any device the trial sizes the
    epochs to fill it (see :func:`planned_epochs`). ``seed`` seeds the phantom and the training runs.
    """
    from skcdf.ablate import train_runs
    from skcdf.checkpoint import load_model
    from skcdf.data.layout import load_image, load_label, read_dataset_info, read_split
    from skcdf.data.phantom import generate_phantom
    from skcdf.device import resolve_device
    from skcdf.evaluation import read_label_file
    from skcdf.parallel import available_cores
    from skcdf.predict import predict_and_evaluate
    from skcdf.viz import overlay_png, plot_curves

    out = Path(out)
    data = out / "data"
    started = time.monotonic()

    if (data / "dataset.json").is_file():
        _log(f"1/5 phantom: reusing {data}")
    else:
        _log(f"1/5 phantom: generating a class-imbalanced abdominal CT phantom into {data}")
        generate_phantom(data, seed=seed, shape=PHANTOM_SHAPE)

    device_type = resolve_device(device).type
    runs = demo_runs()
    jobs = len(runs) if available_cores() >= len(runs) or device_type != "cpu" else 1
    settings = [f"seed={seed}", f"device={device}"]
    epochs = planned_epochs(out, minutes, device_type, lambda: _time_trial(out, data, settings, jobs))
    todo = {out / run.run: [*settings, f"epochs={epochs}", f"variant={run.method.name}"] for run in runs}
    budget = f"{minutes:g} min on {device_type}, the trial included"
    _log(f"2/5 train: SKCDF and, beside it, the labeled-only VNet, {epochs} epochs each "
         f"({budget}) into {', '.join(str(run) for run in todo)}")
    train_runs(PRESET, data, todo, jobs=jobs)

    _log("3/5 predict and 4/5 evaluate: sliding window over the test cases, Dice and ASD per class")
    for run in runs:
        model, preprocessing = load_model(out / run.run)
        predict_and_evaluate(model, data, out / run.predictions, out / run.evaluation, preprocessing,
                             run.method.demo_title)

    _log("5/5 pictures and report")
    run = out / "run"
    case = read_split(data, "test")[0]
    info = read_dataset_info(data)
    prediction, _ = read_label_file(out / "predictions" / f"{case}.nii.gz", int(info["num_classes"]))
    overlay_png(load_image(data, case), load_label(data, case), prediction, out / "overlay.png",
                class_abbrevs=info["class_abbrevs"], window=info.get("window"))
    plot_curves(run / "metrics.csv", out / "curves.png")
    plot_curves(out / "run-labeled-only" / "metrics.csv", out / "curves-labeled-only.png")
    report = out / "report.md"
    text, table = _report_text(out, run, data, case, time.monotonic() - started)
    atomic_write_text(report, text)
    print(table)
    _log(f"overlay: {out / 'overlay.png'}   curves: {out / 'curves.png'}")
    _log(f"trained model: {run / 'best.pt'} — predict a scan with:\n"
         f"  skcdf predict {_shell_word(run)} path/to/scan.nii.gz {_shell_word(out / 'my_scan')}")
    _log(f"done in {(time.monotonic() - started) / 60:.1f} min — report: {report}")
    return report


def _comparison(out: Path, data: Path) -> tuple[str, str, str]:
    """The two runs' table, a sentence comparing SKCDF with labeled-only at the same budget, and the
    paired comparison over the test cases (table and one-sentence reading)."""
    from skcdf.ablate import trained_iterations
    from skcdf.compare import Method as ComparedMethod
    from skcdf.compare import compare_to_reference, reading, render_markdown
    from skcdf.report import aggregate, load_summary, render_table

    runs = {run.method.name: run for run in demo_runs()}
    main, reference = runs[methods.MAIN], runs[methods.REFERENCE]
    summaries = {name: load_summary(out / run.evaluation / "summary.json") for name, run in runs.items()}
    table = render_table([(runs[name].method.demo_title, aggregate([s])) for name, s in summaries.items()])
    full, labeled = (summaries[run.method.name]["average"]["dice"] for run in (main, reference))
    iterations = trained_iterations(out / main.run)
    verdict = "above" if full > labeled else "below" if full < labeled else "level with"
    sentence = (f"The demo trained the `{main.method.name}` SKCDF variant and, for comparison, the same VNet on "
                f"the labeled cases alone (`{reference.method.name}`), each for {iterations} iterations. SKCDF's "
                f"mean Dice is {full:.2f} %, {verdict} labeled-only's {labeled:.2f} % ({full - labeled:+.2f} points).")
    compared_main, compared_reference = (ComparedMethod(run.method.demo_title, {"seed": out / run.evaluation})
                                         for run in (main, reference))
    rows = compare_to_reference(compared_reference, [compared_main], data)
    n = rows[0].stats.n
    floor = (f"With {n} test cases the smallest possible p is {2 / 2 ** n:.3g}, reached only when one run "
             "is ahead on every case.")
    return table, sentence, f"{render_markdown(rows)}\n{reading(rows[0])} {floor}\n"


def _report_text(out: Path, run: Path, data: Path, case: str, seconds: float) -> tuple[str, str]:
    """The report's Markdown, and the results table alone (printed at the end)."""
    table, sentence, paired = _comparison(out, data)
    q = _shell_word
    text = f"""# skcdf demo report

SKCDF trained on the built-in phantom ({data}) on this machine; total time {seconds / 60:.1f} min.
{sentence}
Dice in %, ASD in voxels, per class over the test cases (SPEC §4 conventions).

{table}
Per-case values: [eval/per_case.csv](eval/per_case.csv) (SKCDF),
[eval-labeled-only/per_case.csv](eval-labeled-only/per_case.csv) (labeled only).

## Paired comparison: SKCDF against labeled-only

Per test case (one seed), the difference of the Dice averaged over all organs, the large ones and
the six smallest in the training labels; mean, bootstrap 95 % interval and two-sided Wilcoxon
signed-rank p (`skcdf compare`, docs/metrics.md).

{paired}
## Test case `{case}`: ground truth beside SKCDF's prediction

![overlay](overlay.png)

## Training curves

SKCDF: losses, validation Dice per organ, the Dice of each head and of the pseudo-labels, and the
pseudo-labels' foreground fraction beside the true one.

![curves](curves.png)

Labeled only:

![curves of the labeled-only run](curves-labeled-only.png)

## The trained model

`{run / 'best.pt'}` (best validation Dice; `{run / 'last.pt'}` is the last epoch).
Predict with it:

```
skcdf predict {q(run)} {q(data)} {q(out / 'predictions')} --split test
skcdf predict {q(run)} path/to/scan.nii.gz {q(out / 'my_scan')}      # a raw scan, written in its own grid
skcdf evaluate {q(out / 'predictions')} {q(data)} --split test --out {q(out / 'eval')}
skcdf overlay {q(data / 'npy' / f'{case}_image.npy')} {q(data / 'npy' / f'{case}_label.npy')} {q(out / 'predictions' / f'{case}.nii.gz')} --out overlay.png
```
"""
    return text, table


def _shell_word(path: Path) -> str:
    """``path`` quoted for a shell command a user can paste."""
    return shlex.quote(str(path))


def main_cli(out: str, minutes: float, seed: int, device: str) -> int:
    """Entry for `skcdf demo`: Ctrl-C stops cleanly and says how to resume."""
    try:
        run_demo(out, minutes, seed, device)
    except KeyboardInterrupt:
        print(f"\n[demo] interrupted. Resume where it stopped with:\n  skcdf demo --out {_shell_word(out)}"
              + (f" --minutes {minutes:g}" if minutes != DEFAULT_MINUTES else ""), file=sys.stderr)
        return 130
    return 0
