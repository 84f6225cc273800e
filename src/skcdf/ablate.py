"""`skcdf ablate`: the paper's ablations (Tables 3, 4, 5) over several seeds, in one command.

Each table row is an :class:`AblationRow`: a training configuration (a variant plus overrides) and the
test-time rule (decoder, flip TTA). Rows that share a configuration share its training run (Table 4's two
decoders are one run evaluated twice); where a run has several rules, the validation split chooses one.
Runs and evaluations live in ``OUT/<run name>/seed<S>/`` and are reused when they already finished, so an
interrupted ablation picks up where it stopped.
"""

from __future__ import annotations

import csv
import io
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from skcdf import methods
from skcdf.compare import Method, compare_to_reference, write_comparison
from skcdf.parallel import available_cores
from skcdf.report import aggregate, load_summary, render_table
from skcdf.utils import InputError, atomic_write_text

# torch, the trainer and prediction are imported where they are used: `skcdf compare` imports this
# module (for ablation_methods) and should not wait seconds for them.

#: Table 5: knowledge-transfer orders (H→D, D→H→H, H→H→D, H→D→H; plain D is the +DF row).
EMA_ORDERS = ("D", "Hl,D", "D,Hl,Hu", "Hl,Hu,D", "Hl,D,Hu")


#: ``--decoders``: the test-time rules evaluated from the same checkpoint, (decoder, flip TTA); the first is
#: the paper's and each row's default.
TEST_TIME_RULES = tuple((decoder, tta) for tta in (False, True) for decoder in ("unlabeled", "labeled", "mean"))
#: ``--decoders`` for a run with one decoder (a single network, a Table 1 method): its rule, and with flip TTA.
ONE_DECODER_RULES = (("unlabeled", False), ("unlabeled", True))


@dataclass
class AblationRow:
    """One row of an ablation table: ``title``, the training overrides and the test-time rule (the decoder
    that predicts, :data:`skcdf.infer.DECODERS`, and whether flip TTA averages it)."""

    title: str
    overrides: dict[str, Any] = field(default_factory=dict)
    decoder: str = "unlabeled"
    tta: bool = False

    @property
    def rule(self) -> str:
        """The test-time rule's name in folder names: ``unlabeled``, ``labeled``, ``mean``, with ``-tta``."""
        return self.decoder + ("-tta" if self.tta else "")

    @property
    def variant(self) -> str:
        """The method the row trains (:data:`skcdf.methods.METHODS`)."""
        return str(self.overrides.get("variant", methods.MAIN))

    @property
    def run_name(self) -> str:
        """Folder name of the training run; equal overrides share it."""
        parts = [self.variant]
        parts += [f"{k}-{str(v).replace(',', '-')}" for k, v in sorted(self.overrides.items()) if k != "variant"]
        return "_".join(parts)


def plan_rows(variants: Sequence[str], *, ema_orders: bool = False, decoders: bool = False,
              mask_modes: bool = False, controls: bool = False) -> list[AblationRow]:
    """The rows to run: the given variants, each semi-supervised one followed by its control when ``controls``
    (:attr:`skcdf.methods.Method.control`: a Table 1 method at ``method_weight: 0``, an SKCDF variant at
    ``lambda_u: 0``), then optionally Table 5's EMA orders, the test-time rules (``decoders``:
    :data:`TEST_TIME_RULES` for every given variant with two decoders, else for SKCDF, and its own rule with
    flip TTA for every other variant; for the given variants' controls too when ``controls``; Table 4's labeled
    decoder among them), and the `exclude` balanced-mask mode (all on the full SKCDF)."""
    main = methods.method(methods.MAIN)
    rows = []
    for variant in variants:
        rows.append(AblationRow(methods.title(variant), {"variant": variant}))
        if controls and (control := control_row(variant)) is not None:
            rows.append(control)
    if ema_orders:
        rows += [AblationRow(f"{main.title}, EMA {order}",
                             {"variant": main.name, **({} if order == main.ema_order else {"ema_order": order})})
                 for order in EMA_ORDERS]
    if decoders:
        with_rules = [v for v in variants if has_two_decoders(v)] or [main.name]
        for variant in [*with_rules, *(v for v in variants if v not in with_rules)]:
            runs = [AblationRow(methods.title(variant), {"variant": variant})]
            if controls and variant in variants and (control := control_row(variant)) is not None:
                runs.append(control)  # its own rules too: each side of "method against control" chooses one
            rules = TEST_TIME_RULES if has_two_decoders(variant) else ONE_DECODER_RULES
            rows += [AblationRow(f"{run.title}, {rule_title(variant, decoder, tta)}", run.overrides,
                                 decoder=decoder, tta=tta)
                     for run in runs for decoder, tta in rules]
    if mask_modes:
        rows.append(AblationRow(f"{main.title}, mask mode exclude", {"variant": main.name, "balance_mode": "exclude"}))
    unique: dict[tuple, AblationRow] = {}
    for row in rows:  # e.g. "SKCDF" and "SKCDF, EMA Hl,D,Hu" are the same experiment
        unique.setdefault((row.run_name, row.rule), row)
    return list(unique.values())


def control_row(variant: str) -> AblationRow | None:
    """The row of ``variant``'s control (:attr:`skcdf.methods.Method.control`), None where it has none."""
    control = methods.METHODS[variant].control if variant in methods.METHODS else None
    return None if control is None else AblationRow(f"{methods.title(variant)}, no unlabeled term",
                                                    {"variant": variant, **control})


def has_two_decoders(variant: str) -> bool:
    """Whether ``variant`` (a method name) has D_l and D_u apart, so that :data:`TEST_TIME_RULES` differ; a
    single network or a Table 1 method has one rule of its own."""
    method = methods.METHODS.get(variant)
    return method is not None and method.semi and not method.plugin and not method.shared_decoder


def rule_title(variant: str, decoder: str, tta: bool) -> str:
    """How tables name ``variant``'s test-time rule, e.g. "labeled decoder", "decoder mean + flip TTA", and
    for a variant with one decoder "its rule" or "flip TTA"."""
    if not has_two_decoders(variant):
        return "flip TTA" if tta else "its rule"
    name = "decoder mean" if decoder == "mean" else f"{decoder} decoder"
    return name + (" + flip TTA" if tta else "")


def _train_one(preset: str, settings: list[str], data: str | Path, run: str | Path, threads: int | None = None) -> None:
    """Train (or finish) one run; ``threads`` sets the CPU threads of a worker process of a parallel ablation."""
    import torch

    from skcdf.train.config import load_config
    from skcdf.train.trainer import train

    if threads is not None:
        torch.set_num_threads(threads)
    train(load_config(preset, settings), data, run, resume=(Path(run) / "config.yaml").is_file())


def train_runs(preset: str, data: Path, todo: dict[Path, list[str]], jobs: int) -> None:
    """Train (or finish) every run of ``todo`` (run folder -> settings): in this process one after the
    other, or ``jobs`` at a time in worker processes that share the CPU cores (or one GPU)."""
    if jobs == 1:
        for number, (run, settings) in enumerate(todo.items(), 1):
            print(f"[ablate] training {number}/{len(todo)}: {run}", flush=True)
            _train_one(preset, settings, data, run)
        return
    threads = max(1, available_cores() // jobs)
    print(f"[ablate] training {len(todo)} run(s), {jobs} at a time ({threads} CPU thread(s) each)", flush=True)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_train_one, preset, settings, str(data), str(run), threads)
                   for run, settings in todo.items()]
        for future in futures:
            future.result()  # re-raises a worker's error; finished runs stay reusable


def trained_iterations(run: Path) -> int:
    """Training iterations of a finished run (the last row of its metrics.csv)."""
    with (run / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return int(rows[-1]["iteration"]) if rows else 0


def run_ablation(preset: str, data: str | Path, out: str | Path, rows: Sequence[AblationRow],
                 seeds: Sequence[int] = (0, 1, 666), overrides: Sequence[str] = (), jobs: int = 1,
                 csv_path: str | Path | None = None) -> Path:
    """Train, predict and evaluate every row for every seed (reusing finished work), then write
    ``OUT/ablation.md`` (mean ± std over seeds of the average Dice and ASD, and per-class Dice) and
    a machine-readable CSV (``csv_path``, default ``OUT/ablation.csv``): one line per row and seed with
    ``variant,seed,iterations,split,mean_dice`` and one Dice column per class.

    ``overrides`` are ``key=value`` settings applied to every run (e.g. ``epochs=20``). ``jobs`` > 1
    trains that many runs side by side in worker processes; evaluation follows in this process.
    Also writes ``OUT/comparison.md`` and ``OUT/comparison.csv``: every row against labeled-only,
    paired over the test cases and seeds (:func:`write_ablation_comparison`).
    """
    data, out = Path(data), Path(out)

    def evaluation(row: AblationRow, seed: int, split: str = "test") -> Path:
        return out / row.run_name / f"seed{seed}" / f"{'eval' if split == 'test' else 'val'}-{row.rule}"

    choosing = runs_with_several_rules(rows)  # their rule is chosen on the validation split
    pending = [(row, seed) for row in rows for seed in seeds
               if not all((evaluation(row, seed, split) / "summary.json").is_file()
                          for split in (("test", "val") if row.run_name in choosing else ("test",)))]
    todo = {out / row.run_name / f"seed{seed}": [*overrides, *(f"{k}={v}" for k, v in row.overrides.items()),
                                                 f"seed={seed}"] for row, seed in pending}
    if jobs > 1:
        train_runs(preset, data, todo, jobs)
        todo.clear()
    for row, seed in pending:
        # one job: one run at a time, each evaluated at once, so an interruption loses at most the run under way
        run = out / row.run_name / f"seed{seed}"
        if run in todo:
            train_runs(preset, data, {run: todo.pop(run)}, 1)
        _evaluate(row, seed, run, data, evaluation(row, seed),
                  evaluation(row, seed, "val") if row.run_name in choosing else None)

    table_rows, lines = [], []
    for row in rows:
        summaries = [load_summary(evaluation(row, seed) / "summary.json") for seed in seeds]
        table_rows.append((row.title, aggregate(summaries)))
        for seed, summary in zip(seeds, summaries):
            iterations = trained_iterations(out / row.run_name / f"seed{seed}")
            lines.append([variant_name(row.run_name, row.rule), seed, iterations, summary["split"],
                          f"{summary['average']['dice']:.4f}",
                          *(f"{d:.4f}" for d in summary["per_class"]["dice"])])
    text = (f"# Ablation on `{data}` (preset `{preset}`, seeds {', '.join(map(str, seeds))})\n\n"
            "Mean ± std over seeds of each run's class-averaged Dice (%) and ASD (voxels); per-class columns "
            "are mean Dice.\n\n" + render_table(table_rows) + "\n")
    table = out / "ablation.md"
    atomic_write_text(table, text)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["variant", "seed", "iterations", "split", "mean_dice", *summaries[0]["class_abbrevs"]])
    writer.writerows(lines)
    atomic_write_text(Path(csv_path) if csv_path else out / "ablation.csv", buffer.getvalue())
    if choosing:
        write_rule_choice(out, [row for row in rows if row.run_name in choosing], seeds, evaluation)
    compared = {variant_name(row.run_name, row.rule):
                Method(row.title, {f"seed{seed}": evaluation(row, seed) for seed in seeds}) for row in rows}
    write_ablation_comparison(out, compared, data)
    return table


def runs_with_several_rules(rows: Sequence[AblationRow]) -> set[str]:
    """The runs that more than one row evaluates, each with its own test-time rule."""
    rules: dict[str, set[str]] = {}
    for row in rows:
        rules.setdefault(row.run_name, set()).add(row.rule)
    return {run for run, found in rules.items() if len(found) > 1}


def write_rule_choice(out: Path, rows: Sequence[AblationRow], seeds: Sequence[int],
                      evaluation: Callable[..., Path]) -> Path:
    """``OUT/test_time_rules.md`` and ``.csv``: per run and test-time rule, the mean Dice over seeds on the
    validation split and on the test split; the rule with the best validation Dice is the run's choice
    (marked), so that the test split never picks it. Returns the Markdown file."""
    def mean_dice(row: AblationRow, split: str) -> list[float]:
        return [load_summary(evaluation(row, seed, split) / "summary.json")["average"]["dice"] for seed in seeds]

    lines = []
    table = ["| run | test-time rule | validation Dice | test Dice, mean ± sd | chosen |", "|---|---|---:|---:|:---:|"]
    for run in dict.fromkeys(row.run_name for row in rows):
        candidates = [(row, mean_dice(row, "val"), mean_dice(row, "test")) for row in rows if row.run_name == run]
        best = max(candidates, key=lambda candidate: statistics.fmean(candidate[1]))[0]
        for row, validation, test in candidates:
            chosen = row is best
            lines.append([run, row.rule, f"{statistics.fmean(validation):.4f}", f"{statistics.fmean(test):.4f}",
                          f"{statistics.pstdev(test):.4f}", int(chosen)])
            table.append(f"| {run} | {rule_title(row.variant, row.decoder, row.tta)} | "
                         f"{statistics.fmean(validation):.2f} | "
                         f"{statistics.fmean(test):.2f} ± {statistics.pstdev(test):.2f} | "
                         f"{'✓' if chosen else ''} |")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", "rule", "val_dice", "test_dice", "test_dice_sd", "chosen"])
    writer.writerows(lines)
    atomic_write_text(out / "test_time_rules.csv", buffer.getvalue())
    markdown = out / "test_time_rules.md"
    title = f"# Test-time rules, chosen on the validation split (seeds {', '.join(map(str, seeds))})"
    atomic_write_text(markdown, title + "\n\nMean Dice (%) over the seeds; each run's rule is the one with the best "
                      "validation Dice.\n\n" + "\n".join(table) + "\n")
    return markdown


def control_run(variant: str) -> str | None:
    """The run name of ``variant``'s control, e.g. ``cps_method_weight-0``, ``full_lambda_u-0``; None for a
    run name that is no registered method, or a method without a control."""
    control = control_row(variant)
    return None if control is None else control.run_name


def variant_name(run_name: str, rule: str) -> str:
    """A row's name in ablation.csv: its run, with ``@<decoder>-decoder`` for a decoder other than D_u and
    ``+tta`` for flip TTA (``rule``: :attr:`AblationRow.rule`)."""
    decoder, tta = rule.removesuffix("-tta"), rule.endswith("-tta")
    return run_name + ("" if decoder == "unlabeled" else f"@{decoder}-decoder") + ("+tta" if tta else "")


def ablation_methods(out: str | Path) -> dict[str, Method]:
    """The evaluations found in an ablation folder, ``OUT/<run>/seed<S>/eval-<decoder>/``: one method per
    run and decoder, keyed by :func:`variant_name` and named as in their summary.json."""
    found: dict[str, dict[str, Path]] = {}
    for summary in sorted(Path(out).glob("*/seed*/eval-*/summary.json")):
        evaluation = summary.parent
        variant = variant_name(evaluation.parent.parent.name, evaluation.name.removeprefix("eval-"))
        found.setdefault(variant, {})[evaluation.parent.name] = evaluation
    if not found:
        raise InputError(f"{out}: no ablation evaluations in it (OUT/<run>/seed<S>/eval-<decoder>/summary.json)")
    return {variant: Method(load_summary(next(iter(seeds.values())) / "summary.json")["name"], seeds)
            for variant, seeds in found.items()}


def write_ablation_comparison(out: Path, found: dict[str, Method], data: str | Path | None = None) -> Path:
    """``OUT/comparison.md`` and ``.csv``: every method against labeled-only when there is one (else the
    first), then each method that has a control (:func:`control_run`) against it; labeled-only, each method
    and each control under the rule its validation split chose where ``OUT/test_time_rules.csv`` says
    (:func:`chosen_rules`), else its default; paired over the test cases of the seeds both ran. Class groups
    from ``data`` (see :func:`skcdf.compare.groups_for`). Returns the Markdown file."""
    chosen = chosen_rules(out)
    reference_key = variant_name(methods.REFERENCE, chosen.get(methods.REFERENCE, "unlabeled"))
    reference_key = reference_key if reference_key in found else next(iter(found))
    reference = found[reference_key]
    others = [method for key, method in found.items() if key != reference_key]
    rows = compare_to_reference(reference, others, data)
    controlled = []
    for run in found:
        if (control := control_run(run)) is not None:
            method_key, control_key = (variant_name(name, chosen.get(name, "unlabeled")) for name in (run, control))
            if method_key in found and control_key in found:
                controlled.append((found[control_key], found[method_key]))
    for control, method in controlled:
        rows += compare_to_reference(control, [method], data)
    also = ", and each method against its own control" if controlled else ""
    if chosen:
        also += " (where a run has several test-time rules, the one its validation split chose: test_time_rules.md)"
    return write_comparison(out, rows, f"# Paired comparison against {reference.name}{also} (`{Path(out)}`)")


def chosen_rules(out: str | Path) -> dict[str, str]:
    """Run name -> the test-time rule (:attr:`AblationRow.rule`) that ``OUT/test_time_rules.csv`` marks as
    chosen on the validation split; empty without that file."""
    table = Path(out) / "test_time_rules.csv"
    if not table.is_file():
        return {}
    with table.open(newline="") as handle:
        return {line["run"]: line["rule"] for line in csv.DictReader(handle) if line["chosen"] == "1"}


def _evaluate(row: AblationRow, seed: int, run: Path, data: Path, evaluation: Path,
              validation: Path | None = None) -> None:
    """Predict the test split with the row's test-time rule and evaluate it into ``evaluation``; the same on
    the run's validation split into ``validation``, when given."""
    from skcdf.checkpoint import load_model
    from skcdf.infer import InferenceSettings
    from skcdf.predict import predict_and_evaluate
    from skcdf.train.config import load_config

    rule = rule_title(row.variant, row.decoder, row.tta)
    print(f"[ablate] {row.title}, seed {seed}: predicting and evaluating ({rule})", flush=True)
    model, preprocessing = load_model(run)
    settings = InferenceSettings(decoder=row.decoder, tta=row.tta)
    predict_and_evaluate(model, data, run / f"pred-{row.rule}", evaluation, preprocessing, row.title, settings)
    if validation is not None:
        split = load_config(str(run / "config.yaml")).val_split
        predict_and_evaluate(model, data, run / f"pred-{row.rule}-{split}", validation, preprocessing, row.title,
                             settings, split)
