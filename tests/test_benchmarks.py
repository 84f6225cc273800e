"""benchmarks/gpu_check.sh at toy size on the CPU (so that the GPU check cannot rot), and its timing arithmetic."""

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _report_module():
    spec = importlib.util.spec_from_file_location("gpu_check_report", BENCHMARKS / "gpu_check_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_row_times_epochs_between_the_first_and_last_epoch_line(tmp_path):
    (tmp_path / "dataset.json").write_text('{"size": [80, 160, 160]}')
    (tmp_path / "train.log").write_text(
        "2026-01-01 10:00:00 starting epoch 0: variant full, 4 labeled / 16 unlabeled cases, 8 iterations per "
        "epoch, 1 process(es) on cuda:0 (bfloat16 autocast, channels_last_3d)\n"
        "2026-01-01 10:00:05 epoch 0: loss 1.0 (sup 1.0, unsup 0.0)\n"
        "2026-01-01 10:00:07.500 epoch 1: loss 0.9 (sup 0.9, unsup 0.0), val dice 10.00\n"
        "2026-01-01 10:00:10 epoch 2: loss 0.8 (sup 0.8, unsup 0.0), val dice 12.50\n")
    (tmp_path / "metrics.csv").write_text("epoch,val_dice_mean\n0,\n1,10.0\n2,12.5\n")
    row = _report_module().train_row(tmp_path, tmp_path, wall_seconds=20.0, full_epochs=1500)
    assert row["seconds_per_epoch"] == pytest.approx(2.5)  # (10:00:10 - 10:00:05) / 2 epochs
    assert row["one_off_s"] == pytest.approx(20.0 - 3 * 2.5)
    assert row["extrapolated_min"] == pytest.approx((12.5 + 1500 * 2.5) / 60)
    assert row["last_val_dice"] == 12.5 and row["data_size"] == [80, 160, 160]
    assert row["precision"] == "bfloat16 autocast, channels_last_3d"


def test_gpu_check_runs_at_toy_size_on_the_cpu(tmp_path):
    import torch

    from skcdf.device import cpu_has_native_bf16, describe_precision

    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(BENCHMARKS.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--toy", str(tmp_path / "check")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout[done.stdout.index("| measurement |"):]
    assert "failed" not in table and "skipped" not in table, table
    native = cpu_has_native_bf16()  # amp auto: bf16 autocast on such a CPU, and the table says so
    precision = re.escape(describe_precision(torch.device("cpu"), native, native, "auto"))
    assert re.search(rf"\| skcdf train synapse_20p \(3 epochs\) \| phantom 32×48×48 \| \| {precision} \| "
                     r"\d+\.\d\d s / epoch, \d+ s one-off; 1500 epochs ≈ \d+\.\d min \| \| last val Dice \d+\.\d\d \|",
                     table), table
    for workers in (0, 2):
        assert re.search(rf"\| data streams, one synapse_20p epoch \| patch 32×32×32 \| host \| num_workers={workers} "
                         r"\| \d+ ms / epoch", table), table
    assert re.search(r"\| predict_volume \| 40×80×80, batch 4 \| cpu \| .* \| \d+\.\d\d s / volume", table), table
    for variant in ("fp32", "bf16_cl"):
        assert re.search(rf"\| train step \(skcdf\) \| toy 2\+2 \| cpu \| {variant} \| \d+\.\d ms / iteration", table), table


def test_balanced_gradient_measures_the_reference_modes_scaled_down_gradient(tiny_phantom):
    """benchmarks/balanced_gradient.py on the tiny phantom: few voxels kept, the reference-mode gradient
    on them far weaker than the kept-voxel loss's, and the reference value pinned near ln K + 1."""
    spec = importlib.util.spec_from_file_location("balanced_gradient", BENCHMARKS / "balanced_gradient.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.measure(str(tiny_phantom), "labeled_40p", (32, 32, 32), batches=2)
    assert all(0 < kept < 0.1 for kept in results["kept"])
    assert all(ratio > 10 for ratio in results["ratio"])
    assert all(abs(value - (math.log(14) + 1)) < 0.02 for value in results["reference"])


def test_pair_members_predicts_with_each_network_of_a_pair_alone(tiny_phantom, tmp_path, monkeypatch):
    """benchmarks/pair_members.py: the pair's model predicts with network A, then with B, each alone (its
    logits are that network's), evaluations land in eval-A and eval-B, and a one-network run is refused."""
    import torch

    from skcdf.train.trainer import train
    from skcdf.utils import InputError
    from tests.conftest import tiny_config

    spec = importlib.util.spec_from_file_location("pair_members", BENCHMARKS / "pair_members.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    train(tiny_config(variant="cps", epochs=1), tiny_phantom, tmp_path / "cps")
    real_predict, used = module.predict_and_evaluate, []

    def checked_predict(model, *args, **kwargs):
        (name,) = model.recipe.inference
        x = torch.rand(1, 1, 32, 32, 32)
        with torch.no_grad():
            assert torch.equal(model.eval()(x)[0], model.networks[name](x))
        used.append(name)
        return real_predict(model, *args, **kwargs)

    monkeypatch.setattr(module, "predict_and_evaluate", checked_predict)
    dice = module.evaluate_members(tmp_path / "cps", tiny_phantom)
    assert used == ["A", "B"] and set(dice) == {"A", "B"} and all(0 <= d <= 100 for d in dice.values())
    assert all((tmp_path / "cps" / f"eval-{name}" / "per_case.csv").is_file() for name in "AB")
    assert module.evaluate_members(tmp_path / "cps", tiny_phantom) == dice and used == ["A", "B"]  # reused

    train(tiny_config(variant="uamt", epochs=1), tiny_phantom, tmp_path / "uamt")
    with pytest.raises(InputError, match="uamt: not a run of a Table 1 method that averages"):
        module.evaluate_members(tmp_path / "uamt", tiny_phantom)


def test_seed_diagnostics_reads_the_stall_the_pseudo_labels_and_the_checkpoint_choice(tmp_path):
    """benchmarks/seed_diagnostics.py on a hand-written metrics.csv: each figure against its definition."""
    spec = importlib.util.spec_from_file_location("seed_diagnostics", BENCHMARKS / "seed_diagnostics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run = tmp_path / "run"
    (run / "eval-mean-tta").mkdir(parents=True)
    (run / "eval-mean-tta" / "summary.json").write_text('{"average": {"dice": 51.5}}')
    lines = ["epoch,lambda,loss_sup_main,loss_unsup_bal_kept,pseudo_dice_main,val_dice_mean,val_dice_labeled_main,"
             "val_dice_unlabeled_main"]
    for epoch in range(8):  # validation every other epoch; D_l passes 30 at epoch 5; D_u dips at 3 and 7
        validated = epoch % 2 == 1
        dip = 11 if epoch in (3, 7) else 10  # D_l − D_u: a dip is more than 10
        val = f"{10 * epoch},{6 * epoch},{6 * epoch - dip}" if validated else ",,"
        lines.append(f"{epoch},{0.1 * epoch},{2 - 0.1 * epoch},{epoch % 5},{5 * epoch},{val}")
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    found = module.diagnose(run)
    assert found["epochs"] == 8 and found["start"] == 5
    assert found["sup_quarter"] == pytest.approx((2 + 1.9) / 2)  # epochs 0 and 1
    assert (found["pseudo_quarter"], found["pseudo_half"], found["pseudo_end"]) == (10, 20, 35)
    assert (found["best_epoch"], found["val_best"], found["val_last"]) == (7, 70, 70)
    assert found["lambda_best"] == pytest.approx(0.7) and found["test_mean-tta"] == 51.5
    assert found["du_dips"] == 2 and found["bal_u_max"] == 4
