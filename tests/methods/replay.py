"""Helpers of the DHC replay tests: load a fixture of tests/fixtures/dhc, build its networks, compare states.

The fixtures (README beside them) were recorded by tools/record_dhc_fixtures.py from DHC's own training
loops in float64. Tolerances (the issue's): every loss term to 1e-10 relative; every tensor of every
state to 1e-11 relative after iteration 1 and 1e-8 after iteration 2, relative meaning
max|ours − theirs| / max|theirs| per tensor (integer buffers exactly).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from skcdf.methods.common import DHCVNet, dhc_to_skcdf_key, from_dhc_state_dict

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "dhc"
LOSS_TOLERANCE = 1e-10
STATE_TOLERANCE = (1e-11, 1e-8)


def load_fixture(method: str) -> dict:
    return torch.load(FIXTURES / f"{method}.pt", weights_only=True)


def schedule(hp: dict) -> dict[str, Any]:
    """The :class:`~skcdf.methods.common.WeightSchedule` fields of a fixture's hyper-parameters."""
    return {"weight": hp["cps_w_max"], "max_epoch": hp["max_epoch"], "rampup": hp["cps_rampup"]}


def build_net(fixture: dict, name: str) -> DHCVNet:
    """The fixture's network ``name`` in float64, loaded with its initial state."""
    args = fixture["model_args"]
    net = DHCVNet(args["n_channels"], args["n_classes"], args["n_filters"], dropout=args["has_dropout"]).double()
    return from_dhc_state_dict(net, fixture["state0"][name])


def sgd(net: torch.nn.Module, fixture: dict) -> torch.optim.SGD:
    hp = fixture["hparams"]
    return torch.optim.SGD(net.parameters(), lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"],
                           nesterov=hp["nesterov"])


def inputs(fixture: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_l (b, 1, D, H, W) float64, y_l (b, D, H, W) int64, x_u (b, 1, D, H, W) float64)."""
    data = fixture["inputs"]
    return data["image_l"].double(), data["label_l"].long(), data["image_u"].double()


def through_file(net: torch.nn.Module, optimizer: torch.optim.Optimizer, state: Any) -> dict[str, Any]:
    """A network's, its optimiser's and a method state's ``state_dict`` after ``torch.save`` and a
    ``weights_only`` load, as a checkpoint brings them back (keys ``net``, ``optimizer``, ``state``)."""
    buffer = io.BytesIO()
    torch.save({"net": net.state_dict(), "optimizer": optimizer.state_dict(), "state": state.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.detach().double(), theirs.double()
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-300))


def assert_state_matches(net: torch.nn.Module, reference: dict[str, torch.Tensor], tolerance: float, what: str,
                         key_map: Callable[[str], str] = dhc_to_skcdf_key) -> None:
    """``key_map`` maps a DHC state-dict key to ``net``'s (default: plain VNet)."""
    ours = net.state_dict()
    assert len(ours) == len(reference), what
    for key, value in reference.items():
        mine = ours[key_map(key)]
        if value.is_floating_point():
            assert relative_difference(mine, value) <= tolerance, f"{what}: {key}"
        else:
            assert torch.equal(mine.cpu(), value), f"{what}: {key}"


def assert_losses_match(ours: dict[str, float], reference: dict[str, float], what: str, names: dict[str, str]) -> None:
    """``names`` maps each fixture loss key to the step's key."""
    assert set(names) == set(reference), what
    for theirs_name, our_name in names.items():
        assert ours[our_name] == pytest.approx(reference[theirs_name], rel=LOSS_TOLERANCE, abs=0), f"{what}: {theirs_name}"


# --------------------------------------------------------------------------------------------------
# The replay shared by the CPS-pair methods (skcdf.methods.cps_pair): two networks A and B, the state
# holding B, two recorded iterations with injected dropout masks
# --------------------------------------------------------------------------------------------------

#: The fixture's loss keys of a CPS-pair method, named as the step names them.
PAIR_LOSS_NAMES = {name: name for name in ("sup_A", "sup_B", "cps_A", "cps_B", "sup", "cps", "total")}


@dataclass
class PairReplay:
    """A CPS-pair method under replay.

    start: fixture → (net A, its optimiser, state, config), as the recorder set them up.
    step: the method's ``*_step(net_a, optimizer_a, state, x_l, y_l, x_u, epoch, config, **kwargs)``.
    step_kwargs: fixture, iteration (0-based) → the step's extra keyword arguments (recorded draws).
    check_start: fixture, state → asserts on the method's statistics before iteration 1.
    check: fixture, iteration, state, terms → asserts on the method's statistics and extra terms.
    """

    fixture: str
    start: Callable[[dict], tuple[torch.nn.Module, torch.optim.Optimizer, Any, Any]]
    step: Callable[..., dict[str, Any]]
    step_kwargs: Callable[[dict, int], dict[str, Any]] = lambda fixture, i: {}
    check_start: Callable[[dict, Any], None] = lambda fixture, state: None
    check: Callable[[dict, int, Any, dict[str, Any]], None] = lambda fixture, i, state, terms: None


def pair_iteration(method: PairReplay, fixture: dict, i: int, net_a: torch.nn.Module,
                   optimizer_a: torch.optim.Optimizer, state: Any, config: Any) -> dict[str, Any]:
    """Iteration ``i`` (0-based) of the fixture with its recorded dropout masks; returns the step's terms."""
    x_l, y_l, x_u = inputs(fixture)
    net_a.dropout.replay(fixture["draws"][i]["dropout"]["A"])
    state.net_b.dropout.replay(fixture["draws"][i]["dropout"]["B"])
    terms = method.step(net_a, optimizer_a, state, x_l, y_l, x_u, fixture["hparams"]["epoch"], config,
                        **method.step_kwargs(fixture, i))
    assert net_a.dropout.pending == 0 and state.net_b.dropout.pending == 0
    return terms


def replay_pair(method: PairReplay) -> None:
    """Both recorded iterations: the weight, the losses, the method's checks and both networks' states."""
    fixture = load_fixture(method.fixture)
    hp = fixture["hparams"]
    net_a, optimizer_a, state, config = method.start(fixture)
    assert config.weight_at(hp["epoch"]) == pytest.approx(hp["cps_w"], rel=1e-15)
    method.check_start(fixture, state)
    for i in range(2):
        terms = pair_iteration(method, fixture, i, net_a, optimizer_a, state, config)
        method.check(fixture, i, state, terms)
        assert_losses_match(terms, fixture["losses"][i], f"iteration {i + 1}", PAIR_LOSS_NAMES)
        for name, net in (("A", net_a), ("B", state.net_b)):
            assert_state_matches(net, fixture[f"state{i + 1}"][name], STATE_TOLERANCE[i], f"{name} after iteration {i + 1}")


def resume_pair(method: PairReplay, fresh: Callable[[dict], tuple] | None = None) -> tuple[Any, Any]:
    """Save everything after iteration 1 (through a file, loaded with ``weights_only``), restore it into
    ``fresh(fixture)`` (default: ``method.start``), run iteration 2 in both: same terms, same networks.
    Returns (the state that went on, the restored one) for the method's own comparisons."""
    fixture = load_fixture(method.fixture)
    net_a, optimizer_a, state, config = method.start(fixture)
    pair_iteration(method, fixture, 0, net_a, optimizer_a, state, config)
    saved = through_file(net_a, optimizer_a, state)
    other_a, other_optimizer, restored, _ = (fresh or method.start)(fixture)
    other_a.load_state_dict(saved["net"])
    other_optimizer.load_state_dict(saved["optimizer"])
    restored.load_state_dict(saved["state"])
    terms = [pair_iteration(method, fixture, 1, net, opt, st, config)
             for net, opt, st in ((net_a, optimizer_a, state), (other_a, other_optimizer, restored))]
    assert terms[0]["total"] == terms[1]["total"]
    for a, b in ((net_a, other_a), (state.net_b, restored.net_b)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    return state, restored


def class_weight_replay(fixture: str, start: Callable[[dict], tuple], step: Callable[..., dict[str, Any]],
                        initial: str) -> PairReplay:
    """A method whose state holds running class weights ``weights_a`` / ``weights_b`` (CReST, SimiS), checked
    against ``fixture[initial]`` before iteration 1 and ``fixture["class_weights"][i]`` after each."""

    def assert_weights(state: Any, reference: dict[str, torch.Tensor]) -> None:
        for name, w in (("A", state.weights_a), ("B", state.weights_b)):
            assert relative_difference(w.weights, reference[name]) <= LOSS_TOLERANCE, name

    return PairReplay(fixture, start, step,
                      check_start=lambda fixture, state: assert_weights(state, fixture[initial]),
                      check=lambda fixture, i, state, terms: assert_weights(state, fixture["class_weights"][i]))
