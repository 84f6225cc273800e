"""SS-Net (Wu et al., *Exploring smoothness and class-separation for semi-supervised medical image
segmentation*, MICCAI 2022) as DHC's ``code/train_ssnet.py`` trains it.

One network, :class:`SSNetVNet` (DHC's ``VNet4SSNet``: the VNet plus a projection head, a prediction head
and two small "selector" MLPs per class), and a per-class memory of projected labeled features
(:class:`SSNetState`). With x = [x_l; x_u], logits o and the last feature map e (after its dropout):

    memory[c] ← P_eval(e_l) at the labeled voxels predicted correctly as c ≥ 1 (at most 32 of them: those
                the selector of c scores *lowest*); a class with no such voxel keeps its rows
    dice     = −mean_c Dice_c(softmax o_l, y)                       (all K classes, smooth 1e-8)
    lds      = −mean_c Dice_c(softmax o(x + ε·r_adv), softmax o(x))  (VAT, ξ = ε = 10, one power iteration)
    contr_l  = C(Q(P(e_l)), y),  contr_u = C(Q(P(e_u)), argmax o_u)
    loss     = dice + λ(epoch) · (lds + 0.1 · (contr_l + contr_u))

P and Q are the projection and prediction heads (P_eval: P with its BatchNorm in eval mode, no gradient).
C is the class-to-memory contrastive loss of :func:`class_memory_contrastive`: for each class with at least
two features and at least two memory rows, the mean cosine distance between the class's features and its
memory rows, each feature weighted by its selector (sigmoid, rescaled to mean 1); the sum over classes is
divided by K.

The paper describes a VAT-style smoothness term and a class-separation term that pulls features towards
high-quality class prototypes. SS-Net's own 3D code (ycwu1997/SS-Net, ``train_ss_3d.py``), which DHC's
script ports nearly line for line, realises the prototypes as the feature memory and selector-weighted
contrastive loss above (taken from Alonso et al.'s SemiSeg-Contrastive). DHC changes the Dice terms to its
multi-class ``SoftDiceLoss`` (−Dice averaged over all K classes, background included), the network width,
the schedule and the optimiser. Behaviour of the code, most of it inherited from SS-Net's
(tests/fixtures/dhc/README.md lists it all):

* The supervised cross entropy is computed but never added to the loss; the step reports it as
  ``ce_unused``.
* The memory keeps the lowest-scored features (ascending sort), and it is refilled from the current batch,
  not accumulated.
* The memory-side selector weights are normalised over an axis of length 1, so each is w/w = 1 up to
  rounding: the memory selectors get (near-)zero gradients, yet weight decay still moves their
  parameters and their BatchNorm running statistics still move.
* BatchNorm statistics: the projection head runs in eval mode for the memory and in train mode
  (updating its running statistics) for the contrastive features; the selectors run in train mode even
  when ranking the memory under ``no_grad``; the VAT target pass updates the VNet's running statistics,
  its two perturbed passes do not (``track_running_stats`` is switched off around them).
* Dropout3d(0.5) on x5 and on the last feature map is on in all four forwards of an iteration (the
  training forward and VAT's three), so the VAT target is itself a dropout sample.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from skcdf.methods.common import ReplayableDropout3d, WeightSchedule, dhc_to_skcdf_key, soft_dice_per_class
from skcdf.methods.plugin import Context, Recipe
from skcdf.nn.vnet import Decoder, Encoder

#: Terms returned by :func:`ssnet_step`. The five DHC terms first (``ce_unused`` is DHC's ``loss_seg``,
#: computed but not in the loss; ``loss_seg_dice`` is −Dice; ``loss_lds`` the VAT term; the two
#: contrastive terms), then the common names: ``supervised_loss`` = loss_seg_dice, ``consistency_loss`` =
#: loss_lds + contrastive_weight · (loss_contr_labeled + loss_contr_unlabeled) (what λ multiplies),
#: ``consistency_weight`` = λ, ``total``; and ``correct_voxels``, the labeled voxels the memory was
#: refilled from.
LOSS_TERMS = ("ce_unused", "loss_seg_dice", "loss_lds", "loss_contr_labeled", "loss_contr_unlabeled",
              "supervised_loss", "consistency_loss", "consistency_weight", "total", "correct_voxels")

_DHC_SELECTORS = (("contrastive_class_selector_memory", "memory_selectors"),  # the longer prefix first
                  ("contrastive_class_selector_", "selectors"))


def _mlp(in_features: int, hidden: int, out_features: int, activation: nn.Module) -> nn.Sequential:
    """Linear → BatchNorm1d → activation → Linear, DHC's head layout (keys 0, 1, 3)."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), activation,
                         nn.Linear(hidden, out_features))


class SSNetVNet(nn.Module):
    """DHC's ``VNet4SSNet(n_channels, n_classes, n_filters, normalization="batchnorm", has_dropout)``.

    The VNet of :class:`~skcdf.methods.common.DHCVNet` (skcdf's :class:`~skcdf.nn.vnet.Encoder` and
    :class:`~skcdf.nn.vnet.Decoder`, same keys, one shared :class:`ReplayableDropout3d` on x5 and on the last
    feature map: two masks per forward, x5's first), plus, with F = 2 · ``filters``:

    * ``projection_head``: Linear(filters, F) → BN1d → ReLU → Linear(F, F);
    * ``prediction_head``: Linear(F, F) → BN1d → ReLU → Linear(F, F);
    * ``selectors[c]`` and ``memory_selectors[c]`` for each class c: Linear(F, F) → BN1d → LeakyReLU(0.2) →
      Linear(F, 1), scoring features of class c and memory rows of class c.

    The heads act on feature vectors (n, ·), not on maps; :func:`ssnet_step` calls them.
    ``forward(x)``: x (b, C, D, H, W), sides divisible by 16 → in eval mode the logits (b, K, D, H, W) only;
    in training ``(logits, embedding)``, the embedding being the last feature map after its dropout,
    (b, filters, D, H, W). At the paper's width (32 filters, 14 classes) it has 37,914,858 parameters
    (the VNet's 37,778,126 and 136,732 in the heads).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 14, filters: int = 32, *, dropout: bool = True) -> None:
        super().__init__()
        self.encoder = Encoder(in_channels, filters, dropout=False)
        self.decoder = Decoder(filters, num_classes, aux_head=False, dropout=False)
        self.dropout = ReplayableDropout3d(0.5) if dropout else None
        if self.dropout is not None:  # one module in both places, like DHC's
            self.encoder.dropout = self.dropout
            self.decoder.dropout = self.dropout
        feature_dim = 2 * filters
        self.feature_dim = feature_dim
        self.projection_head = _mlp(filters, feature_dim, feature_dim, nn.ReLU(inplace=True))
        self.prediction_head = _mlp(feature_dim, feature_dim, feature_dim, nn.ReLU(inplace=True))
        self.selectors = nn.ModuleList(_mlp(feature_dim, feature_dim, 1, nn.LeakyReLU(0.2, inplace=True))
                                       for _ in range(num_classes))
        self.memory_selectors = nn.ModuleList(_mlp(feature_dim, feature_dim, 1, nn.LeakyReLU(0.2, inplace=True))
                                              for _ in range(num_classes))

    def _embedding(self, features: list[Tensor]) -> Tensor:
        """The decoder's last feature map after its dropout, (b, filters, D, H, W): the decoder's stages as
        :meth:`Decoder.forward` runs them, stopping before the head (which the Decoder does not expose)."""
        x = features[4]
        for i, (up, stage) in enumerate(zip(self.decoder.ups, self.decoder.stages)):
            x = stage(up(x) + features[3 - i])
        return self.decoder.dropout(x)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        embedding = self._embedding(self.encoder(x))
        logits = self.decoder.main_head(embedding)
        if not self.training:
            return logits
        return logits, embedding


def ssnet_to_skcdf_key(key: str) -> str:
    """Map a DHC ``VNet4SSNet`` state-dict key to the :class:`SSNetVNet` key
    (``contrastive_class_selector_3.1.running_mean`` → ``selectors.3.1.running_mean``,
    ``contrastive_class_selector_memory3.0.weight`` → ``memory_selectors.3.0.weight``; the heads keep
    their names; VNet keys as :func:`~skcdf.methods.common.dhc_to_skcdf_key`)."""
    module, _, rest = key.partition(".")
    if module in ("projection_head", "prediction_head"):
        return key
    for prefix, name in _DHC_SELECTORS:
        if module.startswith(prefix) and module[len(prefix):].isdigit():
            return f"{name}.{int(module[len(prefix):])}.{rest}"
    return dhc_to_skcdf_key(key)


def from_dhc_ssnet_state_dict(net: SSNetVNet, state_dict: Mapping[str, Tensor]) -> SSNetVNet:
    """Load a DHC ``VNet4SSNet`` state dict into ``net`` (strict; dtypes are converted to the net's)."""
    net.load_state_dict({ssnet_to_skcdf_key(k): v for k, v in state_dict.items()}, strict=True)
    return net


@dataclass
class SSNetConfig(WeightSchedule):
    """Hyper-parameters of DHC's ``train_ssnet.py``.

    The weight and its ramp: :class:`~skcdf.methods.common.WeightSchedule`'s, at DHC's README command
    (``-w 0.1 -ep 300 -r``; the script's own defaults are ``-w 1 -ep 500`` without ramp-up). The rest is
    fixed in the script: contrastive_weight (the 0.1 on the two contrastive terms inside λ), vat_xi /
    vat_epsilon / vat_iterations (``VAT3d(epi=10.0)``, ξ = 10 and one power iteration by default),
    elements_per_class (``FeatureMemory(32)``), dice_smooth (``SoftDiceLoss(smooth=1e-8, do_bg=True)``,
    used for the supervised and the VAT term).
    """

    contrastive_weight: float = 0.1
    vat_xi: float = 10.0
    vat_epsilon: float = 10.0
    vat_iterations: int = 1
    elements_per_class: int = 32
    dice_smooth: float = 1e-8


@dataclass
class SSNetState:
    """The feature memory: per class c a (n_c, F) tensor of projected labeled features, n_c ≤
    ``elements_per_class``; (0, F) while the class has never been stored. DHC starts with every class
    empty and never clears one: a class keeps its rows until a batch refills it. The background class is
    never stored (only correct foreground predictions are)."""

    memory: list[Tensor]

    @classmethod
    def create(cls, num_classes: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
               feature_dim: int = 0) -> SSNetState:
        """An empty memory for training from scratch (``feature_dim``: the rows' width, 2 · filters; only
        the empty tensors' shape depends on it)."""
        return cls([torch.zeros((0, feature_dim), dtype=dtype, device=device) for _ in range(num_classes)])

    def state_dict(self) -> dict[str, Any]:
        return {"memory": [rows.clone() for rows in self.memory]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        memory = list(state["memory"])
        if len(memory) != len(self.memory):
            raise ValueError(f"memory of {len(memory)} classes, expected {len(self.memory)}")
        self.memory = [rows.clone() for rows in memory]


def soft_dice_distance(probs: Tensor, target: Tensor, smooth: float) -> Tensor:
    """DHC's ``SoftDiceLoss(smooth, do_bg=True)(probs, target)`` with a soft target: −mean_c Dice_c, where
    Dice_c = (2 Σ p_c q_c + smooth) / (Σ p_c + Σ q_c + smooth + 1e-8), sums over batch and voxels (DHC writes
    the denominator as 2tp + fp + fn, which is the same sum). probs, target (b, K, D, H, W)."""
    axes = (0, *range(2, probs.ndim))
    tp = (probs * target).sum(axes)
    return -((2 * tp + smooth) / (probs.sum(axes) + target.sum(axes) + smooth + 1e-8)).mean()


def _unit_per_sample(d: Tensor) -> Tensor:
    """d / (‖d_i‖₂ + 1e-8) for each sample i of d (b, ...): DHC's ``_l2_normalize``."""
    norm = torch.linalg.vector_norm(d.reshape(d.shape[0], -1), dim=1)
    return d / (norm.view(-1, *([1] * (d.ndim - 1))) + 1e-8)


@contextlib.contextmanager
def batch_norm_statistics_frozen(net: nn.Module) -> Iterator[None]:
    """Inside, normalisation layers in training mode use batch statistics but do not update their running
    statistics (``track_running_stats`` off; DHC's ``_disable_tracking_bn_stats``)."""
    layers = [m for m in net.modules() if hasattr(m, "track_running_stats")]
    saved = [m.track_running_stats for m in layers]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, value in zip(layers, saved):
            m.track_running_stats = value


def vat_loss(net: nn.Module, x: Tensor, config: SSNetConfig, uniform: Tensor | None = None) -> Tensor:
    """DHC's ``VAT3d``: the Dice distance between the network's softmax at x (the target, no gradient) and
    at x + ε·r_adv, r_adv the unit direction (per sample) found by ``vat_iterations`` power iterations
    from a random direction with step ξ.

    x (b, C, D, H, W); the network in training mode (its ``forward`` gives (logits, embedding)).
    uniform: U[0, 1) of x's shape (the random direction is uniform − 0.5), None to draw it with torch.
    The target pass updates BatchNorm running statistics; the perturbed passes do not.
    """
    with torch.no_grad():
        target = net(x)[0].softmax(1)
    if uniform is None:
        uniform = torch.rand(x.shape, dtype=x.dtype, device=x.device)
    direction = _unit_per_sample(uniform.to(x) - 0.5)
    with batch_norm_statistics_frozen(net):
        for _ in range(config.vat_iterations):
            direction.requires_grad_(True)
            distance = soft_dice_distance(net(x + config.vat_xi * direction)[0].softmax(1), target, config.dice_smooth)
            # only the direction's gradient: DHC backpropagates into the parameters too, then zeroes them
            (gradient,) = torch.autograd.grad(distance, direction)
            direction = _unit_per_sample(gradient)
        return soft_dice_distance(net(x + config.vat_epsilon * direction)[0].softmax(1), target, config.dice_smooth)


@torch.no_grad()
def refill_memory(net: SSNetVNet, state: SSNetState, embedding: Tensor, labels: Tensor,
                  elements_per_class: int) -> None:
    """DHC's ``FeatureMemory.add_features_from_sample_learned``, with the projection before it.

    embedding (n, filters): features of correctly predicted foreground voxels; labels (n,) their classes.
    They are projected with the projection head in eval mode (running statistics). Each class c with at
    least one of them replaces its memory: all its features if there are at most ``elements_per_class``,
    otherwise the ``elements_per_class`` with the lowest ``sigmoid(selectors[c])`` score (DHC sorts in
    ascending order and keeps the first ones, although its comment says "highest"). The selector runs in
    training mode, so ranking moves its BatchNorm running statistics.
    """
    head = net.projection_head
    was_training = head.training
    head.eval()
    try:
        projected = head(embedding)
    finally:
        head.train(was_training)
    for c in range(len(state.memory)):
        rows = projected[labels == c]
        if rows.shape[0] == 0:
            continue  # the class keeps what it has
        if rows.shape[0] > elements_per_class:
            score = torch.sigmoid(net.selectors[c](rows))[:, 0]
            rows = rows[torch.sort(score, stable=True).indices[:elements_per_class]]
        state.memory[c] = rows


def class_memory_contrastive(net: SSNetVNet, features: Tensor, labels: Tensor, memory: list[Tensor]) -> Tensor:
    """DHC's ``contrastive_class_to_class_learned_memory``: features (n, F), labels (n,) int64, memory per
    class (n_c, F) → a scalar.

    For each class c with at least two features f_i and at least two memory rows m_j:
    mean_ij (1 − cos(f_i, m_j)) · a_i · b_j, with a_i = sigmoid(selectors[c](f_i)) rescaled to mean 1 over
    the class's features (the selector reads detached features, so it learns only through a_i) and
    b_j = sigmoid(memory_selectors[c](m̂_j)) divided by itself (m̂ the L2-normalised rows), i.e. 1: DHC
    normalises over an axis of length 1. b_j is still computed as DHC does, so that the memory selectors'
    BatchNorm statistics move and their parameters get their (near-zero) gradient and hence weight decay.
    The sum over classes is divided by K = ``len(memory)``; 0 if no class qualifies.
    """
    total = features.new_zeros(())
    for c, stored in enumerate(memory):
        rows = features[labels == c]
        if rows.shape[0] < 2 or stored.shape[0] < 2:
            continue
        stored = F.normalize(stored.to(rows), dim=1)  # (n_c, F)
        distances = 1 - F.normalize(rows, dim=1) @ stored.t()  # (n, n_c), in [0, 2]
        a = torch.sigmoid(net.selectors[c](rows.detach()))  # (n, 1)
        a = (a.shape[0] / a.sum(dim=0)) * a
        b = torch.sigmoid(net.memory_selectors[c](stored)).t()  # (1, n_c)
        b = (b.shape[0] / b.sum(dim=0)) * b  # shape[0] is 1 and the sum runs over one element: b / b
        total = total + (distances * a * b).mean()
    return total / len(memory)


def ssnet_step(net: SSNetVNet, optimizer: torch.optim.Optimizer, state: SSNetState, x_labeled: Tensor,
               y_labeled: Tensor, x_unlabeled: Tensor, epoch: int, config: SSNetConfig,
               vat_uniform: Tensor | None = None) -> dict[str, float]:
    """One SS-Net iteration: forward on [x_l; x_u], memory refill, the loss above, backward, SGD step.

    Args:
        net, optimizer: the :class:`SSNetVNet` and its optimiser (put in training mode here).
        state: the feature memory; refilled in place before the contrastive terms use it.
        x_labeled: (b_l, C, D, H, W); y_labeled: (b_l, D, H, W) int64; x_unlabeled: (b_u, C, D, H, W).
        epoch: 0-based epoch (sets λ).
        vat_uniform: the U[0, 1) draw of VAT's random direction, (b_l + b_u, C, D, H, W); None draws it.
    Returns:
        ``LOSS_TERMS`` as floats.

    Dropout masks (8 per iteration: 2 in each of the training forward and VAT's target, power-iteration
    and final passes) can be queued with ``net.dropout.replay``. DHC splits the concatenated batch in
    halves; here the split is at b_l, the same for DHC's equal batch sizes.
    """
    net.train()
    optimizer.zero_grad()
    n = x_labeled.shape[0]
    x = torch.cat([x_labeled, x_unlabeled], dim=0)
    logits, embedding = net(x)  # (b, K, D, H, W), (b, filters, D, H, W)
    probs = logits.softmax(1)
    predicted = probs.argmax(1)  # (b, D, H, W)
    voxels = embedding.permute(0, 2, 3, 4, 1)  # (b, D, H, W, filters): one feature vector per voxel
    voxels_l, voxels_u = voxels[:n], voxels[n:]

    correct = (predicted[:n] == y_labeled) & (predicted[:n] > 0)
    refill_memory(net, state, voxels_l[correct], y_labeled[correct], config.elements_per_class)

    # the projection head runs in training mode here: labeled voxels first, as in DHC (BN statistics order)
    features_l = net.prediction_head(net.projection_head(voxels_l.reshape(-1, voxels.shape[-1])))
    contrastive_l = class_memory_contrastive(net, features_l, y_labeled.reshape(-1), state.memory)
    features_u = net.prediction_head(net.projection_head(voxels_u.reshape(-1, voxels.shape[-1])))
    contrastive_u = class_memory_contrastive(net, features_u, predicted[n:].reshape(-1), state.memory)

    with torch.no_grad():  # DHC computes the CE and never uses it
        ce_unused = F.cross_entropy(logits[:n], y_labeled)
    dice = -soft_dice_per_class(probs[:n], y_labeled, smooth=config.dice_smooth).mean()  # background included
    lds = vat_loss(net, x, config, vat_uniform)

    weight = config.weight_at(epoch)
    consistency = lds + config.contrastive_weight * (contrastive_l + contrastive_u)
    loss = dice + weight * consistency
    loss.backward()
    optimizer.step()
    values = (ce_unused, dice, lds, contrastive_l, contrastive_u, dice, consistency, weight, loss, correct.sum())
    return {name: float(v.detach()) if isinstance(v, Tensor) else float(v) for name, v in zip(LOSS_TERMS, values)}


def _networks(in_channels: int, num_classes: int, filters: int, dropout: bool) -> dict[str, nn.Module]:
    return {"net": SSNetVNet(in_channels, num_classes, filters, dropout=dropout)}  # PyTorch's default init, as DHC


def _start(networks: dict[str, nn.Module], context: Context) -> tuple[SSNetState, SSNetConfig]:
    state = SSNetState.create(context.num_classes, device=context.device, feature_dim=networks["net"].feature_dim)
    return state, SSNetConfig.for_context(context)


RECIPE = Recipe(_networks, inference=("net",), start=_start, step=ssnet_step, terms=LOSS_TERMS,
                supervised="supervised_loss", unsupervised="consistency_loss", weight="consistency_weight",
                trained="net")


__all__ = ["LOSS_TERMS", "SSNetConfig", "SSNetState", "SSNetVNet", "batch_norm_statistics_frozen",
           "class_memory_contrastive", "from_dhc_ssnet_state_dict", "refill_memory", "soft_dice_distance",
           "ssnet_step", "ssnet_to_skcdf_key", "vat_loss"]
