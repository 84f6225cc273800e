"""Presets, --set overrides, variant defaults and configuration errors."""

import re
from pathlib import Path

import pytest
import torch
import yaml

from skcdf.methods import METHODS
from skcdf import device as devices
from skcdf.device import hardware_settings as device_settings
from skcdf.train.config import (DEFAULTS, KEYS, load_config, parse_overrides, preset_names,
                                resolve_config)
from skcdf.utils import InputError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_presets_ship_the_paper_settings():
    assert {"synapse_20p", "amos_5p", "phantom"} <= set(preset_names())
    synapse, amos = load_config("synapse_20p"), load_config("amos_5p")
    for config in (synapse, amos):
        assert config.patch_size == [64, 128, 128]
        assert (config.batch_labeled, config.batch_unlabeled, config.filters) == (2, 2, 32)
        assert (config.num_heads, config.epochs, config.val_every) == (2, 1500, 1)
        assert config.ema_order == "Hl,D,Hu" and config.weight_decay == pytest.approx(3e-5)
    assert (synapse.lr, amos.lr) == (0.3, 0.1)
    assert amos.labeled_split == "labeled_5p"
    for config in (synapse, amos):  # the paper's flips and balanced loss, so its tables can be reproduced
        assert (config.flips, config.balance_mode) == ("reference", "reference")


def test_presets_for_trying_things_and_own_data_use_the_measured_mechanisms():
    for preset in ("phantom", "phantom_tiny", "own_data"):
        config = load_config(preset)
        assert (config.flips, config.balance_mode) == ("laterality", "decoupled"), preset
    own = load_config("own_data")
    assert own.patch_size == [64, 128, 128] and own.filters == 32 and own.rampup_epochs == 1500


def test_overrides_are_parsed_as_yaml():
    config = load_config("phantom", ["patch_size=[32, 64, 64]", "epochs=3", "lr=1e-2", "amp=true"])
    assert config.patch_size == [32, 64, 64] and config.epochs == 3 and config.amp is True
    assert config.lr == pytest.approx(0.01)  # YAML 1.1 reads 1e-2 as a string; it becomes a float
    assert parse_overrides(["ema_order=D"]) == {"ema_order": "D"}


def test_yaml_file_and_variant_defaults(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"variant": "df_absh", "skcm": True}))
    config = load_config(str(path))
    assert (config.skcm, config.aux_heads, config.shared_decoder) == (True, True, False)  # skcm overridden
    assert config.ema_order == "Hl,D,Hu"
    for variant, method in METHODS.items():
        resolved = resolve_config({"variant": variant})
        assert all(getattr(resolved, key) == value for key, value in method.switches().items())


@pytest.mark.parametrize("overrides, message", [
    (["bogus=1"], "unknown configuration key 'bogus'"),
    (["epoch=3"], "did you mean 'epochs'"),
    (["variant=mystery"], "variant must be one of"),
    (["ema_order=Hl,X"], "unknown EMA step"),
    (["patch_size=[48,128,128]"], "multiples of 32"),
    (["variant=df", "patch_size=[24,32,32]"], "multiples of 16"),
    (["patch_size=[64,128]"], "three integers"),
    (["batch_labeled=0"], "batch_labeled must be >= 1"),
    (["batch_unlabeled=1.5"], "batch_unlabeled must be an integer"),
    (["labeled_cases=0"], "labeled_cases must be >= 1"),
    (["variant=baseline", "ema_order=D"], "needs two decoders"),
    (["variant=df", "ema_order=Hl,D"], "needs aux_heads"),
    (["lr=0"], "lr must be > 0"),
    (["lr=abc"], "lr must be a finite number"),
    (["balance_mode=soft"], "balance_mode must be one of"),
    (["pseudo_label_threshold=1.0"], "pseudo_label_threshold must be null or lie in"),
    (["pseudo_label_threshold=high"], "pseudo_label_threshold must be a finite number"),
    (["inference_decoder=both"], "inference_decoder must be"),
    (["flips=lr"], "flips must be one of reference, laterality, none, got 'lr'"),
    (["flips=true"], "flips must be one of reference, laterality, none, got True"),
    (["device=tpu"], "device must be"),
    (["amp=maybe"], "amp must be true, false or auto"),
    (["channels_last=1"], "channels_last must be true, false or auto"),
    (["epochs"], "expected key=value"),
])
def test_bad_configurations_are_clear_errors(overrides, message):
    with pytest.raises(InputError, match=message):
        load_config("synapse_20p", overrides)


def test_flips_default_to_the_reference_and_take_three_modes():
    assert DEFAULTS["flips"] == "reference"
    for mode in ("reference", "laterality", "none"):
        assert load_config("phantom", [f"flips={mode}"]).flips == mode


def hardware_settings(config, device_type):
    return device_settings(config.amp, config.channels_last, device_type)


@pytest.mark.parametrize("native_bf16", [False, True])
def test_hardware_settings_auto_means_on_for_cuda_and_bf16_cpus(native_bf16, monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native_bf16)
    auto = load_config("synapse_20p")
    assert (auto.amp, auto.channels_last) == ("auto", "auto")
    assert hardware_settings(auto, "cuda") == {"amp": True, "channels_last": True}
    assert hardware_settings(auto, "cpu") == {"amp": native_bf16, "channels_last": native_bf16}
    assert hardware_settings(auto, "mps") == {"amp": False, "channels_last": False}
    fp32 = load_config("synapse_20p", ["amp=false"])  # exact reference reproduction
    assert hardware_settings(fp32, "cuda") == {"amp": False, "channels_last": True}
    assert hardware_settings(fp32, "cpu") == {"amp": False, "channels_last": False}  # fp32 keeps its layout
    explicit = load_config("synapse_20p", ["amp=false", "channels_last=true"])
    assert hardware_settings(explicit, "cpu") == {"amp": False, "channels_last": True}
    assert hardware_settings(load_config("synapse_20p", ["amp=true"]), "cpu")["amp"] is True
    with pytest.raises(InputError, match="amp \\(mixed precision\\) needs a CUDA device or the CPU, the run uses mps"):
        hardware_settings(load_config("synapse_20p", ["amp=true"]), "mps")


def test_unknown_preset_and_bad_file(tmp_path):
    with pytest.raises(InputError, match="neither a YAML file nor a preset"):
        load_config("no_such_preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(InputError, match="bad.yaml: expected a mapping"):
        load_config(str(bad))
    bad.write_text("epochs: 2\nfilterz: 3\n")
    with pytest.raises(InputError, match=r"bad.yaml: unknown configuration key 'filterz'"):
        load_config(str(bad))


def _documented_defaults() -> dict[str, object]:
    """docs/configuration.md's table of keys: key -> its default column, read as YAML ("from variant": None)."""
    documented = {}
    for line in DOCS.read_text().splitlines():
        match = re.match(r"\| `(\w+)` \| ([^|]+) \|", line)
        if match:
            text = match.group(2).strip()
            value = None if text == "from variant" else yaml.safe_load(text.strip("`"))
            documented[match.group(1)] = float(value) if isinstance(value, str) and value[0].isdigit() else value
    return documented


def test_the_docs_table_lists_every_key_in_order_with_its_default():
    assert list(_documented_defaults().items()) == [(key.name, DEFAULTS[key.name]) for key in KEYS]
