"""The training loop on a tiny phantom: every variant, resume, seeds, run-folder safety, divergence."""

import csv
import math
import threading

import pytest
import torch
import yaml

from skcdf.device import cpu_has_native_bf16
from skcdf.checkpoint import load_checkpoint, load_model
from skcdf.cli import main
from skcdf.data.laterality import Laterality
from skcdf.methods import METHODS
from skcdf.nn import SKCDFNet
from skcdf.train import run_folder, streams, trainer
from skcdf.train.processes import Processes
from skcdf.train.schedules import poly_lr, rampup_weight
from skcdf.train.trainer import TrainingDiverged, train
from skcdf.utils import InputError
from tests.conftest import tiny_config


def _rows(run):
    with (run / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def reference_run(tiny_phantom, tmp_path_factory):
    """An uninterrupted two-epoch run of the full variant."""
    run = tmp_path_factory.mktemp("runs") / "reference"
    train(tiny_config(), tiny_phantom, run)
    return run


def test_schedules():
    assert poly_lr(0.3, 0, 1500) == 0.3
    assert poly_lr(0.3, 750, 1500) == pytest.approx(0.3 * 0.5 ** 0.9)
    assert rampup_weight(10.0, 0, 100) == pytest.approx(10 * math.exp(-5))
    assert rampup_weight(10.0, 50, 100) == pytest.approx(10 * math.exp(-1.25))
    assert rampup_weight(10.0, 150, 100) == 10.0
    assert rampup_weight(10.0, 3, 0) == 10.0


@pytest.mark.parametrize("variant", sorted(name for name, method in METHODS.items() if not method.plugin))
def test_every_variant_trains(variant, tiny_phantom, tmp_path):
    run = tmp_path / variant
    config = tiny_config(variant=variant, epochs=1)
    model = train(config, tiny_phantom, run)
    torch.manual_seed(config.seed)  # the trainer seeds, then builds the model
    initial = SKCDFNet(**model.init_args).state_dict()
    for name, parameter in model.named_parameters():
        assert not torch.equal(parameter, initial[name]), f"{name} was not trained"
    (row,) = _rows(run)
    assert int(row["iteration"]) == 2 and 0 <= float(row["val_dice_mean"]) <= 100
    semi = METHODS[variant].semi
    assert (float(row["loss_unsup_main"]) > 0) == semi
    assert (float(row["loss_sup_bal"]) > 0) == config.aux_heads
    payload = load_checkpoint(run / "last.pt")
    assert payload["format"] == "skcdf-checkpoint" and payload["config"] == config.to_dict()
    assert payload["preprocessing"]["patch_size"] == [32, 32, 32]
    rebuilt, _ = load_model(run)
    assert rebuilt.init_args["shared_decoder"] == config.shared_decoder
    assert yaml.safe_load((run / "config.yaml").read_text()) == config.to_dict()
    assert (run / "train.log").read_text().count(" epoch 0: loss") == 1
    assert any((run / "tb").iterdir())


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_is_bit_exact(workers, reference_run, tiny_phantom, tmp_path, monkeypatch):
    config = tiny_config(num_workers=workers)  # with workers, their augmentation seeds must be restored too
    uninterrupted = reference_run if workers == 0 else tmp_path / "uninterrupted"
    if workers:
        train(config, tiny_phantom, uninterrupted)
    run = tmp_path / "interrupted"
    calls = {"n": 0}
    real_loss = trainer.semi_supervised_loss

    def interrupt_in_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # second iteration of epoch 1: after the epoch-0 checkpoint
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(trainer, "semi_supervised_loss", interrupt_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(config, tiny_phantom, run)
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    monkeypatch.setattr(trainer, "semi_supervised_loss", real_loss)
    train(config, tiny_phantom, run, resume=True)

    expected, resumed = load_checkpoint(uninterrupted / "last.pt"), load_checkpoint(run / "last.pt")
    _assert_same_state(expected["model"], resumed["model"])
    for index, state in expected["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], resumed["optimizer"]["state"][index]["momentum_buffer"])
    assert _rows(uninterrupted) == _rows(run)


def test_each_stream_draws_batches_of_its_own_size(tiny_phantom):
    # the unlabeled stream carries labels (for the pseudo-label monitor) but keeps batch_unlabeled
    from skcdf.data.layout import read_split

    config = tiny_config(batch_labeled=1, batch_unlabeled=2, flips="laterality")
    laterality = Laterality(((2, 3),))
    for stream, split, batch in (("labeled", "labeled_40p", 1), ("unlabeled", "unlabeled_40p", 2)):
        loader, generators = streams.make_stream(tiny_phantom, read_split(tiny_phantom, split), config, None,
                                                 laterality, True, stream, Processes(), False)
        assert next(iter(loader))["image"].shape[0] == batch and set(generators) == {f"{stream}_order",
                                                                                     f"{stream}_workers"}
        assert (loader.dataset.flips, loader.dataset.laterality) == ("laterality", laterality)


@pytest.mark.parametrize("mode", ["reference", "laterality", "none"])
def test_both_streams_flip_as_configured_with_the_data_sets_pairs(tiny_phantom, tmp_path, monkeypatch, mode):
    made = []
    monkeypatch.setattr(streams, "make_stream", lambda *args: made.append(args) or (None, {}))
    run = trainer._set_up(tiny_config(flips=mode), tiny_phantom, tmp_path / "run", False, Processes())
    run.writer.close()
    run_folder.close_log(run.log)
    synapse_pairs = Laterality(((2, 3), (12, 13)))
    assert [(args[2].flips, args[4], args[5], args[6]) for args in made] == [
        (mode, synapse_pairs, True, "labeled"), (mode, synapse_pairs, True, "unlabeled")]  # the phantom's unlabeled cases have labels


def test_a_run_from_before_the_flips_key_resumes(tmp_path):
    config = tiny_config(flips="reference")  # what a run written before the key trained with
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in config.to_dict().items() if k != "flips"}))
    assert run_folder.check_run_folder(tmp_path, config, resume=True) is False  # accepted: no last.pt yet
    with pytest.raises(InputError, match="flips: 'reference' -> 'laterality'"):
        run_folder.check_run_folder(tmp_path, config.replace(flips="laterality"), resume=True)


def test_checkpoints_are_written_off_the_training_thread(tiny_phantom, tmp_path, monkeypatch):
    writers = []
    real_save = torch.save

    def recording_save(obj, path):
        writers.append(threading.current_thread().name)
        real_save(obj, path)

    monkeypatch.setattr(torch, "save", recording_save)
    run = tmp_path / "run"
    train(tiny_config(), tiny_phantom, run)
    assert writers and set(writers) == {"skcdf-checkpoint-writer"}  # best.pt and last.pt, each epoch
    assert load_checkpoint(run / "last.pt")["epoch"] == 2  # finished before train() returned
    # amp/channels_last auto: on where the CPU has native bf16, else off
    precision = ("bfloat16 autocast (this CPU has native bf16: amp auto turns it on), channels_last_3d"
                 if cpu_has_native_bf16() else "fp32")
    assert f"1 process(es) on cpu ({precision})" in (run / "train.log").read_text()


def test_data_loader_workers_do_not_change_the_run(reference_run, tiny_phantom, tmp_path):
    # augmentation seeds come with the sampled cases, so worker processes (persistent) load the same batches
    with_workers = train(tiny_config(num_workers=2), tiny_phantom, tmp_path / "workers").state_dict()
    _assert_same_state(load_checkpoint(reference_run / "last.pt")["model"], with_workers)


def test_same_seed_same_run_other_seed_other_run(reference_run, tiny_phantom, tmp_path):
    again = train(tiny_config(), tiny_phantom, tmp_path / "again").state_dict()
    _assert_same_state(load_checkpoint(reference_run / "last.pt")["model"], again)
    other = train(tiny_config(seed=1), tiny_phantom, tmp_path / "other").state_dict()
    assert any(not torch.equal(again[k], other[k]) for k in again if again[k].is_floating_point())


def test_run_folder_is_never_overwritten(reference_run, tiny_phantom, tmp_path):
    before = (reference_run / "last.pt").stat().st_mtime_ns
    with pytest.raises(InputError, match="already holds a run of this configuration; pass --resume"):
        train(tiny_config(), tiny_phantom, reference_run)
    with pytest.raises(InputError, match=r"different configuration \(lr: 0.3 -> 0.2\)"):
        train(tiny_config(lr=0.2), tiny_phantom, reference_run, resume=True)
    train(tiny_config(), tiny_phantom, reference_run, resume=True)  # finished: nothing to do
    assert (reference_run / "last.pt").stat().st_mtime_ns == before
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty and holds no skcdf run"):
        train(tiny_config(), tiny_phantom, stranger)


@pytest.mark.parametrize("overrides, message", [
    ({"labeled_cases": 3}, "labeled_cases: 3 requested but split 'labeled_40p'"),
    ({"batch_labeled": 3}, "batch_labeled: 3 per step needs at least that many labeled cases, the split has 2"),
    ({"unlabeled_split": "unlabeled_99p"}, "unlabeled_99p"),
    ({"class_frequency": [1, 2, 3]}, "class_frequency: 3 counts given, the data set has 14 classes"),
])
def test_data_dependent_errors_come_before_any_work(overrides, message, tiny_phantom, tmp_path):
    with pytest.raises(InputError, match=message):
        train(tiny_config(**overrides), tiny_phantom, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_divergence_stops_with_a_clear_message(tiny_phantom, tmp_path):
    with pytest.raises(TrainingDiverged, match=r"loss term \w+ is NaN or infinite at iteration \d+") as caught:
        train(tiny_config(lr=1e30), tiny_phantom, tmp_path / "run")
    assert "No checkpoint was written" in str(caught.value)
    assert not (tmp_path / "run" / "last.pt").exists()
    assert "NaN or infinite" in (tmp_path / "run" / "train.log").read_text()


def test_divergence_keeps_the_last_good_checkpoint(tiny_phantom, tmp_path, monkeypatch):
    real_loss = trainer.semi_supervised_loss
    calls = {"n": 0}

    def nan_from_third_iteration(*args, **kwargs):
        calls["n"] += 1
        loss, terms, pseudo_labels = real_loss(*args, **kwargs)
        if calls["n"] >= 3:
            terms = terms.clone()
            terms[0] = math.nan
            loss = loss * math.nan
        return loss, terms, pseudo_labels

    monkeypatch.setattr(trainer, "semi_supervised_loss", nan_from_third_iteration)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=f"sup_main is NaN or infinite at iteration 3.*{run / 'last.pt'}"):
        train(tiny_config(), tiny_phantom, run)
    kept = load_checkpoint(run / "last.pt")
    assert kept["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def _loss_columns(run):
    return [[float(row[key]) for key in row if key.startswith("loss")] for row in _rows(run)]


def test_channels_last_gives_the_same_training(reference_run, tiny_phantom, tmp_path):
    # Losses, not weights: on the CPU the channels-last batch norm is ~1e-5 less precise, which the
    # ill-conditioned gradients of a fresh 2-filter network amplify in individual weights.
    train(tiny_config(channels_last=True), tiny_phantom, tmp_path / "run")
    torch.testing.assert_close(_loss_columns(tmp_path / "run"), _loss_columns(reference_run), rtol=1e-2, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="torch.compile takes over two minutes on a CPU (measured: 131 s); run on a CUDA machine")
def test_compile_gives_the_same_training(tiny_phantom, tmp_path):
    # compiled graphs draw their own dropout masks, so the runs agree in their losses, not bit for bit
    train(tiny_config(device="cuda"), tiny_phantom, tmp_path / "eager")
    train(tiny_config(device="cuda", compile=True), tiny_phantom, tmp_path / "compiled")
    torch.testing.assert_close(_loss_columns(tmp_path / "compiled"), _loss_columns(tmp_path / "eager"), rtol=2e-2, atol=0)


def test_cli(tiny_phantom, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "phantom", "--data", str(tiny_phantom), "--out", str(run), "--set", "epochs=1",
                 "--set", "filterz=2"]) == 2
    assert "error: --set: unknown configuration key 'filterz'" in capsys.readouterr().err
    settings = [f"{key}={value}" for key, value in tiny_config(epochs=1).to_dict().items()
                if key in ("patch_size", "filters", "labeled_split", "unlabeled_split", "iterations_per_epoch", "epochs")]
    assert main(["train", "phantom", "--data", str(tiny_phantom), "--out", str(run), "--set", *settings,
                 "num_workers=0"]) == 0
    assert (run / "best.pt").exists() and len(_rows(run)) == 1


def test_decoupled_balance_mode_detaches_the_balanced_heads_and_shifts_their_prior(tiny_phantom, tmp_path,
                                                                                   monkeypatch):
    """balance_mode: decoupled wires its two parts: the balanced heads read detached features, and each
    epoch the head transfers get log p (Hl) and log q(epoch) (Hu) as prior shifts; the reference mode neither."""
    shifts = []
    real_shift = trainer.KnowledgeTransfer.set_prior_shift
    monkeypatch.setattr(trainer.KnowledgeTransfer, "set_prior_shift",
                        lambda self, step, shift: (shifts.append((step, shift.clone())), real_shift(self, step, shift)))
    model = train(tiny_config(balance_mode="decoupled", val_every=0), tiny_phantom, tmp_path / "decoupled")
    assert model.labeled_decoder.detach_aux and model.unlabeled_decoder.detach_aux
    assert [step for step, _ in shifts] == ["Hl", "Hu"] * 2  # two epochs
    (_, hl), (_, hu_first) = shifts[0], shifts[1]
    assert torch.all(hl <= 0) and hl.min() < 0  # log p: every class kept with probability <= 1
    assert torch.all(hu_first == 0)  # q(0) = 1: the unlabeled mask keeps everything in the first epoch
    shifts.clear()
    model = train(tiny_config(balance_mode="reference", val_every=0), tiny_phantom, tmp_path / "reference")
    assert not model.labeled_decoder.detach_aux and not shifts
