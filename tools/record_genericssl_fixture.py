"""Record the replay fixture of GenericSSL (xmed-lab/GenericSSL, ``code/train_diffusion.py``).

    PYTHONPATH=DEPS python tools/record_genericssl_fixture.py GENERICSSL_SOURCE OUT_DIR

GENERICSSL_SOURCE is a checkout (or ``git archive`` with a COMMIT file) of https://github.com/xmed-lab/GenericSSL,
the folder that holds ``code/``. DEPS holds what its augmentation imports and skcdf does not install:
``pip install --target DEPS --no-deps batchgenerators==0.21 future threadpoolctl`` (0.21 is the version its
requirements.txt pins). Writes OUT_DIR/genericssl.pt.

As tools/record_dhc_fixtures.py does for DHC's scripts (whose helpers this reuses), this imports
``train_diffusion.py`` with its README's command line (``--base_lr 1e-2 -w 10 -ep 300``), builds the network
and optimiser with its ``make_model_all``, its ``Difficulty`` and loss functions, and runs the script's own inner
loop ``for batch_l, batch_u in tqdm(zip(labeled_loader, unlabeled_loader)): ...`` (taken from the script with
``ast``) over two iterations. The two batches of each iteration are made by the script's own strong
augmentation (``get_StrongAug(patch, 3, 0.7)``, as its loaders apply it) from stored raw volumes.

Changes, all listed in tests/fixtures/genericssl/README.md: float64 on CPU, no autocast (DHC's recorder's);
``N_FILTERS`` base filters, ``NUM_CLASSES`` classes, a ``PATCH`` patch and a time embedding narrowed from
128 → 512 to ``TIME_DIM`` → 4·``TIME_DIM`` (the two literal widths of ``diff_vnet.py`` are replaced when it
is loaded), so that the fixture stays small; ``GaussianSmoothing``'s float32 kernel widened to float64.
Every random draw is made here or by the code's own generators and logged: the Dropout3d masks (DHC's
``LoggedDropout3d``, logged per p), the diffusion times (the code's ``UniformSampler``, logged), the diffusion
noise and DDIM's starting noise (drawn in float32 and rounded to float16, so that storing them is exact), the
exponential draws of ``F.gumbel_softmax`` (float16-exact, fed to torch's own function), and every ``random`` /
``np.random`` call of the augmentation (logged with its bounds and value, as the script's own generators made
them). DDIM's per-step noise is drawn but not stored: with η = 0 it is multiplied by σ = 0.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import random
import sys
import types
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_dhc_fixtures import (LoggedDropout3d, PassThroughScaler, _git_commit, _stub_missing_imports,  # noqa: E402
                                 float64_cpu, training_loop)

FORMAT = "skcdf-genericssl-fixture-1"
N_FILTERS = 1
NUM_CLASSES = 5
PATCH = (16, 16, 16)
RAW = (19, 19, 19)  # the raw volumes the augmentation's random crop cuts PATCH from
TIME_DIM = 8  # the code: 128
BATCH = 2  # Synapse's batch size (config.py)
EPOCH = 50
SEED = 23
#: README: bash train.sh -c 0 -e diffusion -t synapse_0.2 -i '' -l 1e-2 -w 10 -n 300 -d true, which runs
ARGV = ["--task", "synapse_0.2", "--exp", "fixture", "--seed", "0", "-g", "0", "--base_lr", "0.01", "-w", "10",
        "-ep", "300", "-sl", "labeled_0.2", "-su", "unlabeled_0.2", "-se", "eval_0.2"]
_WIDTHS = (("self.embed_dim_in = 128", f"self.embed_dim_in = {TIME_DIM}"),
           ("torch.nn.Linear(512, n_filters_out)", f"torch.nn.Linear({4 * TIME_DIM}, n_filters_out)"))


def _float16_exact(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16)


class DiffusionTorch:
    """Stands for ``torch`` in ``diff_vnet.py`` and ``th`` in ``gaussian_diffusion.py``: ``randn_like`` (the
    diffusion noise) and ``randn`` (DDIM's start) are drawn from ``generator`` in float32, rounded to float16
    and logged to ``log[name]``; ``randn_like`` of the DDIM steps (``ddim_steps``: σ = 0) is drawn, not logged."""

    def __init__(self, generator: torch.Generator, log: list[torch.Tensor], ddim_steps: bool = False) -> None:
        self._generator, self._log, self._ddim_steps = generator, log, ddim_steps

    def _draw(self, shape: tuple[int, ...], keep: bool) -> torch.Tensor:
        noise = _float16_exact(torch.randn(shape, generator=self._generator, dtype=torch.float32))
        if keep:
            self._log.append(noise.clone())
        return noise.to(torch.get_default_dtype())

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self._draw(tuple(x.shape), keep=not self._ddim_steps)

    def randn(self, *shape: int, device: Any = None) -> torch.Tensor:
        return self._draw(tuple(shape), keep=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class GumbelF:
    """Stands for ``F`` in the loop: ``gumbel_softmax`` is torch's own, fed exponential draws from ``generator``
    (float32 rounded to float16, at least 2⁻¹⁴) that are logged; every other name is torch.nn.functional's."""

    def __init__(self, generator: torch.Generator, log: list[torch.Tensor]) -> None:
        self._generator, self._log = generator, log

    def gumbel_softmax(self, logits: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        draw = torch.empty(logits.shape, dtype=torch.float32).exponential_(generator=self._generator)
        draw = _float16_exact(draw).clamp_min(2.0 ** -14)
        self._log.append(draw.clone())
        exponential = torch.Tensor.exponential_
        torch.Tensor.exponential_ = lambda self, *a, **k: self.copy_(draw)
        try:
            return F.gumbel_softmax(logits, *args, **kwargs)
        finally:
            torch.Tensor.exponential_ = exponential

    def __getattr__(self, name: str) -> Any:
        return getattr(F, name)


class LoggedSampler:
    """The model's ``UniformSampler`` (it draws with ``np.random.choice``), its times logged."""

    def __init__(self, sampler: Any, log: list[torch.Tensor]) -> None:
        self.sampler, self.log = sampler, log

    def sample(self, batch_size: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        t, weight = self.sampler.sample(batch_size, device)
        self.log.append(t.clone())
        return t, weight


@contextlib.contextmanager
def logged_augmentation_draws(log: list[tuple], crops: list[int]) -> Iterator[None]:
    """Log every ``random`` / ``np.random`` call the augmentation makes (values from the seeded generators):
    ("uniform", low, high, value) or ("sample", n, k, indices); the random crop's ``randint`` to ``crops``."""
    saved = (random.random, random.uniform, random.sample, np.random.uniform, np.random.random, np.random.randint)

    def uniform(draw: Callable[..., float], low: float = 0.0, high: float = 1.0) -> Callable[..., float]:
        def logged(*args: Any) -> float:
            value = draw(*args)  # every call of the augmentation passes its bounds by position
            bounds = (args + (low, high)[len(args):]) if args else (low, high)
            log.append(("uniform", float(bounds[0]), float(bounds[1]), float(value)))
            return value
        return logged

    def sample(population: list, k: int) -> list:
        chosen = saved[2](population, k=k)
        log.append(("sample", len(population), k, [population.index(c) for c in chosen]))
        return chosen

    def randint(low: int, high: int) -> int:
        value = saved[5](low, high)
        crops.append(int(value))
        return value

    random.random, random.uniform, random.sample = uniform(saved[0]), uniform(saved[1]), sample
    np.random.uniform, np.random.random, np.random.randint = uniform(saved[3]), uniform(saved[4]), randint
    try:
        yield
    finally:
        random.random, random.uniform, random.sample, np.random.uniform, np.random.random, np.random.randint = saved


# --------------------------------------------------------------------------------------------------
# Loading the script
# --------------------------------------------------------------------------------------------------

def _stub_unused_imports() -> None:
    """utils/__init__.py imports cv2 and h5py, StrongAug.py albumentations and cv2 (transforms get_StrongAug
    does not use), batchgenerators 0.21 skimage (for resizing, not used here)."""
    _stub_missing_imports()
    for name in ("cv2", "h5py", "albumentations", "skimage"):
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            sys.modules[name] = types.ModuleType(name)
            if name == "skimage":
                sys.modules["skimage.transform"] = sys.modules[name].transform = types.ModuleType("skimage.transform")
                sys.modules["skimage.transform"].resize = None


def _load_narrowed_diff_vnet(code_dir: Path) -> types.ModuleType:
    """``DiffVNet.diff_vnet`` with the time embedding's two literal widths replaced (``_WIDTHS``)."""
    import DiffVNet  # noqa: F401  (the package, for the relative imports)

    path = code_dir / "DiffVNet" / "diff_vnet.py"
    source = path.read_text()
    for old, new in _WIDTHS:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    module = types.ModuleType("DiffVNet.diff_vnet")
    module.__file__, module.__package__ = str(path), "DiffVNet"
    sys.modules["DiffVNet.diff_vnet"] = module
    exec(compile(source, str(path), "exec"), vars(module))
    return module


def load_script(code_dir: Path) -> types.ModuleType:
    """Import ``train_diffusion.py`` (module-level code: argparse with ``ARGV``, imports, defs), narrowed."""
    assert importlib.metadata.version("batchgenerators") == "0.21", "batchgenerators 0.21 (see the docstring)"
    _stub_unused_imports()
    sys.path.insert(0, str(code_dir))
    _load_narrowed_diff_vnet(code_dir)
    path = code_dir / "train_diffusion.py"
    saved_argv = sys.argv
    sys.argv = [str(path), *ARGV]
    try:
        spec = importlib.util.spec_from_file_location("genericssl_train_diffusion", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.argv = saved_argv
    module.config.n_filters, module.config.num_cls, module.config.patch_size = N_FILTERS, NUM_CLASSES, PATCH
    return module


# --------------------------------------------------------------------------------------------------
# Inputs and their augmentation
# --------------------------------------------------------------------------------------------------

def make_raw(generator: torch.Generator) -> dict[str, np.ndarray]:
    """Two labeled and two unlabeled volumes (RAW) in [0, 1], float32 (as the dataset hands them to the
    transform); labels int8 in [0, NUM_CLASSES) with every class present, of very different sizes."""
    small = tuple(n // 4 for n in RAW)
    coarse = torch.rand((2 * BATCH, 1, *small), generator=generator, dtype=torch.float64)
    image = F.interpolate(coarse, size=RAW, mode="trilinear", align_corners=False)
    image = (image + 0.05 * torch.rand(image.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    logits = torch.randn((BATCH, NUM_CLASSES, *small), generator=generator, dtype=torch.float64)
    bias = torch.tensor([1.5, 0.6, 0.3, 0.0, -0.6], dtype=torch.float64).view(1, -1, 1, 1, 1)
    label = (F.interpolate(logits, size=RAW, mode="trilinear", align_corners=False) + bias).argmax(1)
    assert (torch.bincount(label.reshape(-1), minlength=NUM_CLASSES) > 0).all()
    image = image[:, 0].numpy().astype(np.float32)
    return {"image_l": image[:BATCH], "image_u": image[BATCH:], "label_l": label.numpy().astype(np.int8)}


def augmented_batches(module: types.ModuleType, raw: dict[str, np.ndarray]) -> tuple[dict, dict, dict]:
    """One iteration's batches through the script's ``get_StrongAug(patch, 3, 0.7)`` (one transform per loader,
    as the script makes them; labeled samples first), and what each sample drew."""
    transforms = {kind: module.get_StrongAug(module.config.patch_size, 3, 0.7) for kind in ("l", "u")}
    batches: dict[str, list] = {"image_l": [], "label_l": [], "image_u": []}
    record: dict[str, list] = {"crop": [], "draws": []}
    for kind, i in [("l", i) for i in range(BATCH)] + [("u", i) for i in range(BATCH)]:
        label = raw["label_l"][i] if kind == "l" else np.zeros(RAW, np.int8)  # the dataset zeroes unlabeled labels
        log: list[tuple] = []
        crop: list[int] = []
        with logged_augmentation_draws(log, crop):
            sample = transforms[kind]({"image": raw[f"image_{kind}"][i].copy(), "label": label.copy()})
        record["crop"].append(crop)
        record["draws"].append(log)
        batches[f"image_{kind}"].append(sample["image"])
        if kind == "l":
            batches["label_l"].append(sample["label"])
    images = {key: torch.stack(value) for key, value in batches.items()}  # (2, 1, *PATCH), labels (2, *PATCH)
    assert images["image_l"].dtype == torch.float32
    stored = {"image_l": images["image_l"], "image_u": images["image_u"], "label_l": images["label_l"].to(torch.uint8)}
    loop_l = {"image": images["image_l"].double(), "label": images["label_l"].double()}
    return stored, record, {"l": loop_l, "u": {"image": images["image_u"].double()}}


# --------------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------------

def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _difficulty(diff: Any) -> dict[str, torch.Tensor]:
    return {key: getattr(diff, key).detach().clone() for key in ("last_dice", "cls_learn", "cls_unlearn", "dice_weight")}


def _log_dropouts(model: nn.Module, generator: torch.Generator, logs: dict[str, list[torch.Tensor]]) -> None:
    """Every Dropout3d of ``model`` by a LoggedDropout3d of the same p, writing to ``logs[str(p)]`` in call order."""
    for name, old in [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Dropout3d)]:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr,
                LoggedDropout3d(old.p, generator, logs.setdefault(str(old.p), [])))


def record(source: Path) -> dict[str, Any]:
    code_dir = source / "code"
    module = load_script(code_dir)
    loop = training_loop(code_dir / "train_diffusion.py")
    args = module.args
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)  # the network's initialisation draws from the global generator
    raw = make_raw(torch.Generator().manual_seed(SEED))
    augmented = [augmented_batches(module, raw) for _ in range(2)]  # the loaders' work, before the loop
    generator = torch.Generator().manual_seed(SEED + 1)
    logs: dict[str, Any] = {"dropout": {}, "timesteps": [], "normal": [], "ddim": [], "gumbel": []}
    with float64_cpu():
        model, optimizer = module.make_model_all()
        _log_dropouts(model, generator, logs["dropout"])
        model.sampler = LoggedSampler(model.sampler, logs["timesteps"])
        diffusion_module = sys.modules[type(model.sample_diffusion).__mro__[1].__module__]
        saved_globals = (vars(sys.modules["DiffVNet.diff_vnet"])["torch"], diffusion_module.th)
        sys.modules["DiffVNet.diff_vnet"].torch = DiffusionTorch(generator, logs["normal"])
        diffusion_module.th = DiffusionTorch(generator, logs["ddim"], ddim_steps=True)
        lr = module.poly_lr(EPOCH - 1, args.max_epoch, args.base_lr, 0.9)
        optimizer.param_groups[0]["lr"] = lr
        mu = module.get_current_mu(EPOCH - 1)
        with torch.no_grad():  # float32-exact initial weights: state0 is stored as float32 without loss
            for tensor in model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(tensor.to(torch.float32))
        state0 = _state(model)
        model.train()
        diff = module.Difficulty(module.config.num_cls, accumulate_iters=50)
        namespace = dict(vars(module))
        namespace.update(model=model, optimizer=optimizer, diff=diff, mu=mu, tqdm=lambda x: x,
                         autocast=contextlib.nullcontext, amp_grad_scaler=PassThroughScaler(),
                         deno_loss=module.make_loss_function(args.sup_loss),
                         sup_loss=module.make_loss_function(args.sup_loss),
                         unsup_loss=module.make_loss_function(args.unsup_loss),
                         GaussianSmoothing=lambda *a: module.GaussianSmoothing(*a).double(),
                         F=GumbelF(generator, logs["gumbel"]),
                         loss_list=[], loss_sup_list=[], loss_diff_list=[], loss_unsup_list=[])
        iterations: list[dict[str, Any]] = []

        def snapshot() -> None:
            ns = namespace
            iterations.append({
                "state": _state(model), "difficulty": _difficulty(ns["diff"]),
                "weights": ns["weight_diff"].detach().clone(), "pseudo_label": ns["pseudo_label"][:, 0].to(torch.uint8),
                "losses": {"deno": float(ns["L_deno"]), "diff": float(ns["L_diff"]), "unsup": float(ns["L_u"]),
                           "total": float(ns["loss"])},
                "draws": {key: ({p: list(v) for p, v in value.items()} if key == "dropout" else list(value))
                          for key, value in logs.items()},
            })
            for value in logs.values():
                for log in (value.values() if isinstance(value, dict) else [value]):
                    log.clear()

        def labeled_loader() -> Iterator[dict]:
            for i, (_, _, batches) in enumerate(augmented):
                if i:
                    snapshot()  # iteration i's body has finished (zip asks the labeled loader first)
                yield batches["l"]

        namespace.update(labeled_loader=labeled_loader(), unlabeled_loader=iter([a[2]["u"] for a in augmented]))
        try:
            exec(loop, namespace)
            snapshot()
        finally:
            sys.modules["DiffVNet.diff_vnet"].torch, diffusion_module.th = saved_globals
    assert len(iterations) == 2 and len(namespace["loss_list"]) == 2
    assert all(len(it["draws"]["ddim"]) == 1 and len(it["draws"]["normal"]) == 1 for it in iterations)
    commit = _git_commit(source)
    if commit == "unknown" and (source / "COMMIT").is_file():
        commit = (source / "COMMIT").read_text().strip()
    return {
        "format": FORMAT, "script": "code/train_diffusion.py", "commit": commit, "argv": list(ARGV),
        "torch_version": str(torch.__version__), "numpy_version": np.__version__,
        "model_args": {"n_channels": 1, "n_classes": NUM_CLASSES, "n_filters": N_FILTERS, "time_dim": TIME_DIM,
                       "has_dropout": True},
        "hparams": {"base_lr": float(args.base_lr), "lr": float(lr), "momentum": 0.9, "weight_decay": 3e-5,
                    "nesterov": True, "max_epoch": int(args.max_epoch), "epoch": EPOCH, "mu_max": float(args.mu),
                    "mu_rampup": bool(args.mu_rampup), "mu": float(mu), "ema_w": float(args.ema_w),
                    "accumulate_iters": 50, "patch": list(PATCH), "batch": BATCH, "seed": SEED},
        "raw": {"image_l": torch.from_numpy(raw["image_l"]), "image_u": torch.from_numpy(raw["image_u"]),
                "label_l": torch.from_numpy(raw["label_l"].astype(np.uint8))},
        "augmentation": [{**a[1], **a[0]} for a in augmented],
        "state0": {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state0.items()},
        **{key: [it[key] for it in iterations] for key in ("draws", "losses", "weights", "difficulty", "pseudo_label")},
        "state1": iterations[0]["state"], "state2": iterations[1]["state"],
    }


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="GenericSSL checkout (the folder holding code/)")
    parser.add_argument("out_dir", type=Path)
    options = parser.parse_args(argv)
    options.out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    fixture = record(options.source.resolve())
    path = options.out_dir / "genericssl.pt"
    torch.save(fixture, path)
    torch.load(path, weights_only=True)  # stays loadable without pickled code
    print(f"{path}: {path.stat().st_size / 1e6:.2f} MB; losses {fixture['losses']}")


if __name__ == "__main__":
    main()
