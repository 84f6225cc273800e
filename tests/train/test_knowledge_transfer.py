"""EMA knowledge transfer against a straightforward name-by-name computation."""

import pytest
import torch

from skcdf.nn import SKCDFNet
from skcdf.train.knowledge_transfer import KnowledgeTransfer, parse_ema_order


def _model(**switches):
    torch.manual_seed(0)
    return SKCDFNet(num_classes=3, filters=2, patch_size=(16, 16, 16), skcm=False, **switches)


def _straightforward(state: dict, order, omega: float) -> dict:
    """θ_dst ← ω θ_dst + (1−ω) θ_src by parameter name, step after step, on a copy of the state dict."""
    state = {name: value.clone() for name, value in state.items()}
    pairs = {"Hl": ("labeled_decoder.main_head.", "labeled_decoder.aux_head."),
             "Hu": ("unlabeled_decoder.main_head.", "unlabeled_decoder.aux_head."),
             "D": ("unlabeled_decoder.", "labeled_decoder.")}
    for step in order:
        dst_prefix, src_prefix = pairs[step]
        for name in [n for n in state if n.startswith(dst_prefix) and "running" not in n and "num_batches" not in n]:
            source = src_prefix + name[len(dst_prefix):]
            state[name] = omega * state[name] + (1 - omega) * state[source]
    return state


@pytest.mark.parametrize("order", ["Hl,D,Hu", "D", "Hl,D", "D,Hl,Hu", "Hl,Hu,D"])
def test_matches_straightforward_update(order):
    model = _model()
    with torch.no_grad():  # distinct values in every head and in the BN buffers
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.add_(torch.rand_like(buffer))
    steps = parse_ema_order(order)
    expected = _straightforward(model.state_dict(), steps, 0.9)
    transfer = KnowledgeTransfer(model, steps, omega=0.9)
    transfer.apply()
    transfer_state = model.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(transfer_state[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_buffers_are_left_alone():
    model = _model()
    before = {name: b.clone() for name, b in model.named_buffers()}
    KnowledgeTransfer(model, ("Hl", "D", "Hu"), 0.5).apply()
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name])


def test_none_and_errors():
    assert parse_ema_order("none") == ()
    with pytest.raises(ValueError, match="unknown EMA step"):
        parse_ema_order("Hl,X")
    with pytest.raises(ValueError, match="two decoders"):
        KnowledgeTransfer(_model(shared_decoder=True), ("D",))
    with pytest.raises(ValueError, match="auxiliary heads"):
        KnowledgeTransfer(_model(aux_heads=False), ("Hu",))


def test_a_prior_shift_is_added_to_the_balanced_bias_as_it_is_blended_in():
    torch.manual_seed(0)
    model = _model()
    head, aux = model.labeled_decoder.main_head, model.labeled_decoder.aux_head
    before_weight, before_bias = head.weight.detach().clone(), head.bias.detach().clone()
    shift = torch.linspace(-3.0, 0.0, head.bias.numel())
    transfer = KnowledgeTransfer(model, ("Hl",), omega=0.9)
    transfer.set_prior_shift("Hl", shift)
    transfer.apply()
    torch.testing.assert_close(head.weight, 0.9 * before_weight + 0.1 * aux.weight)
    torch.testing.assert_close(head.bias, 0.9 * before_bias + 0.1 * (aux.bias + shift))
    with pytest.raises(ValueError, match="Hu"):
        transfer.set_prior_shift("Hu", shift)
