"""The training step equals the reference's: two iterations of its `train_skcdf.py` loop, replayed in float64.

`shared/reference/reference_train_fixture.pt` (README_train_fixture.md beside it) holds the initial
weights, the inputs, every Bernoulli mask the reference drew, each loss term and the full state after
the knowledge transfer of iteration 1 and after iterations 1 and 2. We load the weights with the
importer, inject the recorded masks in place of our draws, and run skcdf's own knowledge transfer,
`semi_supervised_loss`, backward and SGD. Tolerances are the fixture README's ("Tolerance"): two SGD
steps at lr 0.3 amplify rounding-order differences between CPUs (an Intel Xeon with AVX-512 lands
2.7e-9 relative from the reference after iteration 2, an AMD EPYC 1.3e-10), so the states are
checked to 1e-11 after iteration 1 and 1e-8 after iteration 2, the losses to 1e-11.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from skcdf.compat import from_reference_state_dict, reference_to_skcdf_key
from skcdf.train import step as step_module
from skcdf.train.knowledge_transfer import KnowledgeTransfer, parse_ema_order
from skcdf.train.step import LOSS_TERMS, TwoFlowForward, semi_supervised_loss
from tests.nn.test_reference import REFERENCE

FIXTURE = REFERENCE / "reference_train_fixture.pt"
#: Relative tolerance on the state after iterations 1 and 2 (the fixture README's "Tolerance").
STATE_TOLERANCE = (1e-11, 1e-8)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not FIXTURE.is_file(), reason="reference training fixture not found beside the repository")]


def _unpack(packed: dict) -> torch.Tensor:
    count = int(np.prod(packed["shape"]))
    bits = np.unpackbits(packed["bits"].numpy())[:count].reshape(packed["shape"])
    return torch.from_numpy(bits.astype(np.float64))


def _relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    ours, reference = ours.detach().double(), reference.double()
    return float((ours - reference).abs().max() / reference.abs().max().clamp_min(1e-300))


def _assert_state_matches(model: torch.nn.Module, reference_state: dict, tolerance: float, what: str,
                          parameters_only: bool = False) -> None:
    ours = dict(model.named_parameters()) if parameters_only else model.state_dict()
    compared = 0
    for key, value in reference_state.items():
        name = reference_to_skcdf_key(key)
        if name is None or name not in ours:  # the reference's unused map_in weights
            continue
        assert _relative_difference(ours[name], value) <= tolerance, f"{what}: {key} ({name})"
        compared += 1
    assert compared == len(ours), f"{what}: compared {compared} of {len(ours)} tensors"


def test_two_reference_iterations_replay_in_float64(monkeypatch):
    fixture = torch.load(FIXTURE, weights_only=True)
    hparams = fixture["hparams"]
    patch = tuple(hparams["patch"])
    model = from_reference_state_dict(fixture["state0"], patch_size=patch, num_heads=2, dropout=False,
                                      dtype=torch.float64)
    x = F.interpolate(fixture["x_small"], size=patch, mode="trilinear", align_corners=False)
    x_labeled, x_unlabeled = x[: hparams["batch_labeled"]], x[hparams["batch_labeled"]:]
    y = fixture["y_small"].long().repeat_interleave(8, 1).repeat_interleave(8, 2).repeat_interleave(8, 3)

    # The recorded masks replace our draws, in the order the reference drew them: labeled, then unlabeled.
    recorded = [_unpack(m[flow])[:, 0] for m in fixture["masks"] for flow in ("labeled", "unlabeled")]
    monkeypatch.setattr(step_module, "sample_balance_mask", lambda keep, labels: recorded.pop(0))

    transfer = KnowledgeTransfer(model, parse_ema_order(hparams["ema_order"]), hparams["ema_w"])
    optimizer = torch.optim.SGD(model.parameters(), lr=hparams["lr"], momentum=hparams["momentum"],
                                weight_decay=hparams["weight_decay"], nesterov=hparams["nesterov"])
    forward = TwoFlowForward(model).train()
    for index, (losses, state) in enumerate(zip(fixture["losses"], (fixture["state1"], fixture["state2"]))):
        transfer.apply()
        if index == 0:
            _assert_state_matches(model, fixture["state_after_ema1"], 1e-14, "after the knowledge transfer",
                                  parameters_only=True)
        loss, terms, _ = semi_supervised_loss(
            forward, x_labeled, y, x_unlabeled, unsup_weight=hparams["cps_w"],
            keep_labeled=fixture["ir2"], keep_unlabeled=fixture["ir22"], balance_mode="reference")
        for name, value in zip(LOSS_TERMS, terms.tolist()):
            assert value == pytest.approx(losses[name], rel=1e-11, abs=0), f"iteration {index + 1}: {name}"
        assert loss.item() == pytest.approx(losses["total"], rel=1e-11, abs=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        _assert_state_matches(model, state, STATE_TOLERANCE[index], f"after iteration {index + 1}")
    assert not recorded  # every recorded mask was used
