"""`skcdf demo`: the whole job on the built-in phantom, on a CPU, in about ten minutes.

phantom → train SKCDF (`phantom` preset) → predict the held-out test cases → evaluate →
a per-class table in the paper's layout, an overlay PNG, training curves, and ``report.md`` linking
them. Every stage reuses what an earlier, interrupted demo in the same folder left, so running the
same command again resumes.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from skcdf.utils import atomic_write_text

#: Minutes of training the `phantom` preset's epoch count was sized for (2 CPU cores, see README).
PRESET_MINUTES = 7.0


def _log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _scaled_epochs(preset_epochs: int, minutes: float) -> int:
    """The preset's epochs scaled to a training budget of ``minutes``."""
    return max(1, round(preset_epochs * minutes / PRESET_MINUTES))


def run_demo(out: str | Path = "demo_out", minutes: float = PRESET_MINUTES, seed: int = 0,
             device: str = "auto") -> Path:
    """Run the demo into ``out`` and return the path of its ``report.md``.

    ``minutes`` scales the training budget (the number of epochs; the time per epoch is the
    machine's). ``seed`` seeds the phantom and the training run.
    """
    from skcdf.checkpoint import load_model
    from skcdf.data.layout import load_image, load_label, read_dataset_info, read_split
    from skcdf.data.phantom import generate_phantom
    from skcdf.infer import predict_dataset
    from skcdf.metrics import evaluate_folders, read_label_file
    from skcdf.train.config import load_config
    from skcdf.train.trainer import train
    from skcdf.viz import overlay_png, plot_curves

    out = Path(out)
    data, run, predictions, evaluation = out / "data", out / "run", out / "predictions", out / "eval"
    started = time.monotonic()

    if (data / "dataset.json").is_file():
        _log(f"1/5 phantom: reusing {data}")
    else:
        _log(f"1/5 phantom: generating a class-imbalanced abdominal CT phantom into {data}")
        generate_phantom(data, seed=seed)

    config = load_config("phantom", [f"seed={seed}", f"device={device}"])
    config["epochs"] = _scaled_epochs(config["epochs"], minutes)
    resume = (run / "config.yaml").is_file()  # the trainer does nothing more for a finished run
    _log(f"2/5 train: SKCDF for {config['epochs']} epochs (about {minutes:g} min on 2 CPU cores)"
         + (f", resuming the run in {run}" if resume else f" into {run}"))
    train(config, data, run, resume=resume)

    _log("3/5 predict: sliding window over the test cases")
    model, preprocessing = load_model(run)
    summary = predict_dataset(model, data, predictions, preprocessing, split="test")
    if summary.failures:
        raise RuntimeError(f"prediction failed for {len(summary.failures)} case(s): {summary.failures}")

    _log("4/5 evaluate: Dice and ASD per class")
    evaluate_folders(predictions, data, evaluation, split="test", name="SKCDF (phantom)")

    _log("5/5 pictures and report")
    case = read_split(data, "test")[0]
    prediction, _ = read_label_file(predictions / f"{case}.nii.gz", model.num_classes)
    overlay_png(load_image(data, case), load_label(data, case), prediction, out / "overlay.png",
                class_abbrevs=read_dataset_info(data)["class_abbrevs"], window=preprocessing["window"])
    plot_curves(run / "metrics.csv", out / "curves.png")
    report = out / "report.md"
    atomic_write_text(report, _report_text(out, run, data, case, time.monotonic() - started))
    print((evaluation / "table.md").read_text())
    _log(f"overlay: {out / 'overlay.png'}   curves: {out / 'curves.png'}")
    _log(f"trained model: {run / 'best.pt'} — predict a scan with:\n"
         f"  skcdf predict {_shell_word(run)} path/to/scan.nii.gz {_shell_word(out / 'my_scan')}")
    _log(f"done in {(time.monotonic() - started) / 60:.1f} min — report: {report}")
    return report


def _report_text(out: Path, run: Path, data: Path, case: str, seconds: float) -> str:
    table = (out / "eval" / "table.md").read_text()
    q = _shell_word
    return f"""# skcdf demo report

SKCDF trained on the built-in phantom ({data}) on this machine; total time {seconds / 60:.1f} min.
Dice in %, ASD in voxels, per class over the test cases (SPEC §4 conventions).

{table}
Per-case values: [eval/per_case.csv](eval/per_case.csv); summary: [eval/summary.json](eval/summary.json).

## Test case `{case}`: ground truth beside prediction

![overlay](overlay.png)

## Training curves

![curves](curves.png)

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


def _shell_word(path: Path) -> str:
    """``path`` quoted for a shell command a user can paste."""
    return shlex.quote(str(path))


def main_cli(out: str, minutes: float, seed: int, device: str) -> int:
    """Entry for `skcdf demo`: Ctrl-C stops cleanly and says how to resume."""
    try:
        run_demo(out, minutes, seed, device)
    except KeyboardInterrupt:
        print(f"\n[demo] interrupted. Resume where it stopped with:\n  skcdf demo --out {_shell_word(out)}"
              + (f" --minutes {minutes:g}" if minutes != PRESET_MINUTES else ""), file=sys.stderr)
        return 130
    return 0
