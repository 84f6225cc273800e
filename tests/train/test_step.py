"""The step's wiring (SPEC §2): which outputs feed which loss, pseudo-labels, masks, λ."""

import pytest
import torch
from torch import nn

from skcdf.nn import SKCDFNet
from skcdf.train.losses import balanced_dice_ce, dice_ce
from skcdf.train.step import TwoFlowForward, semi_supervised_loss, supervised_loss

K, B_L, B_U, SHAPE = 4, 2, 3, (4, 6, 5)


class FixedOutputs(nn.Module):
    """Stands in for TwoFlowForward: returns fixed logits (leaf tensors, so their gradients can be read)."""

    def __init__(self, aux: bool) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        make = lambda b: torch.randn(b, K, *SHAPE, generator=generator).requires_grad_(True)  # noqa: E731
        self.outputs = (make(B_L + B_U), make(B_L + B_U) if aux else None, make(B_U), make(B_U) if aux else None)

    def forward(self, x_labeled, x_unlabeled):
        assert x_labeled.shape[0] == B_L and x_unlabeled.shape[0] == B_U
        return self.outputs


def _inputs():
    generator = torch.Generator().manual_seed(2)
    return (torch.rand(B_L, 1, *SHAPE, generator=generator), torch.randint(0, K, (B_L, *SHAPE), generator=generator),
            torch.rand(B_U, 1, *SHAPE, generator=generator))


KEEP_L, KEEP_U = torch.tensor([0.2, 1.0, 0.5, 0.7]), torch.tensor([0.6, 1.0, 0.8, 0.9])


def _exclude_step(unsup_weight: float, threshold: float | None = None):
    """The step on fixed outputs in balance mode "exclude", its masks drawn after torch.manual_seed(5).
    Returns (forward, labels, (loss, terms, pseudo-labels))."""
    forward = FixedOutputs(aux=True)
    x_l, y_l, x_u = _inputs()
    torch.manual_seed(5)
    return forward, y_l, semi_supervised_loss(forward, x_l, y_l, x_u, unsup_weight=unsup_weight, keep_labeled=KEEP_L,
                                              keep_unlabeled=KEEP_U, balance_mode="exclude",
                                              pseudo_label_threshold=threshold)


def test_semi_supervised_loss_combines_the_right_outputs():
    forward, y_l, (loss, terms, _) = _exclude_step(3.0)
    keep_l, keep_u = KEEP_L, KEEP_U

    pl, pl_aux, pu, pu_aux = (t.detach() for t in forward.outputs)
    torch.manual_seed(5)  # the masks are the step's first two draws: labeled, then unlabeled
    mask_l = torch.rand(y_l.shape) < keep_l[y_l]
    pseudo, pseudo_aux = pl[B_L:].argmax(1), pl_aux[B_L:].argmax(1)
    mask_u = torch.rand(pseudo_aux.shape) < keep_u[pseudo_aux]
    expected = torch.stack([dice_ce(pl[:B_L], y_l), balanced_dice_ce(pl_aux[:B_L], y_l, mask_l, "exclude"),
                            dice_ce(pu, pseudo), balanced_dice_ce(pu_aux, pseudo_aux, mask_u, "exclude")])
    # in mode "exclude" the kept-voxel diagnostics are the trained balanced terms themselves
    torch.testing.assert_close(terms, torch.cat([expected, expected[[1, 3]]]))
    assert loss.item() == pytest.approx((expected[0] + expected[1] + 3.0 * (expected[2] + expected[3])).item(), rel=1e-6)

    loss.backward()
    labeled_main, labeled_aux = forward.outputs[0].grad, forward.outputs[1].grad
    # pseudo-labels carry no gradient: the unlabeled half of the labeled flow gets none
    assert torch.all(labeled_main[B_L:] == 0) and torch.all(labeled_aux[B_L:] == 0)
    assert labeled_main[:B_L].abs().sum() > 0 and forward.outputs[3].grad.abs().sum() > 0


def test_pseudo_label_threshold_keeps_only_confident_voxels():
    forward, y_l, (_, terms, pseudo_labels) = _exclude_step(1.0, threshold=0.5)
    keep_u = KEEP_U
    pl, pl_aux, pu, pu_aux = (t.detach() for t in forward.outputs)
    torch.manual_seed(5)
    torch.rand(y_l.shape)  # the labeled mask's draw
    probs, probs_aux = pl[B_L:].softmax(1), pl_aux[B_L:].softmax(1)
    confident, confident_aux = probs.max(1).values >= 0.5, probs_aux.max(1).values >= 0.5
    assert 0 < confident.sum() < confident.numel()  # the threshold does select
    mask_u = (torch.rand(confident_aux.shape) < keep_u[probs_aux.argmax(1)]) & confident_aux
    torch.testing.assert_close(terms[2], balanced_dice_ce(pu, probs.argmax(1), confident, "exclude"))
    torch.testing.assert_close(terms[3], balanced_dice_ce(pu_aux, probs_aux.argmax(1), mask_u, "exclude"))
    assert torch.equal(pseudo_labels["main"], probs.argmax(1)) and torch.equal(pseudo_labels["aux"], probs_aux.argmax(1))


def test_without_aux_heads_the_balanced_terms_vanish():
    x_l, y_l, x_u = _inputs()
    ones = torch.ones(K)
    loss, terms, _ = semi_supervised_loss(FixedOutputs(aux=False), x_l, y_l, x_u, unsup_weight=0.5,
                                       keep_labeled=ones, keep_unlabeled=ones)
    assert terms[1] == 0 and terms[3] == 0
    assert loss.item() == pytest.approx((terms[0] + 0.5 * terms[2]).item(), rel=1e-6)


def test_two_flow_forward_runs_both_flows():
    torch.manual_seed(0)
    model = SKCDFNet(num_classes=K, filters=2, patch_size=(32, 32, 32), dropout=False).eval()
    x_l, x_u = torch.rand(1, 1, 32, 32, 32), torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        pl, pl_aux, pu, pu_aux = TwoFlowForward(model)(x_l, x_u)
        expected_pl = model(torch.cat([x_l, x_u]), flow="labeled", n_labeled=1)
        expected_pu = model(x_u, flow="unlabeled")
    assert pl.shape == (3, K, 32, 32, 32) and pu.shape == (2, K, 32, 32, 32)
    torch.testing.assert_close((pl, pl_aux), expected_pl)
    torch.testing.assert_close((pu, pu_aux), expected_pu)


def test_supervised_loss_uses_the_inference_path():
    torch.manual_seed(0)
    model = SKCDFNet(num_classes=K, filters=2, patch_size=(16, 16, 16), skcm=False, shared_decoder=True,
                     aux_heads=False, dropout=False)
    x, y = torch.rand(2, 1, 16, 16, 16), torch.randint(0, K, (2, 16, 16, 16))
    loss, terms, _ = supervised_loss(model, x, y, keep_labeled=torch.ones(K))
    main, _ = model(x, flow="unlabeled")
    assert loss.item() == pytest.approx(dice_ce(main, y).item(), rel=1e-5)
    assert terms[1:].abs().sum() == 0


def test_the_kept_voxel_loss_shows_what_the_reference_balanced_loss_hides():
    """In the reference mode the trained balanced term keeps the masked voxels (uniform logits) in its
    means; the kept-voxel diagnostic is the same head's loss over the kept voxels only."""
    forward = FixedOutputs(aux=True)
    x_l, y_l, x_u = _inputs()
    torch.manual_seed(5)
    _, terms, pseudo_labels = semi_supervised_loss(forward, x_l, y_l, x_u, unsup_weight=1.0, keep_labeled=KEEP_L,
                                                   keep_unlabeled=KEEP_U, balance_mode="reference")
    pl_aux, pu_aux = forward.outputs[1].detach(), forward.outputs[3].detach()
    torch.manual_seed(5)
    mask_l = torch.rand(y_l.shape) < KEEP_L[y_l]
    mask_u = torch.rand(pseudo_labels["aux"].shape) < KEEP_U[pseudo_labels["aux"]]
    torch.testing.assert_close(terms[1], balanced_dice_ce(pl_aux[:B_L], y_l, mask_l, "reference"))
    torch.testing.assert_close(terms[4], balanced_dice_ce(pl_aux[:B_L], y_l, mask_l, "exclude"))
    torch.testing.assert_close(terms[5], balanced_dice_ce(pu_aux, pseudo_labels["aux"], mask_u, "exclude"))
    assert abs(terms[1] - terms[4]) > 1e-3


def test_decoupled_balanced_loss_trains_the_balanced_head_alone():
    """balance_mode "decoupled": the balanced loss reaches the aux head's weights and nothing upstream;
    the outputs are those of the attached model."""
    torch.manual_seed(0)
    model = SKCDFNet(num_classes=K, filters=2, patch_size=(16, 16, 16), skcm=False, shared_decoder=True,
                     dropout=False)
    x, y = torch.rand(2, 1, 16, 16, 16), torch.randint(0, K, (2, 16, 16, 16))
    attached = model(x, flow="unlabeled")
    model.labeled_decoder.detach_aux = True
    main, aux = model(x, flow="unlabeled")
    torch.testing.assert_close((main, aux), attached)
    balanced_dice_ce(aux, y, torch.rand(y.shape) < 0.5, "decoupled").backward()
    head = model.labeled_decoder.aux_head
    assert head.weight.grad.abs().sum() > 0
    upstream = [p for name, p in model.named_parameters() if not name.startswith("labeled_decoder.aux_head")]
    assert all(p.grad is None for p in upstream)
