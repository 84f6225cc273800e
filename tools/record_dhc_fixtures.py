"""Record replay fixtures of the semi-supervised baselines from the DHC code base (xmed-lab/DHC).

    python tools/record_dhc_fixtures.py DHC_SOURCE OUT_DIR [--methods cps,uamt,dhc,dst,...]

DHC_SOURCE is a checkout (or ``git archive``) of https://github.com/xmed-lab/DHC, the folder that holds
``code/``. For each method this imports ``code/train_<method>.py`` (with the command line of DHC's
README: ``--base_lr 3e-2 -w 0.1 -ep 300 -r``), builds its networks with DHC's own ``make_model_all`` and
init functions, narrowed to ``N_FILTERS`` base filters (URPC's U-Net: ``URPC_FEATURE_SCALE``), and then runs the script's own inner training
loop, ``for batch_l, batch_u in tqdm(zip(labeled_loader, unlabeled_loader)): ...``, taken verbatim from
the script's ``__main__`` block with ``ast`` and executed over two batches. Nothing of the loop is
re-typed here; this file only supplies what the loop reads (models, optimisers, loss functions, the two
batches, ``epoch_num``, ``cps_w``) and watches what it does. Each method is one entry of ``METHOD_TABLE``
(a :class:`Method`: build the networks, adjust them, wire what the loop reads, read each iteration's results).

Changes made so that the run is small, exact and replayable (all of them are also listed in the
fixtures' README):

* float64 on CPU: ``torch.set_default_dtype(torch.float64)``; ``Tensor.cuda``/``Module.cuda`` are no-ops;
  ``Tensor.float`` and ``torch.FloatTensor`` give float64 (DHC's class-weight code casts to float32).
* Mixed precision off: ``autocast`` is a null context and the ``GradScaler`` a pass-through (scale 1,
  never skips a step). The scripts' ``-m`` flag is on by default and their ``else`` branch raises.
* Every random draw of the loop is made here, logged and stored: the ``Dropout3d`` channel masks of
  every forward (every ``Dropout3d`` module of each network is replaced by an equivalent module that logs
  its masks), UA-MT's Gaussian input noise (``torch.randn_like`` seen by the loop; drawn in float32 and
  rounded to float16, so that storing it in float16 is exact) and the uniforms of Basak's and CLD's
  sampling maps and of SS-Net's random VAT direction (``torch.rand`` of the script's module; on the grid
  k/2048, exact in float16).
* Method states that only change every few iterations (Adsh's score bank, Basak's and CLD's confidence
  statistics) start part-way through their period, SS-Net's feature memory starts filled as part-way
  through training, and a few heads are biased so that confidence thresholds are passed (SS-Net: so that
  one class has few correctly predicted voxels): see the README's table.
* The data loaders are replaced by the two stored batches (crop and flips happen in the loader, before
  the loop; the batches are what the loop receives).
* The learning rate and ``cps_w`` are those the script has set when epoch ``EPOCH`` starts:
  ``poly_lr(EPOCH - 1, 300, 0.03)`` and ``get_current_consistency_weight(EPOCH - 1)``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib.util
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FORMAT = "skcdf-dhc-fixture-1"
N_FILTERS = 1  # at 2 the six float64 states of a two-network method alone take 7 MB
NUM_CLASSES = 14  # Synapse
PATCH = (16, 16, 32)
BATCH = 2  # labeled and unlabeled batch size, DHC's default
EPOCH = 50  # the epoch both recorded iterations belong to
SEED = 17
TEACHER_HEAD_SCALE, TEACHER_HEAD_BIAS = 2.0, 5.0  # UA-MT only, see _prepare_uamt()
PSEUDO_HEAD_BIAS = 6.0  # DST only, see _prepare_dst()
DEPL_HEAD_BIAS = {"A": 4.5, "B": 5.5}  # DePL only, see _prepare_depl()
QHAT_STRIDE = 61  # DePL: the stored sample of the (1, K, *PATCH) marginals takes every 61st voxel
SSNET_HEAD_BIAS = (7, -0.1)  # SS-Net only: (class, bias added to its head), see _prepare_ssnet()
#: SS-Net only: rows of each class's feature memory before iteration 1 (classes not listed start empty, as
#: background always does), see _wire_ssnet()
SSNET_MEMORY_ROWS = {**{c: 32 for c in range(1, 11)}, 12: 5, 13: 1}
#: Synapse, 20 % labeled: 16 unlabeled volumes in batches of 2. The DST scripts count iterations (GRL warm start)
ITERATIONS_PER_EPOCH = 8
URPC_FEATURE_SCALE = 64  # URPC's unet_3D_ds: widths 64·2^i / feature_scale, 1 … 16 here (DHC: 4, 16 … 256)
UNLABELED_VOLUMES = 16  # Synapse, 20 % labeled: the unlabeled split (Adsh sizes its score bank by it)
#: DHC's README command line: bash train3times_seeds_20p.sh -c 0 -t synapse -m <method> -e '' -l 3e-2 -w 0.1
#: which runs code/train_<method>.py ... --base_lr 3e-2 -w 0.1 -ep 300 -sl labeled_20p -su unlabeled_20p -r
ARGV = ["--task", "synapse", "--exp", "fixture", "--seed", "0", "-g", "0", "--base_lr", "0.03", "-w", "0.1",
        "-ep", "300", "-sl", "labeled_20p", "-su", "unlabeled_20p", "-r"]


# --------------------------------------------------------------------------------------------------
# Environment: float64, CPU, no autocast, logged random draws
# --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def float64_cpu() -> Iterator[None]:
    """Default dtype float64, ``.cuda()`` a no-op, float32 casts widened to float64 (restored on exit)."""
    saved = (torch.get_default_dtype(), torch.Tensor.cuda, nn.Module.cuda, torch.Tensor.float, torch.FloatTensor)
    torch.set_default_dtype(torch.float64)
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.float = lambda self, *a, **k: self.double()
    torch.FloatTensor = lambda data: torch.as_tensor(np.asarray(data), dtype=torch.float64).clone()
    had_np_float = "float" in vars(np)
    if not had_np_float:
        np.float = float  # removed in numpy 1.24; DST's gradient reversal layer still calls it
    try:
        yield
    finally:
        torch.set_default_dtype(saved[0])
        torch.Tensor.cuda, nn.Module.cuda, torch.Tensor.float, torch.FloatTensor = saved[1:]
        if not had_np_float:
            del np.float


class LoggedDropout3d(nn.Module):
    """Same as ``nn.Dropout3d(p)`` in training (zero whole channels with probability p, scale the rest by
    1 / (1 − p)), drawing its (b, c, 1, 1, 1) masks from ``generator`` and appending them to ``log``.

    A one-channel input (x9 at one base filter) is redrawn until at least one sample keeps it: a draw
    that drops the only channel of every sample leaves the loss blind to the whole network but the head's
    bias, which would make the fixture a poor test. Each kept draw is still one the script could make."""

    def __init__(self, p: float, generator: torch.Generator, log: list[torch.Tensor]) -> None:
        super().__init__()
        self.p, self.generator, self.log = p, generator, log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape[:2], generator=self.generator, dtype=torch.float64) >= self.p
        while x.shape[1] == 1 and not keep.any():  # one channel (x9 at one base filter): keep one sample at least
            keep = torch.rand(x.shape[:2], generator=self.generator, dtype=torch.float64) >= self.p
        mask = keep.to(x.dtype).view(*x.shape[:2], 1, 1, 1)
        self.log.append(keep.clone())
        return x * (mask / (1 - self.p))


class TorchWithLoggedNoise:
    """Stands for the ``torch`` module inside the loop: ``randn_like`` is drawn from ``generator``, rounded
    to float16 (so that the stored float16 copy is exact), widened and logged; every other name is torch's.

    ``rand(*size)`` (Basak's and CLD's sampling masks, where this object also stands for the script's module
    global ``torch``) draws uniforms on the grid k/2048, k = 0 … 2047 (exact in float16, never 1), and logs
    them to ``rand_log``."""

    def __init__(self, generator: torch.Generator, log: list[torch.Tensor],
                 rand_log: list[torch.Tensor] | None = None) -> None:
        self._generator, self._log, self._rand_log = generator, log, rand_log

    def rand(self, *size: Any) -> torch.Tensor:
        if self._rand_log is None:
            raise RuntimeError("torch.rand in a loop that was not expected to draw uniforms")
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)
        uniform = (torch.floor(torch.rand(shape, generator=self._generator, dtype=torch.float32) * 2048) / 2048)
        uniform = uniform.to(torch.float16)
        self._rand_log.append(uniform.clone())
        return uniform.to(torch.get_default_dtype())

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=self._generator, dtype=torch.float32).to(torch.float16)
        self._log.append(noise.clone())
        return noise.to(x.dtype)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class PassThroughScaler:
    """``GradScaler`` with scale 1 that never skips a step."""

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def update(self) -> None:
        pass


class LoggedLoss:
    """Calls ``loss`` and appends each value (a Python float) to ``log``; forwards ``update_weight``."""

    def __init__(self, loss: Callable, log: list[float]) -> None:
        self.loss, self.log = loss, log

    def __call__(self, *args: Any) -> torch.Tensor:
        value = self.loss(*args)
        self.log.append(float(value.detach()))
        return value

    def update_weight(self, weight: torch.Tensor) -> None:
        self.loss.update_weight(weight)


# --------------------------------------------------------------------------------------------------
# Loading DHC's scripts and their training loop
# --------------------------------------------------------------------------------------------------

def _stub_missing_imports() -> None:
    """torchvision is imported by the scripts for the loaders' ``transforms.Compose`` only."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        stub = types.ModuleType("torchvision")
        stub.transforms = types.ModuleType("torchvision.transforms")
        stub.transforms.Compose = lambda ops: ops
        sys.modules["torchvision"] = stub
        sys.modules["torchvision.transforms"] = stub.transforms


def load_script(code_dir: Path, method: str) -> types.ModuleType:
    """Import ``code/train_<method>.py`` (module-level code only: argparse with ``ARGV``, imports, defs)."""
    _stub_missing_imports()
    if str(code_dir) not in sys.path:
        sys.path.insert(0, str(code_dir))
    path = code_dir / f"train_{method}.py"
    saved_argv = sys.argv
    sys.argv = [str(path), *ARGV]
    try:
        spec = importlib.util.spec_from_file_location(f"dhc_train_{method}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.argv = saved_argv
    module.config.n_filters = N_FILTERS
    module.config.patch_size = PATCH  # DePL's per-voxel class marginal has the patch's shape
    return module


def training_loop(path: Path) -> types.CodeType:
    """The script's inner loop ``for batch_l, batch_u in ...zip(labeled_loader, unlabeled_loader)...``,
    compiled from its own source (tracebacks point at the script's lines)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if (isinstance(node, ast.For) and isinstance(node.target, ast.Tuple)
                and [getattr(e, "id", None) for e in node.target.elts] == ["batch_l", "batch_u"]):
            return compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec")
    raise RuntimeError(f"no `for batch_l, batch_u in ...` loop in {path}")


def _git_commit(source: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------

def make_inputs(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Two labeled and two unlabeled float64 volumes in [0, 1], (2, 1, *PATCH); labels (2, *PATCH) in
    [0, 14) with every class present and class sizes from a few voxels to about half the volume."""
    small = (PATCH[0] // 4, PATCH[1] // 4, PATCH[2] // 4)
    coarse = torch.rand((2 * BATCH, 1, *small), generator=generator, dtype=torch.float64)
    image = F.interpolate(coarse, size=PATCH, mode="trilinear", align_corners=False)
    image = (image + 0.05 * torch.rand(image.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    image = image.to(torch.float32).to(torch.float64)  # float32-exact: stored as float32 without loss
    logits = torch.randn((BATCH, NUM_CLASSES, *small), generator=generator, dtype=torch.float64)
    bias = torch.linspace(1.0, -0.5, NUM_CLASSES, dtype=torch.float64).view(1, -1, 1, 1, 1)
    label = (F.interpolate(logits, size=PATCH, mode="trilinear", align_corners=False) + bias).argmax(1)
    counts = torch.bincount(label.reshape(-1), minlength=NUM_CLASSES)
    assert (counts > 0).all(), counts
    return {"image_l": image[:BATCH].contiguous(), "image_u": image[BATCH:].contiguous(), "label_l": label}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# Recording one method
# --------------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------------
# Per-method set-up: one entry per script
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Context:
    """What a method's set-up functions see and fill in."""

    module: types.ModuleType  # the imported script
    args: argparse.Namespace  # its parsed command line
    inputs: dict[str, torch.Tensor]
    networks: dict[str, nn.Module] = dataclasses.field(default_factory=dict)
    optimizers: dict[str, torch.optim.Optimizer] = dataclasses.field(default_factory=dict)
    namespace: dict[str, Any] = dataclasses.field(default_factory=dict)  # names the loop reads
    logged: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # LoggedLoss values
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # stored once per fixture
    untrained: tuple[str, ...] = ()  # networks the script never switches to train()
    draw_generator: torch.Generator | None = None  # the generator of the logged draws
    rand_log: list[torch.Tensor] = dataclasses.field(default_factory=list)  # logged torch.rand draws

    def log_loss(self, namespace_name: str, key: str, loss: Callable) -> None:
        self.logged[key] = []
        self.namespace[namespace_name] = LoggedLoss(loss, self.logged[key])


@dataclasses.dataclass
class Method:
    """How to record one script.

    build: create ``ctx.networks`` / ``ctx.optimizers`` with the script's own set-up lines, in its order.
    prepare: in-place changes to the fresh networks (before their weights are rounded to float32).
    wire: what the loop reads besides the common names (models, loss functions, method state).
    iteration: after each iteration, ``(ctx, namespace, entry) -> losses``; may add keys to ``entry``.
    per_iteration: keys of ``entry`` stored per iteration as a list.
    """

    build: Callable[[Context], None]
    wire: Callable[[Context], None]
    iteration: Callable[[Context, dict[str, Any], dict[str, Any]], dict[str, float]]
    prepare: Callable[[Context], None] = lambda ctx: None
    per_iteration: tuple[str, ...] = ()


def _build_pair(init_b: str) -> Callable[[Context], None]:
    def build(ctx: Context) -> None:
        model_A, optimizer_A = ctx.module.make_model_all()
        model_B, optimizer_B = ctx.module.make_model_all()
        model_A = ctx.module.kaiming_normal_init_weight(model_A)
        model_B = getattr(ctx.module, f"{init_b}_init_weight")(model_B)
        ctx.networks.update(A=model_A, B=model_B)
        ctx.optimizers.update(A=optimizer_A, B=optimizer_B)
    return build


def _wire_pair(ctx: Context) -> None:
    ctx.namespace.update(model_A=ctx.networks["A"], model_B=ctx.networks["B"],
                         optimizer_A=ctx.optimizers["A"], optimizer_B=ctx.optimizers["B"])


# ---- CPS

def _wire_cps(ctx: Context) -> None:
    _wire_pair(ctx)
    for key, name in (("sup", "loss_func"), ("cps", "cps_loss_func")):
        ctx.log_loss(name, key, ctx.module.make_loss_function(getattr(ctx.args, f"{key}_loss")))
    ctx.hparams.update(sup_loss=ctx.args.sup_loss, cps_loss=ctx.args.cps_loss)


def _iteration_cps(ctx: Context, ns: dict[str, Any], entry: dict[str, Any]) -> dict[str, float]:
    sup, cps = ctx.logged["sup"], ctx.logged["cps"]
    return {"sup_A": sup[-2], "sup_B": sup[-1], "cps_A": cps[-2], "cps_B": cps[-1],
            "sup": float(ns["loss_sup"]), "cps": float(ns["loss_cps"])}


# ---- UA-MT

def _build_uamt(ctx: Context) -> None:
    model, optimizer = ctx.module.make_model_all()
    ema_model, _ = ctx.module.make_model_all(ema=True)
    ctx.networks.update(student=model, teacher=ema_model)
    ctx.optimizers.update(student=optimizer)
    ctx.untrained = ("teacher",)  # UA-MT's teacher is never switched to eval() either: train mode as built


def _prepare_uamt(ctx: Context) -> None:
    # A randomly initialised 14-class head gives a mean teacher prediction with entropy near ln 14,
    # far above the uncertainty threshold (< ln 2), so no voxel would pass and the consistency
    # term would be exactly 0. Sharpen the teacher's head so that a part of the voxels passes.
    with torch.no_grad():
        head = ctx.networks["teacher"].out_conv
        head.weight.mul_(TEACHER_HEAD_SCALE)
        head.bias.zero_()[0] = TEACHER_HEAD_BIAS


def _wire_uamt(ctx: Context) -> None:
    module, args = ctx.module, ctx.args
    ctx.namespace.update(model=ctx.networks["student"], ema_model=ctx.networks["teacher"],
                         optimizer=ctx.optimizers["student"], ce_loss=nn.CrossEntropyLoss(),
                         dice_loss=module.SoftDiceLoss(smooth=1e-8))
    ctx.hparams.update(ema_decay=0.99, T=8, noise_std=0.1, noise_clip=0.2,
                       ema_alpha=min(1 - 1 / (EPOCH + 1), 0.99),
                       threshold=float((0.75 + 0.25 * module.sigmoid_rampup(EPOCH, args.max_epoch)) * np.log(2)))


def _iteration_uamt(ctx: Context, ns: dict[str, Any], entry: dict[str, Any]) -> dict[str, float]:
    entry["uncertainty_mask_count"] = int(ns["mask"].sum())
    return {key: float(ns[key]) for key in ("loss_ce", "loss_dice", "supervised_loss", "consistency_loss")}


# ---- DHC

def _dhc_statistics(diffdw: Any, distdw: Any) -> dict[str, torch.Tensor]:
    return {"weights_B": distdw.weights.clone(), "last_dice": diffdw.last_dice.clone(),
            "cls_learn": diffdw.cls_learn.clone(), "cls_unlearn": diffdw.cls_unlearn.clone(),
            "dice_weight": diffdw.dice_weight.clone()}


def _wire_dhc(ctx: Context) -> None:
    module, args, inputs = ctx.module, ctx.args, ctx.inputs
    _wire_pair(ctx)

    class LabeledSet:  # what DistDW.init_weights reads of the labeled Dataset
        unlabeled = False
        ids_list = list(range(BATCH))

        def _get_data(self, data_id):
            return data_id, None, inputs["label_l"][data_id].numpy()

    diffdw = module.DiffDW(module.config.num_cls, accumulate_iters=50)
    distdw = module.DistDW(module.config.num_cls, momentum=0.99)
    weight_A = diffdw.init_weights()
    weight_B = distdw.init_weights(LabeledSet())
    for name, key, weight in (("loss_func_A", "sup_A", weight_A), ("loss_func_B", "sup_B", weight_B),
                              ("cps_loss_func_A", "cps_A", weight_A), ("cps_loss_func_B", "cps_B", weight_B)):
        loss_name = args.sup_loss if name.startswith("loss") else args.cps_loss
        ctx.log_loss(name, key, module.make_loss_function(loss_name, weight))
    ctx.namespace.update(diffdw=diffdw, distdw=distdw)
    ctx.hparams.update(sup_loss=args.sup_loss, cps_loss=args.cps_loss, diffdw_accumulate_iters=50,
                       distdw_momentum=0.99)
    ctx.extra["labeled_class_counts"] = torch.bincount(inputs["label_l"].reshape(-1), minlength=NUM_CLASSES)
    ctx.extra["dhc_state0"] = _dhc_statistics(diffdw, distdw)


def _iteration_dhc(ctx: Context, ns: dict[str, Any], entry: dict[str, Any]) -> dict[str, float]:
    entry["weight_A"] = ns["weight_A"].detach().clone()
    entry["weight_B"] = ns["weight_B"].detach().clone()
    entry["dhc_state"] = _dhc_statistics(ns["diffdw"], ns["distdw"])
    losses = {key: ctx.logged[key][-1] for key in ("sup_A", "sup_B", "cps_A", "cps_B")}
    return {**losses, "sup": float(ns["loss_sup"]), "cps": float(ns["loss_cps"])}


# ---- DST (decoupled pseudo-label head, worst-case head behind a gradient reversal layer)

def _prepare_dst(ctx: Context) -> None:
    # A pseudo label counts where the pseudo head's softmax exceeds 0.95. A random 14-class head never
    # gets there, so both pseudo-label terms would be exactly 0: give class 0 a bias of PSEUDO_HEAD_BIAS in
    # both pseudo heads, so that part of the voxels passes. The GRL's iteration count is set to where a
    # Synapse-20 % run is when epoch EPOCH starts (the script steps it once per iteration).
    with torch.no_grad():
        for net in ctx.networks.values():
            net.decoder_pseudo.head.bias.zero_()[0] = PSEUDO_HEAD_BIAS
            net.decoder_worst.grl_layer.iter_num = EPOCH * ITERATIONS_PER_EPOCH


def _wire_dst(ctx: Context) -> None:
    module, args = ctx.module, ctx.args
    _wire_pair(ctx)
    ctx.log_loss("loss_func", "sup", module.make_loss_function(args.sup_loss))
    assert args.cps_loss == "wce"
    ctx.log_loss("cps_loss_func", "cps", module.Onehot_WeightedCrossEntropyLoss())
    ctx.log_loss("worst_case_criterion", "worst", module.WorstCaseEstimationLoss())
    grl = ctx.networks["A"].decoder_worst.grl_layer
    ctx.hparams.update(sup_loss=args.sup_loss, cps_loss=args.cps_loss, confidence_threshold=0.95,
                       grl_alpha=grl.alpha, grl_lo=grl.lo, grl_hi=grl.hi, grl_max_iters=grl.max_iters,
                       iterations_per_epoch=ITERATIONS_PER_EPOCH)
    ctx.extra["grl_iter0"] = grl.iter_num


def _iteration_dst(ctx: Context, ns: dict[str, Any], entry: dict[str, Any]) -> dict[str, float]:
    entry["pseudo_mask_count"] = {"A": int(ns["mask_A"].sum()), "B": int(ns["mask_B"].sum())}
    entry["grl_iter"] = {name: net.decoder_worst.grl_layer.iter_num for name, net in ctx.networks.items()}
    sup, cps, worst = ctx.logged["sup"], ctx.logged["cps"], ctx.logged["worst"]
    return {"sup_A": sup[-2], "sup_B": sup[-1], "cps_A": cps[-2], "cps_B": cps[-1], "worst_A": worst[-2],
            "worst_B": worst[-1], "sup": float(ns["loss_sup"]), "cps": float(ns["loss_cps"]),
            "worst": float(ns["loss_worst_case"])}


# ---- DePL (debiased pseudo-labels: logit adjustment by a running per-voxel class marginal)

def _prepare_depl(ctx: Context) -> None:
    # The pseudo-labels count where the debiased softmax reaches 0.9; a random 14-class head never does, so
    # both terms would be exactly 0: give class 0 a bias (DEPL_HEAD_BIAS) in both heads,
    # chosen so that a part of the voxels passes in each.
    with torch.no_grad():
        for name, net in ctx.networks.items():
            net.out_conv.bias.zero_()[0] = DEPL_HEAD_BIAS[name]


def _qhat_summary(qhat: torch.Tensor) -> dict[str, torch.Tensor]:
    flat = qhat.detach().reshape(NUM_CLASSES, -1)
    return {"class_sum": flat.sum(1).clone(), "sample": flat[:, ::QHAT_STRIDE].clone()}


def _wire_depl(ctx: Context) -> None:
    module, args = ctx.module, ctx.args
    _wire_pair(ctx)
    ctx.log_loss("loss_func", "sup", module.make_loss_function(args.sup_loss))
    ctx.log_loss("cps_loss_func", "cps", module.WeightedCrossEntropyLoss())
    # The script starts both marginals at 1/K everywhere (initial_qhat) and never resets them. A uniform
    # marginal makes the debiasing a no-op in the first iteration, so start from the state of a run that
    # has seen a class prior: per class a float32-exact value, the same at every voxel.
    uniform = module.initial_qhat(class_num=NUM_CLASSES)
    assert tuple(uniform.shape) == (1, NUM_CLASSES, *PATCH)
    generator = torch.Generator().manual_seed(SEED + 2)
    qhat0 = {}
    for name in ("A", "B"):
        prior = torch.softmax(torch.randn(NUM_CLASSES, generator=generator, dtype=torch.float64), 0)
        prior = (0.5 / NUM_CLASSES + 0.5 * prior).to(torch.float32).to(torch.float64)
        qhat0[name] = prior
        ctx.namespace[f"qhat_{name}"] = prior.view(1, -1, 1, 1, 1).expand_as(uniform).clone()
    ctx.namespace["tau"] = 1.0  # the script's value, set before its epoch loop
    ctx.hparams.update(sup_loss=args.sup_loss, cps_loss="WeightedCrossEntropyLoss (masked)", tau=1.0,
                       threshold=0.9, qhat_momentum=0.99, qhat_stride=QHAT_STRIDE)
    ctx.extra["qhat0_class"] = {name: q.to(torch.float32) for name, q in qhat0.items()}


def _iteration_depl(ctx: Context, ns: dict[str, Any], entry: dict[str, Any]) -> dict[str, float]:
    entry["pseudo_mask_count"] = {"A": int(ns["mask_A"].sum()), "B": int(ns["mask_B"].sum())}
    entry["qhat"] = {"A": _qhat_summary(ns["qhat_A"]), "B": _qhat_summary(ns["qhat_B"])}
    sup, cps = ctx.logged["sup"], ctx.logged["cps"]
    return {"sup_A": sup[-2], "sup_B": sup[-1], "cps_A": cps[-2], "cps_B": cps[-1],
            "sup": float(ns["loss_sup"]), "cps": float(ns["loss_cps"])}


# ---- Adsh (adaptive per-class thresholds from a bank of unlabeled scores)

def _adsh_start(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse logits (BATCH, K, *PATCH/4) for the bank rows filled before the recorded iterations, and the
    thresholds computed before them (K,), both float32-exact."""
    small = (PATCH[0] // 4, PATCH[1] // 4, PATCH[2] // 4)
    coarse = 2.0 * torch.randn((BATCH, NUM_CLASSES, *small), generator=generator, dtype=torch.float64)
    coarse[:, 0] += 3.0  # class 0 the majority, confident (> 0.9) in a part of the voxels
    thresholds = 0.03 + 0.12 * torch.rand(NUM_CLASSES, generator=generator, dtype=torch.float64)
    return coarse.to(torch.float32), thresholds.to(torch.float32)


def adsh_bank_rows(coarse: torch.Tensor) -> torch.Tensor:
    """The stored bank rows: softmax of the trilinearly upsampled coarse logits (float64). The test calls
    the same function of torch, so the rows agree to the last bit on the same build."""
    return F.interpolate(coarse.double(), size=PATCH, mode="trilinear", align_corners=False).softmax(1)


def _wire_adsh(ctx: Context) -> None:
    module, args = ctx.module, ctx.args
    _wire_pair(ctx)
    ctx.log_loss("loss_func", "sup", module.make_loss_function(args.sup_loss))
    assert args.cps_loss == "wce"
    ctx.log_loss("cps_loss_func", "cps", module.ClassDependent_WeightedCrossEntropyLoss())
    # The bank holds tot_iter = 16 // 4 = 4 unlabeled samples; get_thresholds stores a batch of 2 while
    # cur_iter < 3 and otherwise recomputes the thresholds from the bank (not from the current batch) and
    # starts over. So a run cycles store [0:2], store [2:4], recompute; at iteration 400 = 50 × 8 it is at
    # "store [2:4]" (400 mod 3 = 1). Set both banks there: rows [0:2] and the thresholds in use are a
    # synthetic earlier state (stored), iteration 1 stores its output in rows [2:4], iteration 2 recomputes.
    generator = torch.Generator().manual_seed(SEED + 3)
    start = {}
    for name in ("A", "B"):
        adsh = module.ADSH(num_cls=NUM_CLASSES, thresh_major=0.9, tot_iter=UNLABELED_VOLUMES // 4)
        assert tuple(adsh.scores.shape) == (4, NUM_CLASSES, *PATCH)
        coarse, thresholds = _adsh_start(generator)
        adsh.scores[0:BATCH] = adsh_bank_rows(coarse)
        adsh.cur_iter = BATCH
        adsh.thresholds.copy_(thresholds.double())
        ctx.namespace[f"adsh_{name}"] = adsh
        start[name] = {"coarse_logits": coarse, "thresholds": thresholds, "cur_iter": BATCH}
    ctx.hparams.update(sup_loss=args.sup_loss, cps_loss=args.cps_loss, thresh_major=0.9,
                       bank_size=UNLABELED_VOLUMES // 4, iteration0=EPOCH * ITERATIONS_PER_EPOCH)
    ctx.extra["adsh_start"] = start


def _iteration_adsh(ctx: Context, ns: dict[str, Any], entry: dict[str, Any]) -> dict[str, float]:
    entry["adsh"] = {name: {"thresholds": ns[f"adsh_{name}"].thresholds.clone(),
                            "cur_iter": ns[f"adsh_{name}"].cur_iter,
                            "sample_map_count": ns[f"sample_map_{name}"].sum((0, 2, 3, 4)).long()}
                     for name in ("A", "B")}
    sup, cps = ctx.logged["sup"], ctx.logged["cps"]
    return {"sup_A": sup[-2], "sup_B": sup[-1], "cps_A": cps[-2], "cps_B": cps[-1],
            "sup": float(ns["loss_sup"]), "cps": float(ns["loss_cps"])}


# ---- CReST (class-rebalancing weights from the pseudo-label distribution)

def _labeled_set(inputs: dict[str, torch.Tensor]) -> Any:
    class LabeledSet:  # what DistDW.init_weights and CReST.init_crest_weight read of the labeled Dataset
        unlabeled = False
        ids_list = list(range(BATCH))

        def _get_data(self, data_id):
            return data_id, None, inputs["label_l"][data_id].numpy()

    return LabeledSet()


def _wire_weighted_pair(ctx: Context, name: str, init: str, momentum_key: str, **hparams: float) -> None:
    """CReST and SimiS: a CPS pair whose four losses are weighted by the method's class weights, one
    weight object per network (``module.<name>``, initialised by its ``<init>`` on the labeled set)."""
    module, args = ctx.module, ctx.args
    _wire_pair(ctx)
    weighting = {net: getattr(module, name)(module.config.num_cls, do_bg=True, momentum=0.99) for net in "AB"}
    weight = {net: getattr(weighting[net], init)(_labeled_set(ctx.inputs)) for net in "AB"}
    for loss, key, net in (("loss_func_A", "sup_A", "A"), ("loss_func_B", "sup_B", "B"),
                           ("cps_loss_func_A", "cps_A", "A"), ("cps_loss_func_B", "cps_B", "B")):
        loss_name = args.sup_loss if loss.startswith("loss") else args.cps_loss
        ctx.log_loss(loss, key, module.make_loss_function(loss_name, weight=weight[net]))
    prefix = name.lower()
    ctx.namespace.update({f"{prefix}_{net}": weighting[net] for net in "AB"})
    ctx.hparams.update(sup_loss=args.sup_loss, cps_loss=args.cps_loss, **{momentum_key: 0.99}, **hparams)
    ctx.extra["labeled_class_counts"] = torch.bincount(ctx.inputs["label_l"].reshape(-1), minlength=NUM_CLASSES)
    ctx.extra[f"{prefix}_weights0"] = {net: weighting[net].weights.clone() for net in "AB"}


def _wire_crest(ctx: Context) -> None:
    _wire_weighted_pair(ctx, "CReST", "init_crest_weight", "crest_momentum", crest_alpha=1 / 3)


def _iteration_crest(ctx: Context, ns: dict[str, Any], entry: dict[str, Any]) -> dict[str, float]:
    """CReST and SimiS: the class weights in use, and the four loss terms."""
    entry["class_weights"] = {"A": ns["weight_A"].detach().clone(), "B": ns["weight_B"].detach().clone()}
    losses = {key: ctx.logged[key][-1] for key in ("sup_A", "sup_B", "cps_A", "cps_B")}
    return {**losses, "sup": float(ns["loss_sup"]), "cps": float(ns["loss_cps"])}


# ---- SimiS (class weights from the gap to the most frequent predicted class)

def _wire_simis(ctx: Context) -> None:
    _wire_weighted_pair(ctx, "SimiS", "init_weight", "simis_momentum")


# ---- Basak (train_acisis.py: mean teacher, pseudo-labels sampled by class rates from fuzzy rank fusion)

def _build_mean_teacher(ctx: Context) -> None:
    model, optimizer = ctx.module.make_model_all()
    ema_model, _ = ctx.module.make_model_all(ema=True)
    model = ctx.module.kaiming_normal_init_weight(model)
    ema_model = ctx.module.kaiming_normal_init_weight(ema_model)
    ctx.networks.update(student=model, teacher=ema_model)
    ctx.optimizers.update(student=optimizer)  # the script calls train() on both


def _confidence_start(generator: torch.Generator, iterations: int) -> dict[str, torch.Tensor]:
    """A ConfidenceArray part-way through an epoch: the sums of ``iterations`` iterations (about the values a
    fresh network gives) and the class scores CC of earlier epochs, all float32-exact."""
    k = NUM_CLASSES
    draw = lambda: torch.rand(k, generator=generator, dtype=torch.float64)  # noqa: E731
    start = {"entropy": iterations * (-5.3 + 0.5 * (draw() - 0.5)),
             "confidence": iterations * (0.12 + 0.05 * draw()),
             "variance": iterations * (0.08 + 0.05 * draw()),
             "CC": 0.2 + 0.8 * draw()}
    return {key: value.to(torch.float32) for key, value in start.items()}


def _set_confidence_array(confs_arr: Any, start: dict[str, torch.Tensor], cur_iter: int) -> None:
    for key, value in start.items():
        setattr(confs_arr, key, value.double().clone())
    sam_rate = 1 - confs_arr.CC
    confs_arr.sam_rate = torch.pow(sam_rate / (sam_rate.max() + 1e-12), confs_arr.lambda_)
    confs_arr.cur_iter = cur_iter


def _wire_acisis(ctx: Context) -> None:
    module, args = ctx.module, ctx.args
    # cal_sampling_mask draws torch.rand through the script's module global
    module.torch = TorchWithLoggedNoise(ctx.draw_generator, [], ctx.rand_log)
    ctx.namespace.update(model=ctx.networks["student"], ema_model=ctx.networks["teacher"],
                         optimizer=ctx.optimizers["student"])
    ctx.log_loss("loss_func", "sup", module.make_loss_function(args.sup_loss))
    ctx.log_loss("cps_loss_func", "cps", module.WeightedCrossEntropyLoss())
    # The class rates are recomputed when an epoch's 8 iterations have been recorded (update_iter =
    # len(unlabeled_loader)). Start 7 iterations into an epoch, so that iteration 1 recomputes them.
    confs_arr = module.ConfidenceArray(num_cls=module.config.num_cls, momentum=0.99,
                                       update_iter=ITERATIONS_PER_EPOCH)
    start = _confidence_start(torch.Generator().manual_seed(SEED + 4), ITERATIONS_PER_EPOCH - 1)
    _set_confidence_array(confs_arr, start, ITERATIONS_PER_EPOCH - 1)
    ctx.namespace["confs_arr"] = confs_arr
    ctx.hparams.update(sup_loss=args.sup_loss, ema_decay=0.99, ema_alpha=min(1 - 1 / (EPOCH + 1), 0.99),
                       cc_momentum=0.99, update_iter=ITERATIONS_PER_EPOCH, top_m=confs_arr.top_m,
                       P_CCF=confs_arr.P_CCF, P_FR=confs_arr.P_FR, lambda_=confs_arr.lambda_, beta=confs_arr.beta)
    ctx.extra["confidence_start"] = {**start, "cur_iter": ITERATIONS_PER_EPOCH - 1}


def _confidence_state(confs_arr: Any) -> dict[str, Any]:
    return {"entropy": confs_arr.entropy.clone(), "confidence": confs_arr.confidence.clone(),
            "variance": confs_arr.variance.clone(), "CC": confs_arr.CC.clone(), "sam_rate": confs_arr.sam_rate.clone(),
            "cur_iter": confs_arr.cur_iter}


def _sampling_uniforms(ctx: Context, logits: torch.Tensor) -> torch.Tensor:
    """The uniforms that counted: cal_sampling_mask draws one field per class and uses, at each voxel, the
    field of the predicted class. Stored instead of all K fields (float16, exact)."""
    assert len(ctx.rand_log) == NUM_CLASSES
    predicted = logits.detach().argmax(1)
    uniform = torch.zeros(predicted.shape, dtype=torch.float16)
    for cls, field in enumerate(ctx.rand_log):
        uniform = torch.where(predicted == cls, field, uniform)
    ctx.rand_log.clear()
    return uniform


def _iteration_acisis(ctx: Context, ns: dict[str, Any], entry: dict[str, Any]) -> dict[str, float]:
    entry["sampling_uniform"] = _sampling_uniforms(ctx, ns["output_u"])
    entry["confidence_array"] = _confidence_state(ns["confs_arr"])
    entry["sample_map_sum"] = float(ns["sample_map"].sum())
    return {"sup": ctx.logged["sup"][-1], "cps": ctx.logged["cps"][-1]}


# ---- CLD (static inverse-frequency weights, pseudo-labels sampled by per-class confidence)

def _wire_cld(ctx: Context) -> None:
    module, args = ctx.module, ctx.args
    _wire_pair(ctx)
    labeled = _labeled_set(ctx.inputs)
    labeled.num_cls, labeled._weight = NUM_CLASSES, None
    weight, counts = module.Synapse_AMOS_cld.weight(labeled)  # the script's own method on the stand-in
    ctx.log_loss("loss_func", "sup", module.make_loss_function(args.sup_loss, weight=weight))
    assert args.cps_loss == "wce"
    ctx.log_loss("cps_loss_func", "cps", module.WeightedCrossEntropyLoss(weight=weight))
    # The banks update their class confidences every confs_iter = 8 recorded batches (tot_iter % 8 == 0),
    # by EMA 0.999 after the first time. At iteration 400 a run has just updated; start 7 batches into the
    # next period instead (tot_iter 407, synthetic sums of 7 batches), so that iteration 1 updates.
    generator = torch.Generator().manual_seed(SEED + 5)
    label_counts = torch.bincount(ctx.inputs["label_l"].reshape(-1), minlength=NUM_CLASSES).double()
    start = {}
    banks = {}
    for name in ("A", "B"):
        bank = module.ConfidenceBank(num_cls=NUM_CLASSES, momentum=0.999, update_iter=args.confs_iter)
        draw = lambda: torch.rand(NUM_CLASSES, generator=generator, dtype=torch.float64)  # noqa: E731
        confs = (0.1 + 0.8 * draw()).to(torch.float32)
        cnt = ((args.confs_iter - 1) * label_counts).to(torch.float32)
        conf_all = (cnt.double() * (0.05 + 0.3 * draw())).to(torch.float32)
        bank.confs, bank.confs_all, bank.confs_cnt = confs.double(), conf_all.double(), cnt.double()
        bank.tot_iter = EPOCH * ITERATIONS_PER_EPOCH + args.confs_iter - 1
        banks[name] = bank
        start[name] = {"confs": confs, "confs_all": conf_all, "confs_cnt": cnt, "tot_iter": bank.tot_iter}
    ctx.namespace.update(confs_A=banks["A"], confs_B=banks["B"])
    # cal_sampling_mask's torch.rand, through the script's module global (after the banks, whose constructor
    # draws its unused initial confidences from torch's global generator)
    module.torch = TorchWithLoggedNoise(ctx.draw_generator, [], ctx.rand_log)
    ctx.hparams.update(sup_loss=args.sup_loss, cps_loss=args.cps_loss, confs_iter=args.confs_iter,
                       confs_momentum=0.999, sampling_gamma=0.5)
    ctx.extra["cld_weight"] = torch.as_tensor(weight, dtype=torch.float64)
    ctx.extra["labeled_class_counts"] = torch.as_tensor(counts, dtype=torch.float64)
    ctx.extra["bank_start"] = start


def _iteration_cld(ctx: Context, ns: dict[str, Any], entry: dict[str, Any]) -> dict[str, float]:
    assert len(ctx.rand_log) == 2 * NUM_CLASSES  # A's map, then B's
    fields_a, fields_b = ctx.rand_log[:NUM_CLASSES], ctx.rand_log[NUM_CLASSES:]
    uniforms = {}
    for name, fields in (("A", fields_a), ("B", fields_b)):
        ctx.rand_log[:] = fields
        uniforms[name] = _sampling_uniforms(ctx, ns[f"output_{name}"])
    entry["sampling_uniform"] = uniforms
    entry["banks"] = {name: {"confs": ns[f"confs_{name}"].confs.clone(), "confs_all": ns[f"confs_{name}"].confs_all.clone(),
                             "confs_cnt": ns[f"confs_{name}"].confs_cnt.clone(), "tot_iter": ns[f"confs_{name}"].tot_iter}
                      for name in ("A", "B")}
    entry["sample_map_sum"] = {name: float(ns[f"sample_map_{name}"].sum()) for name in ("A", "B")}
    cps = ctx.logged["cps"]
    sup = ctx.logged["sup"]
    return {"sup_A": sup[-2], "sup_B": sup[-1], "cps_A": cps[-2], "cps_B": cps[-1],
            "sup": float(ns["loss_sup"]), "cps": float(ns["loss_cps"])}


# ---- URPC (one 3D U-Net with four deep-supervision outputs, uncertainty-rectified pyramid consistency)

def _build_urpc(ctx: Context) -> None:
    module = ctx.module
    base = module.unet_3D_ds
    module.unet_3D_ds = lambda **kw: base(feature_scale=URPC_FEATURE_SCALE, **kw)  # narrowed, see the README
    try:
        model, optimizer = module.make_model_all()
    finally:
        module.unet_3D_ds = base
    ctx.networks.update(model=model)
    ctx.optimizers.update(model=optimizer)


def _wire_urpc(ctx: Context) -> None:
    ctx.namespace.update(model=ctx.networks["model"], optimizer=ctx.optimizers["model"],
                         ce_loss=nn.CrossEntropyLoss(), dice_loss=ctx.module.SoftDiceLoss(smooth=1e-8),
                         kl_distance=nn.KLDivLoss(reduction="none"))
    ctx.hparams.update(feature_scale=URPC_FEATURE_SCALE, dropout_p=[0.5, 0.3, 0.2, 0.1])


def _iteration_urpc(ctx: Context, ns: dict[str, Any], entry: dict[str, Any]) -> dict[str, float]:
    keys = [f"loss_ce_aux{k}" for k in range(1, 5)] + [f"loss_dice_aux{k}" for k in range(1, 5)]
    keys += [f"consistency_loss_aux{k}" for k in range(1, 5)] + ["supervised_loss", "consistency_loss"]
    return {key: float(ns[key]) for key in keys}


# ---- SS-Net (train_ssnet.py: VAT smoothness and a class-wise contrastive feature memory)

def _build_ssnet(ctx: Context) -> None:
    model, optimizer = ctx.module.make_model_all()  # VNet4SSNet, PyTorch's default init (the script calls none)
    ctx.networks.update(model=model)
    ctx.optimizers.update(model=optimizer)


def _prepare_ssnet(ctx: Context) -> None:
    # The fresh network predicts three foreground classes correctly at more than 32 labeled voxels each,
    # so the memory update would only take its ranking branch. Lower one class's bias so that it has
    # fewer than 32 correct voxels and its memory rows are all taken, unranked.
    cls, bias = SSNET_HEAD_BIAS
    with torch.no_grad():
        ctx.networks["model"].out_conv.bias[cls] += bias


def _ssnet_memory_start(generator: torch.Generator) -> list[torch.Tensor | None]:
    """A feature memory as a run holds it part-way through training: SSNET_MEMORY_ROWS rows per class of
    projected features (N(0, 1), float32-exact, float64), None for a class that was never stored."""
    feat_dim = 2 * N_FILTERS  # VNet4SSNet's projection width
    return [torch.randn((SSNET_MEMORY_ROWS[c], feat_dim), generator=generator, dtype=torch.float64)
            .to(torch.float32).to(torch.float64) if c in SSNET_MEMORY_ROWS else None for c in range(NUM_CLASSES)]


def _wire_ssnet(ctx: Context) -> None:
    module = ctx.module
    # VAT3d draws its random direction with torch.rand through the script's module global
    module.torch = TorchWithLoggedNoise(ctx.draw_generator, [], ctx.rand_log)
    memory = module.FeatureMemory(elements_per_class=32, n_classes=NUM_CLASSES)
    # The script starts with an empty memory and refills a class whenever the labeled batch has correctly
    # predicted voxels of it; a run at epoch EPOCH holds earlier features of most classes. Start from such
    # a memory (the script keeps it as numpy arrays), so that stored features of classes the iterations do
    # not refill take part in the contrastive terms.
    start = _ssnet_memory_start(torch.Generator().manual_seed(SEED + 6))
    memory.memory = [None if m is None else m.numpy().copy() for m in start]
    adv_loss = module.VAT3d(epi=10.0)
    ctx.namespace.update(model=ctx.networks["model"], optimizer=ctx.optimizers["model"], prototype_memory=memory,
                         dice_loss=module.SoftDiceLoss(smooth=1e-8, do_bg=True), adv_loss=adv_loss)
    ctx.hparams.update(elements_per_class=memory.elements_per_class, vat_xi=adv_loss.xi, vat_epsilon=adv_loss.epi,
                       vat_iterations=adv_loss.ip, contrastive_weight=0.1, dice_smooth=1e-8,
                       head_bias_class=SSNET_HEAD_BIAS[0], head_bias=SSNET_HEAD_BIAS[1])
    ctx.extra["memory_start"] = start


def _iteration_ssnet(ctx: Context, ns: dict[str, Any], entry: dict[str, Any]) -> dict[str, float]:
    assert len(ctx.rand_log) == 1
    entry["vat_uniform"] = ctx.rand_log.pop()
    entry["memory"] = [None if m is None else torch.as_tensor(m).clone() for m in ns["prototype_memory"].memory]
    entry["correct_voxels"] = torch.bincount(ns["labels_correct"].reshape(-1), minlength=NUM_CLASSES)
    entry["pseudo_label_count"] = torch.bincount(ns["pseudo_label"].reshape(-1), minlength=NUM_CLASSES)
    return {key: float(ns[key]) for key in ("loss_seg", "loss_seg_dice", "loss_lds", "loss_contr_labeled",
                                            "loss_contr_unlabeled")}


METHOD_TABLE: dict[str, Method] = {
    "cps": Method(build=_build_pair("xavier_normal"), wire=_wire_cps, iteration=_iteration_cps),
    "uamt": Method(build=_build_uamt, prepare=_prepare_uamt, wire=_wire_uamt, iteration=_iteration_uamt,
                   per_iteration=("uncertainty_mask_count",)),
    "dhc": Method(build=_build_pair("kaiming_normal"), wire=_wire_dhc, iteration=_iteration_dhc,
                  per_iteration=("weight_A", "weight_B", "dhc_state")),
    "dst": Method(build=_build_pair("xavier_normal"), prepare=_prepare_dst, wire=_wire_dst, iteration=_iteration_dst,
                  per_iteration=("pseudo_mask_count", "grl_iter")),
    "depl": Method(build=_build_pair("xavier_normal"), prepare=_prepare_depl, wire=_wire_depl,
                   iteration=_iteration_depl, per_iteration=("pseudo_mask_count", "qhat")),
    "adsh": Method(build=_build_pair("xavier_normal"), wire=_wire_adsh, iteration=_iteration_adsh,
                   per_iteration=("adsh",)),
    "crest": Method(build=_build_pair("xavier_normal"), wire=_wire_crest, iteration=_iteration_crest,
                    per_iteration=("class_weights",)),
    "simis": Method(build=_build_pair("xavier_normal"), wire=_wire_simis, iteration=_iteration_crest,
                    per_iteration=("class_weights",)),
    "acisis": Method(build=_build_mean_teacher, wire=_wire_acisis, iteration=_iteration_acisis,
                     per_iteration=("sampling_uniform", "confidence_array", "sample_map_sum")),
    "cld": Method(build=_build_pair("xavier_normal"), wire=_wire_cld, iteration=_iteration_cld,
                  per_iteration=("sampling_uniform", "banks", "sample_map_sum")),
    "urpc": Method(build=_build_urpc, wire=_wire_urpc, iteration=_iteration_urpc),
    "ssnet": Method(build=_build_ssnet, prepare=_prepare_ssnet, wire=_wire_ssnet, iteration=_iteration_ssnet,
                    per_iteration=("vat_uniform", "memory", "correct_voxels", "pseudo_label_count")),
}


# --------------------------------------------------------------------------------------------------
# Recording one method
# --------------------------------------------------------------------------------------------------

def _log_dropouts(net: nn.Module, generator: torch.Generator, log: list[torch.Tensor]) -> None:
    """Replace every ``Dropout3d`` module of ``net`` by a :class:`LoggedDropout3d` of the same p writing to
    ``log`` (one log per network, in call order). A module used in several places is replaced once."""
    found = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Dropout3d)]
    assert found and getattr(net, "has_dropout", True), "no active Dropout3d"
    for name, old in found:
        assert 0 < old.p < 1, name
        parent_name, _, attr = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, attr, LoggedDropout3d(old.p, generator, log))


def record(source: Path, method: str) -> dict[str, Any]:
    code_dir = source / "code"
    spec = METHOD_TABLE[method]
    with float64_cpu():
        module = load_script(code_dir, method)
        loop = training_loop(code_dir / f"train_{method}.py")
        args = module.args
        torch.manual_seed(SEED)  # the scripts' init functions draw from the global generator
        data_generator = torch.Generator().manual_seed(SEED)
        draw_generator = torch.Generator().manual_seed(SEED + 1)
        ctx = Context(module=module, args=args, inputs=make_inputs(data_generator), draw_generator=draw_generator)
        inputs = ctx.inputs

        # ---- networks, optimisers: the script's own set-up lines, in its order
        spec.build(ctx)
        networks, optimizers = ctx.networks, ctx.optimizers

        dropout_log: dict[str, list[torch.Tensor]] = {name: [] for name in networks}
        for name, net in networks.items():
            _log_dropouts(net, draw_generator, dropout_log[name])
        noise_log: list[torch.Tensor] = []

        lr = module.poly_lr(EPOCH - 1, args.max_epoch, args.base_lr, 0.9)
        for optimizer in optimizers.values():
            optimizer.param_groups[0]["lr"] = lr
        cps_w = module.get_current_consistency_weight(EPOCH - 1)

        spec.prepare(ctx)
        with torch.no_grad():  # float32-exact initial weights: state0 is stored as float32 without loss
            for net in networks.values():
                for tensor in net.state_dict().values():
                    if tensor.is_floating_point():
                        tensor.copy_(tensor.to(torch.float32))
        state0 = {name: _state(net) for name, net in networks.items()}
        for name, net in networks.items():
            if name not in ctx.untrained:
                net.train()  # the scripts call train() on the networks they train

        namespace = ctx.namespace
        namespace.update(vars(module))
        namespace.update(tqdm=lambda x: x, autocast=contextlib.nullcontext, amp_grad_scaler=PassThroughScaler(),
                         epoch_num=EPOCH, cps_w=cps_w, loss_list=[], loss_sup_list=[], loss_cps_list=[],
                         torch=TorchWithLoggedNoise(draw_generator, noise_log))
        ctx.hparams.update({
            "base_lr": float(args.base_lr), "lr": float(lr), "momentum": 0.9, "weight_decay": 3e-5, "nesterov": True,
            "max_epoch": int(args.max_epoch), "epoch": EPOCH, "cps_w_max": float(args.cps_w),
            "cps_rampup": bool(args.cps_rampup), "cps_w": float(cps_w), "batch_labeled": BATCH,
            "batch_unlabeled": BATCH, "patch": list(PATCH), "num_classes": NUM_CLASSES,
        })
        spec.wire(ctx)
        hparams, extra = ctx.hparams, ctx.extra

        # ---- the two batches, and a snapshot between the iterations
        batches_l = [{"image": inputs["image_l"], "label": inputs["label_l"]}] * 2
        batches_u = [{"image": inputs["image_u"], "label": torch.zeros_like(inputs["label_l"])}] * 2
        iterations: list[dict[str, Any]] = []

        def snapshot() -> None:
            entry: dict[str, Any] = {"state": {name: _state(net) for name, net in networks.items()},
                                     "dropout": {name: [m.clone() for m in log] for name, log in dropout_log.items()},
                                     "noise": list(noise_log)}
            for log in dropout_log.values():
                log.clear()
            noise_log.clear()
            losses: dict[str, float] = {"total": float(namespace["loss"])}
            losses.update(spec.iteration(ctx, namespace, entry))
            entry["losses"] = losses
            iterations.append(entry)

        def labeled_loader() -> Iterator[dict]:
            for i, batch in enumerate(batches_l):
                if i:
                    snapshot()  # iteration i's body has finished (zip asks the labeled loader first)
                yield batch

        namespace.update(labeled_loader=labeled_loader(), unlabeled_loader=iter(batches_u))
        exec(loop, namespace)
        snapshot()
        assert len(iterations) == 2 and len(namespace["loss_list"]) == 2

    model_args = {"n_channels": 1, "n_classes": NUM_CLASSES, "n_filters": N_FILTERS, "normalization": "batchnorm",
                  "has_dropout": True}
    for it in iterations:  # with one base filter, Dropout3d on x9 drops the whole feature map of a sample
        for name, masks in it["dropout"].items():
            for mask in masks:
                assert mask.shape[1] > 1 or mask.any(), f"{method}: a forward of {name} dropped x9 for every sample"
    return {
        "format": FORMAT, "method": method, "dhc_script": f"code/train_{method}.py",
        "dhc_commit": _git_commit(source), "argv": list(ARGV), "torch_version": str(torch.__version__),
        "model_args": model_args, "hparams": hparams, "seed": SEED,
        "inputs": {"image_l": inputs["image_l"].to(torch.float32), "image_u": inputs["image_u"].to(torch.float32),
                   "label_l": inputs["label_l"].to(torch.uint8)},
        "state0": {name: {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in sd.items()}
                   for name, sd in state0.items()},
        "draws": [{"dropout": it["dropout"], "noise": it["noise"]} for it in iterations],
        "losses": [it["losses"] for it in iterations],
        "state1": iterations[0]["state"], "state2": iterations[1]["state"],
        **{key: [it[key] for it in iterations] for key in spec.per_iteration},
        **extra,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dhc_source", type=Path, help="DHC checkout (the folder holding code/)")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--methods", default=",".join(METHOD_TABLE))
    options = parser.parse_args(argv)
    options.out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for method in options.methods.split(","):
        fixture = record(options.dhc_source, method)
        if fixture["dhc_commit"] == "unknown" and (options.dhc_source / "COMMIT").is_file():
            fixture["dhc_commit"] = (options.dhc_source / "COMMIT").read_text().strip()
        path = options.out_dir / f"{method}.pt"
        torch.save(fixture, path)
        torch.load(path, weights_only=True)  # stays loadable without pickled code
        print(f"{path}: {path.stat().st_size / 1e6:.2f} MB; losses {fixture['losses']}")


if __name__ == "__main__":
    main()
