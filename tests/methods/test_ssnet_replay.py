"""SS-Net equals DHC's ``code/train_ssnet.py``: two recorded float64 iterations replayed (tests/fixtures/dhc/ssnet.pt).

The 8 dropout masks per iteration (the training forward and VAT's three passes) and VAT's uniform draw are
injected. The feature memory starts from the fixture's ``memory_start`` and is checked after each iteration.
"""

from __future__ import annotations

import re

import pytest
import torch

from skcdf.methods.ssnet import (LOSS_TERMS, SSNetConfig, SSNetState, SSNetVNet, from_dhc_ssnet_state_dict,
                                 ssnet_step, ssnet_to_skcdf_key)
from tests.methods.replay import (LOSS_TOLERANCE, STATE_TOLERANCE, assert_losses_match, inputs, load_fixture,
                                  relative_difference, schedule, sgd, through_file)

#: fixture key → step key (DHC's ``loss_seg``, the CE it never adds, is the step's ``ce_unused``)
LOSS_NAMES = {"loss_seg": "ce_unused", "loss_seg_dice": "loss_seg_dice", "loss_lds": "loss_lds",
              "loss_contr_labeled": "loss_contr_labeled", "loss_contr_unlabeled": "loss_contr_unlabeled",
              "total": "total"}


def build(fixture: dict) -> SSNetVNet:
    args = fixture["model_args"]
    net = SSNetVNet(args["n_channels"], args["n_classes"], args["n_filters"], dropout=args["has_dropout"]).double()
    return from_dhc_ssnet_state_dict(net, fixture["state0"]["model"])


def config_of(fixture: dict) -> SSNetConfig:
    hp = fixture["hparams"]
    return SSNetConfig(**schedule(hp),
                       contrastive_weight=hp["contrastive_weight"], vat_xi=hp["vat_xi"], vat_epsilon=hp["vat_epsilon"],
                       vat_iterations=hp["vat_iterations"], elements_per_class=hp["elements_per_class"],
                       dice_smooth=hp["dice_smooth"])


def start(fixture: dict) -> tuple[SSNetVNet, torch.optim.Optimizer, SSNetState, SSNetConfig]:
    """The network, its optimiser, the memory the recorder started from (None: empty) and the config."""
    net = build(fixture)
    state = SSNetState.create(fixture["hparams"]["num_classes"], dtype=torch.float64, feature_dim=net.feature_dim)
    state.load_state_dict({"memory": [empty if rows is None else rows
                                      for rows, empty in zip(fixture["memory_start"], state.memory)]})
    return net, sgd(net, fixture), state, config_of(fixture)


def iteration(fixture: dict, i: int, net: SSNetVNet, optimizer: torch.optim.Optimizer, state: SSNetState,
              config: SSNetConfig) -> dict[str, float]:
    """Iteration ``i`` (0-based) with its recorded dropout masks and VAT draw."""
    x_l, y_l, x_u = inputs(fixture)
    net.dropout.replay(fixture["draws"][i]["dropout"]["model"])
    terms = ssnet_step(net, optimizer, state, x_l, y_l, x_u, fixture["hparams"]["epoch"], config,
                       vat_uniform=fixture["vat_uniform"][i].double())
    assert net.dropout.pending == 0
    return terms


#: The memory selectors' BatchNorm shifts start at 0 and get only rounding noise: DHC normalises the memory-side
#: weights over an axis of length 1, so they are b/b = 1 and their gradient is 0 up to rounding. Both DHC's
#: and the step's values are that noise (about 1e-23 here, different bits once the inputs differ in the last
#: digits), so they are checked against an absolute bound instead of each other.
NOISE_ONLY = re.compile(r"^contrastive_class_selector_memory\d+\.1\.bias$")
NOISE_BOUND = 1e-18


def assert_network_matches(net: SSNetVNet, reference: dict[str, torch.Tensor], tolerance: float, what: str) -> None:
    """As :func:`~tests.methods.replay.assert_state_matches` (key map :func:`ssnet_to_skcdf_key`), with the
    noise-only tensors (``NOISE_ONLY``, one per class) bounded by ``NOISE_BOUND`` on both sides instead."""
    ours = net.state_dict()
    assert len(ours) == len(reference), what
    noise_only = 0
    for key, value in reference.items():
        mine = ours[ssnet_to_skcdf_key(key)]
        if NOISE_ONLY.match(key):
            noise_only += 1
            assert value.abs().max() <= NOISE_BOUND, f"{what}: DHC's {key} is more than rounding noise"
            assert mine.abs().max() <= NOISE_BOUND, f"{what}: {key}"
        elif value.is_floating_point():
            assert relative_difference(mine, value) <= tolerance, f"{what}: {key}"
        else:
            assert torch.equal(mine, value), f"{what}: {key}"
    assert noise_only == len(net.memory_selectors), what


def assert_memory_matches(state: SSNetState, reference: list[torch.Tensor | None], what: str) -> None:
    assert len(state.memory) == len(reference), what
    for c, (ours, theirs) in enumerate(zip(state.memory, reference)):
        if theirs is None:
            assert ours.shape[0] == 0, f"{what}: class {c} should be empty"
            continue
        assert ours.shape == theirs.shape, f"{what}: class {c}"
        assert relative_difference(ours, theirs) <= LOSS_TOLERANCE, f"{what}: class {c}"


def test_ssnet_replays_two_dhc_iterations():
    fixture = load_fixture("ssnet")
    hp = fixture["hparams"]
    net, optimizer, state, config = start(fixture)
    assert config.weight_at(hp["epoch"]) == pytest.approx(hp["cps_w"], rel=1e-15)
    assert_memory_matches(state, fixture["memory_start"], "start")
    for i in range(2):
        terms = iteration(fixture, i, net, optimizer, state, config)
        what = f"iteration {i + 1}"
        assert set(terms) == set(LOSS_TERMS)
        assert terms["consistency_weight"] == hp["cps_w"]
        assert terms["supervised_loss"] == terms["loss_seg_dice"]
        assert terms["correct_voxels"] == int(fixture["correct_voxels"][i].sum())
        assert_losses_match(terms, fixture["losses"][i], what, LOSS_NAMES)
        assert_memory_matches(state, fixture["memory"][i], what)
        assert_network_matches(net, fixture[f"state{i + 1}"]["model"], STATE_TOLERANCE[i], f"model after {what}")


def test_ssnet_resumes_from_saved_state():
    """Save network, optimiser and memory after iteration 1 (through ``torch.save``, loaded with
    ``weights_only``), restore them into fresh objects: iteration 2 gives the same bits."""
    fixture = load_fixture("ssnet")
    net, optimizer, state, config = start(fixture)
    iteration(fixture, 0, net, optimizer, state, config)
    saved = through_file(net, optimizer, state)
    other = SSNetVNet(1, fixture["hparams"]["num_classes"], fixture["model_args"]["n_filters"]).double()
    other.load_state_dict(saved["net"])
    other_optimizer = sgd(other, fixture)
    other_optimizer.load_state_dict(saved["optimizer"])
    restored = SSNetState.create(fixture["hparams"]["num_classes"], dtype=torch.float64)
    restored.load_state_dict(saved["state"])
    terms = [iteration(fixture, 1, n, o, s, config) for n, o, s in ((net, optimizer, state),
                                                                    (other, other_optimizer, restored))]
    assert terms[0] == terms[1]
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(state.memory, restored.memory))


def test_ssnet_outputs_in_eval_and_training():
    fixture = load_fixture("ssnet")
    net = build(fixture)
    x_l, _, _ = inputs(fixture)
    k, filters = fixture["hparams"]["num_classes"], fixture["model_args"]["n_filters"]
    with torch.no_grad():
        logits = net.eval()(x_l)
        assert isinstance(logits, torch.Tensor) and logits.shape == (x_l.shape[0], k, *x_l.shape[2:])
        logits_t, embedding = net.train()(x_l)
    assert logits_t.shape == logits.shape and embedding.shape == (x_l.shape[0], filters, *x_l.shape[2:])


def test_ssnet_fresh_state_is_empty():
    state = SSNetState.create(14, dtype=torch.float32, feature_dim=64)
    assert len(state.memory) == 14 and all(rows.shape == (0, 64) for rows in state.memory)
    assert state.state_dict()["memory"][3].dtype == torch.float32
