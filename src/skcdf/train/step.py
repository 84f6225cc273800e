"""The loss of one training iteration (SPEC §2), for the two families of variants.

``semi_supervised_loss`` is the SKCDF step, also of its ablation variants (``step="semi"`` in
:mod:`skcdf.methods`; the switches live in the model and the configuration); ``supervised_loss``
serves the supervised references (``step="supervised"``). Both return the total loss (with graph),
the detached terms in the order of ``TERMS`` (so the trainer can log without a host-device sync per
iteration) and the pseudo-labels the step trained on (for :class:`skcdf.train.monitor.PseudoLabelMonitor`).

``TERMS`` is the four loss terms (``LOSS_TERMS``) followed by two diagnostics that are not trained
on: the balanced heads' DiceCE over the kept voxels alone (``KEPT_TERMS``). In the reference masking
mode the trained balanced loss keeps the ~99.5 % masked voxels in its CE mean and Dice denominators,
so it sits near ln K + 1 whatever the head does; the kept-voxel loss is the one that can fall.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from skcdf.train.balance import sample_balance_mask
from skcdf.train.losses import balanced_dice_ce, dice_ce

LOSS_TERMS = ("sup_main", "sup_bal", "unsup_main", "unsup_bal")
KEPT_TERMS = ("sup_bal_kept", "unsup_bal_kept")
TERMS = LOSS_TERMS + KEPT_TERMS


class TwoFlowForward(nn.Module):
    """Both forwards of the SKCDF step in one module call.

    DistributedDataParallel expects one forward per backward; calling the model twice through DDP
    would mark the shared encoder's gradients ready twice. Wrapping the two flows in one module makes
    the step a single DDP (and torch.compile) call.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x_labeled: Tensor, x_unlabeled: Tensor) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """x_labeled (B_l,1,D,H,W), x_unlabeled (B_u,1,D,H,W) ->
        (PL, PL_a) on [X_L; X_U] by the labeled flow, each (B_l+B_u,K,D,H,W), and
        (PU, PU_a) on X_U by the unlabeled flow, each (B_u,K,D,H,W); the aux outputs are None without aux heads.
        """
        batch_labeled = x_labeled.shape[0]
        both = torch.cat([x_labeled, x_unlabeled])
        labeled_main, labeled_aux = self.model(both, flow="labeled", n_labeled=batch_labeled)
        unlabeled_main, unlabeled_aux = self.model(x_unlabeled, flow="unlabeled")
        return labeled_main, labeled_aux, unlabeled_main, unlabeled_aux


def pseudo_labels_of(logits: Tensor, threshold: float | None) -> tuple[Tensor, Tensor | None]:
    """Hard pseudo-labels of detached logits (b,K,D,H,W): argmax (b,D,H,W) int64, and with a threshold
    the mask (b,D,H,W) bool of the voxels whose top softmax probability reaches it (else None)."""
    logits = logits.detach()
    if threshold is None:
        return logits.argmax(1), None
    confidence, labels = logits.float().softmax(1).max(1)
    return labels, confidence >= threshold


#: Balance modes whose trained loss is already the DiceCE over the kept voxels alone.
_KEPT_VOXEL_MODES = ("exclude", "decoupled")


@torch.no_grad()
def kept_voxel_loss(trained: Tensor, logits: Tensor, labels: Tensor, mask: Tensor, balance_mode: str) -> Tensor:
    """Diagnostic: DiceCE of a balanced head over the kept voxels alone ("exclude" normalisation), no graph.

    trained: the balanced term the step trains on, returned as it is (detached) when ``balance_mode``
    already normalises over the kept voxels, so the hot path computes it once.
    logits (b,K,D,H,W); labels (b,D,H,W) int64; mask (b,D,H,W) bool. Returns a 0-d tensor.
    """
    if balance_mode in _KEPT_VOXEL_MODES:
        return trained.detach()
    return balanced_dice_ce(logits.detach(), labels, mask, "exclude")


def semi_supervised_loss(
    forward: nn.Module,
    x_labeled: Tensor,
    y_labeled: Tensor,
    x_unlabeled: Tensor,
    *,
    unsup_weight: float,
    keep_labeled: Tensor,
    keep_unlabeled: Tensor,
    balance_mode: str = "reference",
    pseudo_label_threshold: float | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """L = L_sup + λ·L_unsup of SPEC §2.

    forward: a TwoFlowForward (possibly wrapped by DDP / torch.compile).
    x_labeled (B_l,1,D,H,W) float; y_labeled (B_l,D,H,W) int64; x_unlabeled (B_u,1,D,H,W) float.
    unsup_weight: λ(t). keep_labeled / keep_unlabeled (K,): the balanced-mask probabilities p and q(epoch).
    pseudo_label_threshold: None (reference: every voxel's argmax is a target) or τ in (0, 1): only
      voxels whose pseudo-label has softmax probability ≥ τ enter the unsupervised terms (left out of
      the CE mean and the Dice sums, as balance mode "exclude" does with its mask).
    Returns (loss 0-d with graph, terms (6,) detached, see TERMS,
    pseudo-labels {"main": (B_u,D,H,W) int64, and "aux" with aux heads}).
    """
    batch_labeled = x_labeled.shape[0]
    labeled_main, labeled_aux, unlabeled_main, unlabeled_aux = forward(x_labeled, x_unlabeled)
    pseudo_label, confident = pseudo_labels_of(labeled_main[batch_labeled:], pseudo_label_threshold)
    sup_main = dice_ce(labeled_main[:batch_labeled], y_labeled)
    if confident is None:
        unsup_main = dice_ce(unlabeled_main, pseudo_label)
    else:
        unsup_main = balanced_dice_ce(unlabeled_main, pseudo_label, confident, "exclude")
    pseudo_labels = {"main": pseudo_label}
    if labeled_aux is None:
        sup_bal = unsup_bal = sup_bal_kept = unsup_bal_kept = torch.zeros((), device=sup_main.device)
    else:
        pseudo_label_aux, confident_aux = pseudo_labels_of(labeled_aux[batch_labeled:], pseudo_label_threshold)
        mask_labeled = sample_balance_mask(keep_labeled, y_labeled)
        mask_unlabeled = sample_balance_mask(keep_unlabeled, pseudo_label_aux)
        if confident_aux is not None:
            mask_unlabeled = mask_unlabeled & confident_aux
        sup_bal = balanced_dice_ce(labeled_aux[:batch_labeled], y_labeled, mask_labeled, balance_mode, keep_labeled)
        unsup_bal = balanced_dice_ce(unlabeled_aux, pseudo_label_aux, mask_unlabeled, balance_mode, keep_unlabeled)
        sup_bal_kept = kept_voxel_loss(sup_bal, labeled_aux[:batch_labeled], y_labeled, mask_labeled, balance_mode)
        unsup_bal_kept = kept_voxel_loss(unsup_bal, unlabeled_aux, pseudo_label_aux, mask_unlabeled, balance_mode)
        pseudo_labels["aux"] = pseudo_label_aux
    loss = sup_main + sup_bal + unsup_weight * (unsup_main + unsup_bal)
    terms = torch.stack([sup_main, sup_bal, unsup_main, unsup_bal, sup_bal_kept, unsup_bal_kept]).detach()
    return loss, terms, pseudo_labels


def supervised_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    keep_labeled: Tensor,
    balance_mode: str = "reference",
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """DiceCE on labeled volumes only (the supervised references of skcdf.methods), plus the balanced loss on the
    auxiliary head when the model has one. Uses the unlabeled flow: the path that inference takes.

    x (B,1,D,H,W) float; y (B,D,H,W) int64. Returns (loss, terms (6,) detached, see TERMS; the unsup
    terms are 0, no pseudo-labels: {}).
    """
    main, aux = model(x, flow="unlabeled")
    sup_main = dice_ce(main, y)
    zero = torch.zeros((), device=sup_main.device)
    sup_bal = sup_bal_kept = zero
    if aux is not None:
        mask = sample_balance_mask(keep_labeled, y)
        sup_bal = balanced_dice_ce(aux, y, mask, balance_mode, keep_labeled)
        sup_bal_kept = kept_voxel_loss(sup_bal, aux, y, mask, balance_mode)
    loss = sup_main + sup_bal
    return loss, torch.stack([sup_main, sup_bal, zero, zero, sup_bal_kept, zero]).detach(), {}
