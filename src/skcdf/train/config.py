"""Training configuration: flat keys, YAML presets shipped in ``skcdf/configs``, ``--set key=value``.

A configuration is a flat dict (timm style). ``load_config`` merges, in order: the defaults below
(the paper's Synapse 20 % setting), a preset or YAML file, and ``--set`` overrides; then
``resolve_config`` fills the variant's defaults for the switches left at ``null`` and checks every
value, so that a bad configuration fails before any work. docs/configuration.md explains each key.
"""

from __future__ import annotations

import difflib
import math
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from skcdf.data.laterality import FLIP_MODES
from skcdf.train.knowledge_transfer import parse_ema_order
from skcdf.train.losses import BALANCE_MODES
from skcdf.utils import InputError

DEFAULTS: dict[str, Any] = {
    # method
    "variant": "full",
    "skcm": None,  # null: from the variant
    "aux_heads": None,
    "shared_decoder": None,
    "ema_order": None,
    "ema_decay": 0.99,
    "lambda_u": 10.0,
    "rampup_epochs": None,  # null: the whole run (T = epochs)
    "balance_mode": "reference",
    "pseudo_label_threshold": None,  # null: every voxel's argmax is a target (reference)
    "class_frequency": "labeled",
    "inference_decoder": "unlabeled",
    # network
    "patch_size": [64, 128, 128],
    "filters": 32,
    "num_heads": 2,
    "dropout": True,
    # data
    "flips": "reference",  # reference | laterality | none (training patches; --tta follows it)
    "labeled_split": "labeled_20p",
    "unlabeled_split": "unlabeled_20p",
    "train_split": "train",
    "val_split": "eval",
    "labeled_cases": None,  # null: every case of labeled_split
    "batch_labeled": 2,
    "batch_unlabeled": 2,
    "num_workers": 2,
    # optimisation and schedule
    "epochs": 1500,
    "iterations_per_epoch": None,  # null: len(unlabeled) / (batch_unlabeled * processes)
    "lr": 0.3,
    "lr_power": 0.9,
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 3e-5,
    "seed": 0,
    # bookkeeping
    "val_every": 1,
    "save_every": 1,
    "log_every": 10,
    # hardware
    "device": "auto",
    "amp": "auto",  # auto: bf16 autocast on CUDA, fp32 elsewhere (see hardware_settings)
    "channels_last": "auto",  # auto: channels_last_3d on CUDA
    "compile": False,
    "sync_batchnorm": False,
}

# Per variant: which step it trains with and its defaults for the four method switches.
VARIANTS: dict[str, dict[str, Any]] = {
    "full": dict(step="semi", skcm=True, aux_heads=True, shared_decoder=False, ema_order="Hl,D,Hu"),
    "baseline": dict(step="semi", skcm=False, aux_heads=False, shared_decoder=True, ema_order="none"),
    "df": dict(step="semi", skcm=False, aux_heads=False, shared_decoder=False, ema_order="D"),
    "df_skcm": dict(step="semi", skcm=True, aux_heads=False, shared_decoder=False, ema_order="D"),
    "df_absh": dict(step="semi", skcm=False, aux_heads=True, shared_decoder=False, ema_order="Hl,D,Hu"),
    "labeled_only": dict(step="supervised", skcm=False, aux_heads=False, shared_decoder=True, ema_order="none"),
    "fully_supervised": dict(step="supervised", skcm=False, aux_heads=False, shared_decoder=True, ema_order="none"),
}

# Keys that may change when a run is resumed: they do not change what is computed.
RUNTIME_KEYS = ("device", "num_workers", "log_every", "compile", "channels_last")

_BOOL_KEYS = ("dropout", "nesterov", "compile", "sync_batchnorm")
_AUTO_BOOL_KEYS = ("amp", "channels_last")  # true, false or "auto" (on for CUDA, off elsewhere)
_POSITIVE_INT_KEYS = ("filters", "num_heads", "batch_labeled", "batch_unlabeled", "epochs", "save_every", "log_every")
_NON_NEGATIVE_INT_KEYS = ("num_workers", "val_every")
_OPTIONAL_POSITIVE_INT_KEYS = ("iterations_per_epoch", "labeled_cases")
_FLOAT_KEYS = ("ema_decay", "lambda_u", "lr", "lr_power", "momentum", "weight_decay")
_SPLIT_KEYS = ("labeled_split", "unlabeled_split", "train_split", "val_split")


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


def load_config(preset_or_path: str, overrides: list[str] = ()) -> dict[str, Any]:
    """Defaults ← preset name or YAML file ← ``--set`` overrides, then resolved and checked.

    Returns the resolved flat configuration. Raises InputError naming the source of a bad key or value.
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
    config = {**DEFAULTS, **values, **parse_overrides(list(overrides))}
    return resolve_config(config, source)


def _as_float(config: dict[str, Any], key: str, source: str) -> float:
    value = config[key]
    if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{source}: {key} must be a finite number, got {config[key]!r}")
    return float(value)


def _fail(source: str, key: str, rule: str, value: Any) -> InputError:
    return InputError(f"{source}: {key} {rule}, got {value!r}")


def resolve_config(config: dict[str, Any], source: str = "configuration") -> dict[str, Any]:
    """Fill the variant defaults of unset switches and check every value; returns a new dict.

    Checks only what needs no data; ``skcdf.train.trainer`` checks the rest (splits, case counts)
    before training starts.
    """
    _check_known(config, source)
    config = {**DEFAULTS, **config}
    variant = config["variant"]
    if variant not in VARIANTS:
        raise _fail(source, "variant", f"must be one of {', '.join(VARIANTS)}", variant)
    for key in ("skcm", "aux_heads", "shared_decoder", "ema_order"):
        if config[key] is None:
            config[key] = VARIANTS[variant][key]
    for key in _BOOL_KEYS + ("skcm", "aux_heads", "shared_decoder"):
        if not isinstance(config[key], bool):
            raise _fail(source, key, "must be true or false", config[key])
    for key in _AUTO_BOOL_KEYS:
        if not (isinstance(config[key], bool) or config[key] == "auto"):
            raise _fail(source, key, "must be true, false or auto", config[key])
    for key in _POSITIVE_INT_KEYS + _NON_NEGATIVE_INT_KEYS + _OPTIONAL_POSITIVE_INT_KEYS + ("seed",):
        value = config[key]
        if value is None and key in _OPTIONAL_POSITIVE_INT_KEYS:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(source, key, "must be an integer", value)
        if key in _NON_NEGATIVE_INT_KEYS and value < 0:
            raise _fail(source, key, "must be >= 0", value)
        if key not in _NON_NEGATIVE_INT_KEYS + ("seed",) and value < 1:
            raise _fail(source, key, "must be >= 1", value)
    for key in _FLOAT_KEYS:
        config[key] = _as_float(config, key, source)
    if config["lr"] <= 0:
        raise _fail(source, "lr", "must be > 0", config["lr"])
    if not 0.0 <= config["ema_decay"] <= 1.0:
        raise _fail(source, "ema_decay", "must lie in [0, 1]", config["ema_decay"])
    for key in ("lambda_u", "lr_power", "momentum", "weight_decay"):
        if config[key] < 0:
            raise _fail(source, key, "must be >= 0", config[key])
    rampup = config["rampup_epochs"]
    if rampup is not None and (isinstance(rampup, bool) or not isinstance(rampup, int) or rampup < 0):
        raise _fail(source, "rampup_epochs", "must be null or an integer >= 0", rampup)

    patch = config["patch_size"]
    if not (isinstance(patch, list) and len(patch) == 3 and all(isinstance(s, int) and not isinstance(s, bool) for s in patch)):
        raise _fail(source, "patch_size", "must be a list of three integers [D, H, W]", patch)
    # 4 stride-2 downsamplings, and the SKCM's 2x2x2 local patches on the bottleneck
    multiple = 32 if config["skcm"] else 16
    if any(s < multiple or s % multiple for s in patch):
        raise _fail(source, "patch_size", f"must be multiples of {multiple} (the network downsamples "
                    f"4 times{' and SKCM splits the bottleneck into 2x2x2 patches' if config['skcm'] else ''})", patch)

    try:
        steps = parse_ema_order(str(config["ema_order"]))
    except ValueError as exc:
        raise InputError(f"{source}: ema_order: {exc}") from None
    config["ema_order"] = ",".join(steps) if steps else "none"
    if "D" in steps and config["shared_decoder"]:
        raise _fail(source, "ema_order", "uses step D, which needs two decoders (shared_decoder is true)", config["ema_order"])
    if ({"Hl", "Hu"} & set(steps)) and not config["aux_heads"]:
        raise _fail(source, "ema_order", "uses a head step (Hl/Hu), which needs aux_heads: true", config["ema_order"])

    threshold = config["pseudo_label_threshold"]
    if threshold is not None:
        threshold = config["pseudo_label_threshold"] = _as_float(config, "pseudo_label_threshold", source)
        if not 0.0 < threshold < 1.0:
            raise _fail(source, "pseudo_label_threshold", "must be null or lie in (0, 1)", threshold)
    if config["balance_mode"] not in BALANCE_MODES:
        raise _fail(source, "balance_mode", f"must be one of {', '.join(BALANCE_MODES)}", config["balance_mode"])
    frequency = config["class_frequency"]
    if not (frequency in ("labeled", "train") or (isinstance(frequency, list) and all(
            isinstance(n, (int, float)) and not isinstance(n, bool) and n >= 0 for n in frequency))):
        raise _fail(source, "class_frequency", "must be 'labeled', 'train' or a list of K voxel counts >= 0", frequency)
    if config["flips"] not in FLIP_MODES:
        raise _fail(source, "flips", f"must be one of {', '.join(FLIP_MODES)}", config["flips"])
    if config["inference_decoder"] not in ("unlabeled", "labeled"):
        raise _fail(source, "inference_decoder", "must be 'unlabeled' or 'labeled'", config["inference_decoder"])
    for key in _SPLIT_KEYS:
        if not isinstance(config[key], str) or not config[key]:
            raise _fail(source, key, "must be a split name (file splits/<name>.txt)", config[key])
    device = config["device"]
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda", "mps") or device.startswith("cuda:")):
        raise _fail(source, "device", "must be auto, cpu, cuda, cuda:N or mps", device)
    return config


def hardware_settings(config: dict[str, Any], device_type: str) -> dict[str, bool]:
    """{"amp": ..., "channels_last": ...} for a run on a device of type ``device_type`` ("cuda", "cpu", "mps").

    ``auto`` turns both on for CUDA (bf16 autocast and channels_last_3d: the fast path of recent GPUs)
    and off elsewhere, so that CPU and MPS runs keep the reference's fp32 numerics and memory layout.
    ``amp: false`` keeps CUDA runs in fp32, as the reference trains.

    Raises:
        InputError: ``amp: true`` on a device other than CUDA.
    """
    settings = {key: device_type == "cuda" if config[key] == "auto" else config[key] for key in _AUTO_BOOL_KEYS}
    if settings["amp"] and device_type != "cuda":
        raise InputError(f"amp (mixed precision) needs a CUDA device, the run uses {device_type}")
    return settings


def step_kind(config: dict[str, Any]) -> str:
    """"semi" (two-flow SKCDF step) or "supervised" (labeled loss only) for a resolved configuration."""
    return VARIANTS[config["variant"]]["step"]


def to_yaml(config: dict[str, Any]) -> str:
    """The configuration as YAML, keys in the order of DEFAULTS (what RUN/config.yaml holds)."""
    return yaml.safe_dump({key: config[key] for key in DEFAULTS}, sort_keys=False, default_flow_style=None)
