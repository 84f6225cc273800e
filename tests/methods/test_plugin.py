"""The Table 1 methods as plug-ins: each trains through skcdf's trainer, checkpoints everything its resume
needs (bit-exact), rebuilds from the checkpoint and predicts by its own test-time rule; one exports to ONNX."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from skcdf import Segmenter, methods
from skcdf.checkpoint import load_checkpoint, load_model
from skcdf.methods.plugin import Context, MethodNet, MethodTraining, recipe
from skcdf.data.layout import read_split
from skcdf.train.trainer import train
from skcdf.utils import InputError
from tests.conftest import tiny_config

PLUGINS = methods.plugin_names()


def _assert_same(expected: Any, actual: Any, where: str = "") -> None:
    """Tensors bit for bit, containers recursively, anything else by ==."""
    if isinstance(expected, torch.Tensor):
        assert torch.equal(expected, actual), where
    elif isinstance(expected, dict):
        assert expected.keys() == actual.keys(), where
        for key in expected:
            _assert_same(expected[key], actual[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), where
        for i, (a, b) in enumerate(zip(expected, actual)):
            _assert_same(a, b, f"{where}[{i}]")
    else:
        assert expected == actual, where


def test_the_registry_names_every_table1_method_once():
    assert len(PLUGINS) == len(set(PLUGINS)) >= 11
    for name in PLUGINS:
        assert recipe(name).inference and recipe(name).total in recipe(name).terms
    with pytest.raises(KeyError, match="not a Table 1 method"):
        recipe(methods.MAIN)


@pytest.mark.parametrize("method", PLUGINS)
def test_method_weight_is_the_weight_each_method_ramps_to(method):
    """``method_weight`` (the Context's weight) replaces DHC's -w: w · exp(−5 (1 − t)²), one epoch late."""
    net = MethodNet(method, 1, 4, 8, dropout=False)

    def new_optimizer(network: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(network.parameters(), lr=0.1)

    context = Context(4, (32, 32, 32), torch.tensor([500.0, 200, 50, 5]), 16, 2, 8, 10, 0.37, new_optimizer,
                      torch.device("cpu"))
    config = MethodTraining(net, new_optimizer(net.networks[net.recipe.trained]), context).config
    assert config.weight_at(0) == config.weight_at(1) == pytest.approx(0.37 * math.exp(-5))
    assert config.weight_at(6) == pytest.approx(0.37 * math.exp(-5 * 0.5 ** 2))
    assert config.weight_at(11) == config.weight_at(50) == pytest.approx(0.37)


@pytest.mark.parametrize("method", PLUGINS)
def test_every_table1_method_trains_checkpoints_and_predicts(method, tiny_phantom, tmp_path):
    run = tmp_path / method
    config = tiny_config(variant=method, epochs=1, method_weight=0.5)
    model = train(config, tiny_phantom, run)
    torch.manual_seed(config.seed)  # the trainer seeds, then builds the model
    untrained = MethodNet(**model.init_args)
    initial = untrained.state_dict()
    for network, module in model.networks.items():  # every network moved: stepped, or followed by EMA
        assert any(not torch.equal(p, initial[f"networks.{network}.{name}"]) for name, p in module.named_parameters())
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():  # and what predicts changed everywhere (some heads see no loss in two iterations:
        change = (model.eval()(x)[0] - untrained.eval()(x)[0]).abs()  # DST's pseudo decoder, SS-Net's selectors)
    assert (change > 0).float().mean() > 0.99

    rows = (run / "metrics.csv").read_text().splitlines()
    header, row = rows[0].split(","), dict(zip(rows[0].split(","), rows[1].split(",")))
    assert len(header) == len(set(header))
    assert float(row["loss"]) == float(row[f"loss_{model.recipe.total}"])
    assert float(row["lambda"]) == pytest.approx(0.5 * math.exp(-5))  # method_weight, epoch 0 of the ramp
    assert 0 <= float(row["val_dice_mean"]) <= 100

    payload = load_checkpoint(run / "last.pt")
    assert payload["model_args"]["method"] == method and "method_state" in payload
    rebuilt, preprocessing = load_model(run)
    assert isinstance(rebuilt, MethodNet) and not rebuilt.training
    model.to(memory_format=torch.contiguous_format)  # trained in channels_last_3d where the CPU has bf16
    with torch.no_grad():
        _assert_same(model(x)[0], rebuilt(x)[0], "logits")

    volume = np.random.default_rng(0).normal(0, 100, (40, 48, 56)).astype(np.float32)  # HU, another grid
    labels = Segmenter.load(run, device="cpu").predict(volume)
    assert labels.shape == volume.shape and labels.min() >= 0 and labels.max() < rebuilt.num_classes


def test_at_method_weight_0_cps_depl_and_adsh_train_the_same_pair(tiny_phantom, tmp_path):
    """CPS, DePL and Adsh differ only in their unlabeled term: at ``method_weight=0`` they train the same two
    networks bit for bit, so one run is the labeled-only control of all three (docs/results.md §7)."""
    def trained(method: str, weight: float) -> dict[str, torch.Tensor]:
        config = tiny_config(variant=method, method_weight=weight)
        return train(config, tiny_phantom, tmp_path / f"{method}_{weight}").state_dict()

    control = trained("cps", 0.0)
    _assert_same(control, trained("depl", 0.0))
    _assert_same(control, trained("adsh", 0.0))
    with_term = trained("depl", 0.1)
    assert any(not torch.equal(control[name], with_term[name]) for name in control)


@pytest.mark.parametrize("method", PLUGINS)
def test_table1_methods_resume_bit_exactly(method, tiny_phantom, tmp_path, monkeypatch):
    """Interrupted in the second epoch and resumed from last.pt: the same networks, optimisers and method
    state (second network, teacher, class-weight statistics, banks) as an uninterrupted run, bit for bit."""
    config = tiny_config(variant=method)  # 2 epochs of 2 iterations, last.pt after each
    train(config, tiny_phantom, tmp_path / "whole")
    real_step, calls = MethodTraining.step, {"n": 0}

    def interrupt_in_second_epoch(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(MethodTraining, "step", interrupt_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(config, tiny_phantom, tmp_path / "cut")
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 1
    monkeypatch.setattr(MethodTraining, "step", real_step)
    train(config, tiny_phantom, tmp_path / "cut", resume=True)

    expected, resumed = (load_checkpoint(tmp_path / run / "last.pt") for run in ("whole", "cut"))
    for key in ("model", "optimizer", "method_state", "iteration"):
        _assert_same(expected[key], resumed[key], key)


def test_pair_methods_predict_with_the_mean_of_both_networks_and_teachers_do_not_predict():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 32, 32, 32)
    pair = MethodNet("dhc", 1, 4, 2, dropout=True).eval()
    with torch.no_grad():
        expected = (pair.networks["A"](x) + pair.networks["B"](x)) / 2  # DHC's test.py --cps AB
        torch.testing.assert_close(pair(x)[0], expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(pair.forward_labeled_decoder(x)[0], expected, rtol=0, atol=1e-6)
        mean_teacher = MethodNet("uamt", 1, 4, 2).eval()
        assert torch.equal(mean_teacher(x)[0], mean_teacher.networks["student"](x))


def test_a_table1_method_exports_to_onnx_with_its_test_time_rule(tmp_path):
    pytest.importorskip("onnxruntime")
    from skcdf.export import OnnxModel, export_onnx

    torch.manual_seed(0)
    model = MethodNet("dhc", 1, 4, 2).eval()
    preprocessing = {"size": [32, 48, 48], "window": [-75.0, 275.0], "patch_size": [32, 32, 32],
                     "class_names": ["background", "a", "b", "c"], "class_abbrevs": ["BG", "A", "B", "C"]}
    onnx_model = OnnxModel.load(export_onnx(model, preprocessing, tmp_path / "dhc.onnx"), threads=1)
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        expected = model(x)[0]
    torch.testing.assert_close(onnx_model.logits_fn("unlabeled")(x), expected, rtol=1e-4, atol=1e-4)


WITHOUT_UNLABELED = [name for name in PLUGINS if methods.method(name).trains_without_unlabeled]


@pytest.mark.parametrize("method", PLUGINS)
def test_which_steps_take_an_empty_unlabeled_batch(method):
    """The registry's ``trains_without_unlabeled`` says which steps give finite losses on no unlabeled volumes
    at weight 0 (the others average their unlabeled term over nothing, or cannot augment nothing)."""
    torch.manual_seed(0)
    net = MethodNet(method, 1, 4, 4, dropout=False)

    def new_optimizer(network: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(network.parameters(), lr=0.01)

    context = Context(4, (32, 32, 32), torch.tensor([500.0, 200, 50, 5]), 16, 0, 8, 10, 0.0, new_optimizer,
                      torch.device("cpu"))
    training = MethodTraining(net, new_optimizer(net.networks[net.recipe.trained]), context)
    x = torch.rand(2, 1, 32, 32, 32)
    try:
        terms = training.step(x, torch.randint(0, 4, (2, 32, 32, 32)), x[:0], 0)
        takes_it = all(map(math.isfinite, terms.values()))
    except (RuntimeError, ValueError):  # GenericSSL's strong augmentation has no volume to stack
        takes_it = False
    assert takes_it == (method in WITHOUT_UNLABELED)


def test_without_unlabeled_volumes_batchnorm_sees_the_labeled_ones_alone(tiny_phantom, tmp_path, monkeypatch):
    """``batch_unlabeled: 0`` (CPS at weight 0): the networks see the labeled batch alone, so after the first
    step the first BatchNorm's running mean is (1 − m) · before + m · the mean of the first convolution over
    the labeled volumes, computed here from the initial weights."""
    seen = []
    real_step = MethodTraining.step

    def recording_step(self, x_labeled, y_labeled, x_unlabeled, epoch):
        before = {k: v.clone() for k, v in self.model.state_dict().items()}
        terms = real_step(self, x_labeled, y_labeled, x_unlabeled, epoch)
        running_mean = self.model.state_dict()["networks.A.encoder.stages.0.1.running_mean"]
        seen.append((x_labeled.clone(), x_unlabeled.shape[0], before, running_mean))
        return terms

    monkeypatch.setattr(MethodTraining, "step", recording_step)
    train(tiny_config(variant="cps", method_weight=0, batch_unlabeled=0, iterations_per_epoch=None, epochs=1,
                      amp=False), tiny_phantom, tmp_path / "run")
    # the epoch keeps its length: the unlabeled cases at the labeled batch size
    assert len(seen) == len(read_split(tiny_phantom, "unlabeled_40p")) // 2
    x_labeled, unlabeled_volumes, before, running_mean = seen[0]
    assert unlabeled_volumes == 0 and x_labeled.shape[0] == 2
    stage = "networks.A.encoder.stages.0"
    conv = torch.nn.functional.conv3d(x_labeled, before[f"{stage}.0.weight"], before[f"{stage}.0.bias"], padding=1)
    expected = 0.9 * before[f"{stage}.1.running_mean"] + 0.1 * conv.mean((0, 2, 3, 4))
    torch.testing.assert_close(running_mean, expected)
    assert "2 labeled / 0 unlabeled cases" in (tmp_path / "run" / "train.log").read_text()


def test_batch_unlabeled_0_is_only_a_control():
    with pytest.raises(InputError, match="batch_unlabeled 0 .* got variant 'full'"):
        tiny_config(batch_unlabeled=0)
    with pytest.raises(InputError, match="at method_weight 0; got variant 'cps', method_weight 0.1"):
        tiny_config(variant="cps", batch_unlabeled=0)
    with pytest.raises(InputError, match="got variant 'dst'"):
        tiny_config(variant="dst", batch_unlabeled=0, method_weight=0)
    assert tiny_config(variant="depl", batch_unlabeled=0, method_weight=0).batch_unlabeled == 0
