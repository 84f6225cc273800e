"""`skcdf ablate`: the paper's ablations (Tables 3, 4, 5) over several seeds, in one command.

Each table row is an :class:`AblationRow`: a training configuration (a variant plus overrides) and the
decoder used at inference. Rows that share a configuration share its training run (Table 4's two
decoders are one run evaluated twice). Runs and evaluations live in ``OUT/<run name>/seed<S>/`` and
are reused when they already finished, so an interrupted ablation picks up where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from skcdf.utils import atomic_write_text

#: Table 3 rows, in the paper's order, and the two references of SPEC §3.
TABLE3_VARIANTS = ("baseline", "df", "df_skcm", "df_absh", "full")
REFERENCE_VARIANTS = ("labeled_only", "fully_supervised")
#: Table 5: knowledge-transfer orders (H→D, D→H→H, H→H→D, H→D→H; plain D is the +DF row).
EMA_ORDERS = ("D", "Hl,D", "D,Hl,Hu", "Hl,Hu,D", "Hl,D,Hu")
VARIANT_TITLES = {
    "baseline": "Baseline (pseudo-labelling)", "df": "+ DF", "df_skcm": "+ DF + SKCM", "df_absh": "+ DF + ABSH",
    "full": "SKCDF", "labeled_only": "Labeled only (VNet)", "fully_supervised": "Fully supervised (VNet)",
}


@dataclass
class AblationRow:
    """One row of an ablation table: ``title``, the training overrides and the inference decoder."""

    title: str
    overrides: dict[str, Any] = field(default_factory=dict)
    decoder: str = "unlabeled"

    @property
    def run_name(self) -> str:
        """Folder name of the training run; equal overrides share it."""
        parts = [str(self.overrides.get("variant", "full"))]
        parts += [f"{k}-{str(v).replace(',', '-')}" for k, v in sorted(self.overrides.items()) if k != "variant"]
        return "_".join(parts)


def plan_rows(variants: Sequence[str], *, ema_orders: bool = False, decoders: bool = False,
              mask_modes: bool = False) -> list[AblationRow]:
    """The rows to run: the given variants, then optionally Table 5's EMA orders, Table 4's labeled
    decoder, and the `exclude` balanced-mask mode (all on the full SKCDF)."""
    rows = [AblationRow(VARIANT_TITLES.get(v, v), {"variant": v}) for v in variants]
    if ema_orders:
        rows += [AblationRow(f"SKCDF, EMA {order}", {"variant": "full", **({} if order == "Hl,D,Hu" else {"ema_order": order})})
                 for order in EMA_ORDERS]
    if decoders:
        rows.append(AblationRow("SKCDF, labeled decoder", {"variant": "full"}, decoder="labeled"))
    if mask_modes:
        rows.append(AblationRow("SKCDF, mask mode exclude", {"variant": "full", "balance_mode": "exclude"}))
    unique: dict[tuple, AblationRow] = {}
    for row in rows:  # e.g. "SKCDF" and "SKCDF, EMA Hl,D,Hu" are the same experiment
        unique.setdefault((row.run_name, row.decoder), row)
    return list(unique.values())


def run_ablation(preset: str, data: str | Path, out: str | Path, rows: Sequence[AblationRow],
                 seeds: Sequence[int] = (0, 1, 666), overrides: Sequence[str] = ()) -> Path:
    """Train, predict and evaluate every row for every seed (reusing finished work), then write
    ``OUT/ablation.md``: mean ± std over seeds of the average Dice and ASD, and per-class Dice.

    ``overrides`` are ``key=value`` settings applied to every run (e.g. ``epochs=20``).
    """
    from skcdf.checkpoint import load_model
    from skcdf.infer import InferenceSettings, predict_dataset
    from skcdf.metrics import evaluate_folders
    from skcdf.report import aggregate, load_summary, render_table
    from skcdf.train.config import load_config
    from skcdf.train.trainer import train

    data, out = Path(data), Path(out)
    table_rows = []
    for number, row in enumerate(rows, 1):
        summaries = []
        for seed in seeds:
            run = out / row.run_name / f"seed{seed}"
            evaluation = run / f"eval-{row.decoder}"
            tag = f"[ablate {number}/{len(rows)}] {row.title}, seed {seed}"
            if not (evaluation / "summary.json").is_file():
                settings = [*overrides, *(f"{k}={v}" for k, v in row.overrides.items()), f"seed={seed}"]
                config = load_config(preset, settings)
                print(f"{tag}: training in {run}", flush=True)
                train(config, data, run, resume=(run / "config.yaml").is_file())
                print(f"{tag}: predicting and evaluating ({row.decoder} decoder)", flush=True)
                model, preprocessing = load_model(run)
                predictions = run / f"pred-{row.decoder}"
                result = predict_dataset(model, data, predictions, preprocessing,
                                         InferenceSettings(decoder=row.decoder), split="test")
                if result.failures:
                    raise RuntimeError(f"{run}: prediction failed for {result.failures}")
                evaluate_folders(predictions, data, evaluation, split="test", name=row.title)
            else:
                print(f"{tag}: reusing {evaluation}", flush=True)
            summaries.append(load_summary(evaluation / "summary.json"))
        table_rows.append((row.title, aggregate(summaries)))
    text = (f"# Ablation on `{data}` (preset `{preset}`, seeds {', '.join(map(str, seeds))})\n\n"
            "Mean ± std over seeds of each run's class-averaged Dice (%) and ASD (voxels); per-class columns "
            "are mean Dice.\n\n" + render_table(table_rows) + "\n")
    table = out / "ablation.md"
    atomic_write_text(table, text)
    return table
