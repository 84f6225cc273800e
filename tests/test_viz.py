"""Overlay and training-curve figures: valid, non-blank PNGs; slice choice; clear errors."""

from __future__ import annotations

import json
import math

import matplotlib.image
import numpy as np
import pytest
import SimpleITK as sitk

from skcdf.cli import main
from skcdf.utils import InputError
from skcdf.viz import ORGAN_COLOURS, organ_colour, overlay_png, pick_slices, plot_curves, plot_runs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)[..., :3]
    assert pixels.std() > 0.05  # not a blank canvas
    return pixels


def toy_volume() -> tuple[np.ndarray, np.ndarray]:
    """A 12-slice scan with organ 1 in slices 2-9, organ 2 in 4-6, organ 3 only in slice 5."""
    rng = np.random.default_rng(0)
    image = rng.normal(0, 50, (12, 32, 32)).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[2:10, 4:12, 4:12] = 1
    label[4:7, 16:28, 16:28] = 2
    label[5, 20:24, 4:10] = 3
    image[label > 0] += 200
    return image, label


def test_pick_slices_prefers_slices_with_most_organs():
    _, label = toy_volume()
    assert pick_slices(label, 1) == [5]
    first, second = pick_slices(label, 2)
    assert 5 in (first, second) and abs(first - second) >= 12 // 4


def test_overlay_png_shows_organs_in_fixed_colours(tmp_path):
    image, label = toy_volume()
    pred = np.roll(label, 2, axis=2)
    out = tmp_path / "overlay.png"
    assert overlay_png(image, label, pred, out, slices=1, class_abbrevs=["BG", "Sp", "RK", "LK"]) == [5]
    pixels = assert_valid_png(out)
    for label_value in (1, 2, 3):  # each organ's colour (blended with the scan) appears somewhere
        colour = np.array(matplotlib.colors.to_rgb(organ_colour(label_value)))
        assert (np.abs(pixels - colour).sum(-1) < 0.08).any(), label_value
    assert organ_colour(1) == ORGAN_COLOURS[0] and organ_colour(21) == organ_colour(1)
    with pytest.raises(InputError, match="different shapes"):
        overlay_png(image, label[:5], None, tmp_path / "bad.png")


def test_overlay_command_reads_nifti_and_npy(tmp_path, capsys):
    image, label = toy_volume()
    sitk.WriteImage(sitk.GetImageFromArray(image), str(tmp_path / "image.nii.gz"))
    np.save(tmp_path / "label.npy", label)
    np.save(tmp_path / "pred.npy", label)
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"name": "toy", "num_classes": 4, "class_names": ["background", "spleen", "right kidney", "left kidney"]}))
    out = tmp_path / "fig.png"
    args = ["overlay", str(tmp_path / "image.nii.gz"), str(tmp_path / "label.npy"), str(tmp_path / "pred.npy")]
    assert main(args + ["--out", str(out), "--slices", "2"]) == 0
    assert_valid_png(out)
    assert main(["overlay", str(tmp_path / "missing.nii.gz"), str(tmp_path / "label.npy"), "--out", str(out)]) == 2
    assert "missing.nii.gz" in capsys.readouterr().err


def test_plot_curves_from_mixed_iteration_and_epoch_rows(tmp_path):
    lines = ["epoch,iteration,loss,loss_sup,lr,val_dice_mean,val_dice_1"]
    for it in range(1, 41):
        epoch = (it - 1) // 10
        lines.append(f"{epoch},{it},{2 / it:.4f},{1 / it:.4f},0.1,,")
        if it % 10 == 0:
            lines.append(f"{epoch},{it},,,,{50 + epoch},{40 + epoch}")
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "curves.png"
    assert plot_curves(csv_path, out) == ["loss", "loss_sup", "val_dice_mean", "val_dice_1"]
    assert_valid_png(out)


def test_plot_curves_shows_heads_pseudo_labels_and_names_absent_classes(tmp_path):
    abbrevs = ["Sp", "RK", "LK", "Ga", "Es", "Li", "St", "Ao", "IVC", "PSV", "Pa", "RAG", "LAG"]
    heads = ["val_dice_labeled_main", "val_dice_labeled_aux", "val_dice_unlabeled_main", "val_dice_unlabeled_aux"]
    small = [name.replace("val_dice_", "val_dice_small_") for name in heads]
    pseudo = ["pseudo_dice_main", "pseudo_dice_aux", "pseudo_fg_main", "pseudo_fg_aux", "true_fg"]
    header = (["epoch", "iteration", "loss", "loss_sup_bal_kept", "val_dice_mean"] + [f"val_dice_{a}" for a in abbrevs]
              + heads + small + pseudo)
    lines = [",".join(header)]
    for epoch in range(5):
        classes = [str(10.0 * epoch + c) for c in range(12)] + ["100.0"]  # LAG absent from validation
        lines.append(",".join([str(epoch), str(8 * (epoch + 1)), "1.0", "2.0", "20.0", *classes,
                               *["30.0"] * 4, *["10.0"] * 4, "25.0", "5.0", "0.05", "0.3", "0.07"]))
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    plotted = plot_curves(csv_path, tmp_path / "curves.png")
    assert "val_dice_LAG" not in plotted and "val_dice_RAG" in plotted  # absent: named, not drawn flat
    assert set(heads + small + pseudo + ["loss_sup_bal_kept"]) <= set(plotted)
    assert not {f"val_dice_small_{a}" for a in abbrevs} & set(plotted)  # the small-class panel is per head
    assert len({organ_colour(label) for label in range(1, 14)}) == 13  # every Synapse organ its own colour
    assert_valid_png(tmp_path / "curves.png")


def test_curves_command_errors(tmp_path, capsys):
    assert main(["curves", str(tmp_path), "--out", str(tmp_path / "c.png")]) == 2
    assert "metrics.csv" in capsys.readouterr().err
    (tmp_path / "metrics.csv").write_text("epoch,lr\n0,0.1\n")
    assert main(["curves", str(tmp_path), "--out", str(tmp_path / "c.png")]) == 2
    assert "no 'loss*'" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_plot_curves_leaves_out_a_panel_whose_columns_are_empty(tmp_path):
    from matplotlib.image import imread

    header = "epoch,iteration,loss,val_dice_mean,pseudo_fg_main,true_fg"
    rows = [f"{epoch},{8 * (epoch + 1)},1.0,{10.0 * epoch},," for epoch in range(3)]  # a Table 1 run: no pseudo-labels
    widths = []
    for name, columns in (("empty", header), ("without", header.rsplit(",", 2)[0])):
        csv_path = tmp_path / f"{name}.csv"
        csv_path.write_text("\n".join([columns] + [r if name == "empty" else r[:-2] for r in rows]) + "\n")
        plot_curves(csv_path, tmp_path / f"{name}.png")
        widths.append(imread(tmp_path / f"{name}.png").shape[1])
    assert widths[0] == widths[1]  # two panels each: loss and validation Dice


def test_plot_runs_compares_validation_dice_along_iteration_and_lambda(tmp_path, capsys):
    skcdf_run = ["epoch,iteration,lambda,val_dice_mean,val_dice_labeled_main,val_dice_unlabeled_main"]
    skcdf_run += [f"{e},{8 * (e + 1)},{10 * math.exp(-5 * (1 - e / 10) ** 2):.5f},{20 + e},{18 + e},{20 + e}"
                  for e in range(10)]
    supervised = ["epoch,iteration,lambda,val_dice_mean"] + [f"{e},{8 * (e + 1)},0,{25 + e}" for e in range(10)]
    (tmp_path / "skcdf").mkdir()
    (tmp_path / "skcdf" / "metrics.csv").write_text("\n".join(skcdf_run) + "\n")
    (tmp_path / "labeled.csv").write_text("\n".join(supervised) + "\n")
    drawn = plot_runs({"SKCDF": tmp_path / "skcdf" / "metrics.csv", "labeled-only": tmp_path / "labeled.csv"},
                      tmp_path / "runs.png")
    # λ stays 0 for labeled-only: nothing to read against it; it has no per-decoder columns either
    assert drawn == {"iteration": ["SKCDF", "labeled-only"], "lambda": ["SKCDF"], "decoders": ["SKCDF"]}
    assert_valid_png(tmp_path / "runs.png")
    assert main(["curves", str(tmp_path / "skcdf"), str(tmp_path / "labeled.csv"), "--out",
                 str(tmp_path / "cli.png")]) == 0
    assert "2 runs" in capsys.readouterr().out
    (tmp_path / "empty.csv").write_text("epoch,iteration,lambda\n0,8,0.1\n")
    with pytest.raises(InputError, match="none of the runs has validation Dice"):
        plot_runs({"a": tmp_path / "empty.csv", "b": tmp_path / "empty.csv"}, tmp_path / "none.png")
