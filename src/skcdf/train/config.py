"""Training configuration: one typed table of keys, YAML presets shipped in ``skcdf/configs``, ``--set``.

:class:`Config` is the table: one field per key, with its type, default, check (allowed values) and
one line of doc in the field's metadata. On disk a configuration stays a flat mapping of keys (timm
style). ``load_config`` merges, in order: the defaults (the paper's Synapse 20 % setting), a preset
or YAML file, and ``--set`` overrides; then ``resolve_config`` fills the method's defaults for the
switches left at ``null`` (:mod:`skcdf.methods`) and checks every value, so that a bad configuration
fails before any work. docs/configuration.md explains each key; tests/train/test_config.py checks
that its table lists the same keys, in the same order, with the same defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from skcdf import methods
from skcdf.data.intensity import NORMALIZATIONS
from skcdf.data.laterality import FLIP_MODES
from skcdf.data.sampling import SAMPLING_MODES
from skcdf.train.knowledge_transfer import parse_ema_order
from skcdf.train.losses import BALANCE_MODES
from skcdf.train.monitor import VAL_REGIONS
from skcdf.utils import InputError

#: The test-time rules `inference_decoder` may name: skcdf.infer.DECODERS (not imported: it pulls in SimpleITK).
INFERENCE_DECODERS = ("unlabeled", "labeled", "mean")

#: A key's check: (value, key) -> the value in its canonical type; raises _Invalid(rule) when it is not allowed.
Check = Callable[[Any, str], Any]


class _Invalid(ValueError):
    """A value breaks its key's rule; ``resolve_config`` names the source, the key and the value."""


def _key(default: Any, doc: str, check: Check, *, runtime: bool = False) -> Any:
    """A row of the table: a dataclass field whose metadata holds its doc line and check.

    runtime: the key may change when a run is resumed (it does not change what is computed).
    """
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default),
                                 metadata={"doc": doc, "check": check, "runtime": runtime})
    return dataclasses.field(default=default, metadata={"doc": doc, "check": check, "runtime": runtime})


# ----------------------------------------------------------------------------- checks

def _boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("must be true or false")
    return value


def _auto_boolean(value: Any, key: str) -> bool | str:
    if not (isinstance(value, bool) or value == "auto"):
        raise _Invalid("must be true, false or auto")
    return value


def _integer(minimum: int | None = None, optional: bool = False) -> Check:
    def check(value: Any, key: str) -> int | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid("must be an integer")
        if minimum is not None and value < minimum:
            raise _Invalid(f"must be >= {minimum}")
        return value
    return check


def _as_number(value: Any) -> float:
    """A finite float; YAML 1.1 reads "1e-5" (no dot) as a string, which counts."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Invalid("must be a finite number")
    return float(value)


def _number(rule: str = "be >= 0", allowed: Callable[[float], bool] = lambda x: x >= 0) -> Check:
    def check(value: Any, key: str) -> float:
        number = _as_number(value)
        if not allowed(number):
            raise _Invalid(f"must {rule}")
        return number
    return check


def _one_of(choices: tuple[str, ...]) -> Check:
    def check(value: Any, key: str) -> str:
        if value not in choices:
            raise _Invalid(f"must be one of {', '.join(choices)}")
        return value
    return check


def _ema_order(value: Any, key: str) -> str:
    try:
        steps = parse_ema_order(str(value))
    except ValueError as exc:
        raise _Invalid(str(exc)) from None
    return ",".join(steps) if steps else "none"


def _optional_rampup(value: Any, key: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise _Invalid("must be null or an integer >= 0")
    return value


def _threshold(value: Any, key: str) -> float | None:
    if value is None:
        return None
    threshold = _as_number(value)
    if not 0.0 < threshold < 1.0:
        raise _Invalid("must be null or lie in (0, 1)")
    return threshold


def _class_frequency(value: Any, key: str) -> str | list[float]:
    if not (value in ("labeled", "train") or (isinstance(value, list) and all(
            isinstance(n, (int, float)) and not isinstance(n, bool) and n >= 0 for n in value))):
        raise _Invalid("must be 'labeled', 'train' or a list of K voxel counts >= 0")
    return value


def _patch_size(value: Any, key: str) -> list[int]:
    if not (isinstance(value, list) and len(value) == 3
            and all(isinstance(s, int) and not isinstance(s, bool) for s in value)):
        raise _Invalid("must be a list of three integers [D, H, W]")
    return value


def _split(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid("must be a split name (file splits/<name>.txt)")
    return value


def _device(value: Any, key: str) -> str:
    if not isinstance(value, str) or not (value in ("auto", "cpu", "cuda", "mps") or value.startswith("cuda:")):
        raise _Invalid("must be auto, cpu, cuda, cuda:N or mps")
    return value


# ----------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Config:
    """A resolved, checked training configuration (one field per key; docs/configuration.md)."""

    # method
    variant: str = _key(methods.MAIN, "the method, from skcdf.methods", _one_of(tuple(methods.METHODS)))
    skcm: bool = _key(None, "semantic knowledge complementarity module (null: from the method)", _boolean)
    aux_heads: bool = _key(None, "auxiliary balanced heads and losses (null: from the method)", _boolean)
    shared_decoder: bool = _key(None, "one decoder for both flows (null: from the method)", _boolean)
    ema_order: str = _key(None, "knowledge-transfer steps, e.g. Hl,D,Hu (null: from the method)", _ema_order)
    ema_decay: float = _key(0.99, "EMA weight of the destination", _number("lie in [0, 1]", lambda x: 0 <= x <= 1))
    lambda_u: float = _key(10.0, "final weight of SKCDF's unsupervised loss", _number())
    method_weight: float = _key(0.1, "final weight of a Table 1 method's unsupervised loss (DHC's -w)", _number())
    rampup_epochs: int | None = _key(None, "ramp-up length T (null: epochs)", _optional_rampup)
    pseudo_label_threshold: float | None = _key(None, "confidence a pseudo-label needs (null: none)", _threshold)
    balance_mode: str = _key("reference", "how the balanced mask applies", _one_of(BALANCE_MODES))
    class_frequency: str | list[float] = _key("labeled", "source of the class voxel counts n_c", _class_frequency)
    inference_decoder: str = _key("unlabeled", "decoder of validation and prediction: unlabeled, labeled or mean",
                                  _one_of(INFERENCE_DECODERS))
    inference_tta: bool = _key(False, "flip TTA in prediction by default (validation runs without)", _boolean)
    # network
    patch_size: list[int] = _key([64, 128, 128], "training patch [D, H, W]", _patch_size)
    filters: int = _key(32, "base filters of the VNet", _integer(1))
    num_heads: int = _key(2, "attention heads of the SKCM", _integer(1))
    dropout: bool = _key(True, "dropout in training", _boolean)
    # data
    flips: str = _key("reference", "flips of training patches (--tta follows it)", _one_of(FLIP_MODES))
    labeled_split: str = _key("labeled_20p", "split of the labeled cases", _split)
    unlabeled_split: str = _key("unlabeled_20p", "split of the unlabeled cases", _split)
    train_split: str = _key("train", "split of every training case", _split)
    val_split: str = _key("eval", "split of the validation cases", _split)
    val_region: str = _key("crop", "what validation scores: each case's centre patch (crop, the reference's) or "
                                   "the whole case by a sliding window (whole)", _one_of(VAL_REGIONS))
    labeled_cases: int | None = _key(None, "first N labeled cases only (null: all)", _integer(1, optional=True))
    batch_labeled: int = _key(2, "labeled volumes per step and process", _integer(1))
    batch_unlabeled: int = _key(2, "unlabeled volumes per step and process (0: none, a Table 1 method's control)",
                                _integer(0))
    num_workers: int = _key(2, "DataLoader workers per stream", _integer(0), runtime=True)
    normalization: str = _key("minmax", "intensities: per-volume minmax or the data set's z-score (dataset)",
                              _one_of(NORMALIZATIONS))
    patch_sampling: str = _key("uniform", "where labeled patches are cut: uniform, foreground or class",
                               _one_of(SAMPLING_MODES))
    foreground_share: float = _key(0.33, "share of labeled patches centred on foreground (not uniform)",
                                   _number("lie in [0, 1]", lambda x: 0 <= x <= 1))
    class_sampling_power: float = _key(0.5, "class weights n_c^-power of patch_sampling: class", _number())
    # optimisation and schedule
    epochs: int = _key(1500, "epochs to train", _integer(1))
    iterations_per_epoch: int | None = _key(None, "null: len(unlabeled) / (batch_unlabeled (at 0: batch_labeled) "
                                                  "x processes)",
                                            _integer(1, optional=True))
    lr: float = _key(0.3, "base learning rate", _number("be > 0", lambda x: x > 0))
    lr_power: float = _key(0.9, "power of the poly schedule", _number())
    momentum: float = _key(0.9, "SGD momentum", _number())
    nesterov: bool = _key(True, "Nesterov momentum", _boolean)
    weight_decay: float = _key(3e-5, "SGD weight decay", _number())
    seed: int = _key(0, "seed of initialisation, data and masks", _integer())
    # bookkeeping
    val_every: int = _key(1, "validate every N epochs (0: never)", _integer(0))
    save_every: int = _key(1, "write last.pt every N epochs", _integer(1))
    log_every: int = _key(10, "iterations between progress updates and NaN checks", _integer(1), runtime=True)
    # hardware
    device: str = _key("auto", "auto, cpu, cuda, cuda:N or mps", _device, runtime=True)
    amp: bool | str = _key("auto", "mixed precision (auto: on for CUDA and CPUs with native bf16; skcdf.device)",
                           _auto_boolean)
    channels_last: bool | str = _key("auto", "channels_last_3d (auto: CUDA, or CPU bf16 autocast)", _auto_boolean,
                                     runtime=True)
    compile: bool = _key(False, "torch.compile the training forward", _boolean, runtime=True)
    sync_batchnorm: bool = _key(False, "synchronise BatchNorm across processes", _boolean)

    @property
    def method(self) -> methods.Method:
        """The registered method this configuration trains (skcdf.methods)."""
        return methods.method(self.variant)

    def to_dict(self) -> dict[str, Any]:
        """The flat mapping of keys, in table order (what RUN/config.yaml and checkpoints hold)."""
        return {key.name: getattr(self, key.name) for key in KEYS}

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes``, resolved and checked again."""
        return resolve_config({**self.to_dict(), **changes})


KEYS: tuple[dataclasses.Field, ...] = dataclasses.fields(Config)
#: Every key's default (the method switches are null: they come from the method).
DEFAULTS: dict[str, Any] = {key.name: key.default if key.default_factory is dataclasses.MISSING
                            else key.default_factory() for key in KEYS}
#: Keys that may change when a run is resumed: they do not change what is computed.
RUNTIME_KEYS: tuple[str, ...] = tuple(key.name for key in KEYS if key.metadata["runtime"])
_SWITCHES = ("skcm", "aux_heads", "shared_decoder", "ema_order")


# ----------------------------------------------------------------------------- loading

def preset_names() -> list[str]:
    """Names of the presets shipped in skcdf/configs (without .yaml)."""
    folder = resources.files("skcdf") / "configs"
    return sorted(entry.name[: -len(".yaml")] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{source}: not valid YAML ({exc})") from None
    if not isinstance(values, dict):
        raise InputError(f"{source}: expected a mapping of configuration keys, got {type(values).__name__}")
    return values


def _check_known(keys: Any, source: str) -> None:
    for key in keys:
        if key not in DEFAULTS:
            close = difflib.get_close_matches(str(key), DEFAULTS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputError(f"{source}: unknown configuration key {key!r}{hint}")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """["epochs=2", "patch_size=[16,32,32]"] -> {"epochs": 2, "patch_size": [16, 32, 32]} (values parsed as YAML)."""
    values: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set {item!r}: expected key=value")
        values.update(_read_yaml(f"{key.strip()}: {text}", f"--set {item!r}"))
    _check_known(values, "--set")
    return values


def load_config(preset_or_path: str, overrides: list[str] = ()) -> Config:
    """Defaults ← preset name or YAML file ← ``--set`` overrides, then resolved and checked.

    Raises InputError naming the source of a bad key or value.
    """
    path = Path(preset_or_path)
    if path.is_file():
        source, text = str(path), path.read_text()
    elif preset_or_path in preset_names():
        source = f"preset {preset_or_path!r}"
        text = (resources.files("skcdf") / "configs" / f"{preset_or_path}.yaml").read_text()
    else:
        raise InputError(f"{preset_or_path}: neither a YAML file nor a preset (presets: {', '.join(preset_names())})")
    values = _read_yaml(text, source)
    _check_known(values, source)
    return resolve_config({**values, **parse_overrides(list(overrides))}, source)


def resolve_config(values: Mapping[str, Any] | Config, source: str = "configuration") -> Config:
    """Check every value of ``values`` (missing keys take their defaults) and fill the method's
    defaults of the switches left at null.

    Checks only what needs no data; the trainer checks the rest (splits, case counts) before
    training starts. Raises InputError naming ``source``, the key and the value.
    """
    if isinstance(values, Config):
        values = values.to_dict()
    _check_known(values, source)
    given = {**DEFAULTS, **values}
    resolved: dict[str, Any] = {}
    for key in KEYS:  # "variant" comes first: the switches' defaults depend on it
        value = given[key.name]
        if key.name in _SWITCHES and value is None:
            value = methods.METHODS[resolved["variant"]].switches()[key.name]
        try:
            resolved[key.name] = key.metadata["check"](value, key.name)
        except _Invalid as exc:
            raise InputError(f"{source}: {key.name} {exc}, got {value!r}") from None
    config = Config(**resolved)
    _check_combinations(config, source)
    return config


def _check_combinations(config: Config, source: str) -> None:
    """The rules that tie keys together: patch size and SKCM, EMA steps and the network's parts."""
    patch = config.patch_size
    # 4 stride-2 downsamplings, and the SKCM's 2x2x2 local patches on the bottleneck
    multiple = 32 if config.skcm else 16
    if any(s < multiple or s % multiple for s in patch):
        raise InputError(f"{source}: patch_size must be multiples of {multiple} (the network downsamples 4 times"
                         f"{' and SKCM splits the bottleneck into 2x2x2 patches' if config.skcm else ''}), "
                         f"got {patch!r}")
    if config.batch_unlabeled == 0 and not (config.method.trains_without_unlabeled and config.method_weight == 0):
        able = ", ".join(name for name, m in methods.METHODS.items() if m.trains_without_unlabeled)
        raise InputError(f"{source}: batch_unlabeled 0 (no unlabeled volumes) is the control of a Table 1 method "
                         f"whose step takes it ({able}) at method_weight 0; got variant {config.variant!r}, "
                         f"method_weight {config.method_weight}")
    steps = parse_ema_order(config.ema_order)
    if "D" in steps and config.shared_decoder:
        raise InputError(f"{source}: ema_order uses step D, which needs two decoders (shared_decoder is true), "
                         f"got {config.ema_order!r}")
    if ({"Hl", "Hu"} & set(steps)) and not config.aux_heads:
        raise InputError(f"{source}: ema_order uses a head step (Hl/Hu), which needs aux_heads: true, "
                         f"got {config.ema_order!r}")


def to_yaml(config: Config) -> str:
    """The configuration as YAML, keys in table order (what RUN/config.yaml holds)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None)
