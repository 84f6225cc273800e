"""Class tables of the supported data sets and the default CT window (SPEC §2, §5)."""

from __future__ import annotations

from typing import Sequence

# CT intensity window of the reference implementation: HU clipped to [-75, 275] before min-max scaling.
CT_WINDOW: tuple[float, float] = (-75.0, 275.0)

# Synapse (BTCV abdomen), label values 0..13 in this order.
SYNAPSE_NAMES = [
    "background", "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach",
    "aorta", "inferior vena cava", "portal and splenic veins", "pancreas", "right adrenal gland",
    "left adrenal gland",
]
SYNAPSE_ABBREVS = ["BG", "Sp", "RK", "LK", "Ga", "Es", "Li", "St", "Ao", "IVC", "PSV", "Pa", "RAG", "LAG"]

# AMOS 2022, label values 0..15 in this order (used when the source has no dataset.json).
AMOS_NAMES = [
    "background", "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach",
    "aorta", "postcava", "pancreas", "right adrenal gland", "left adrenal gland", "duodenum", "bladder",
    "prostate/uterus",
]
AMOS_ABBREVS = ["BG", "Sp", "RK", "LK", "Ga", "Es", "Li", "St", "Ao", "IVC", "Pa", "RAG", "LAG", "Du", "Bl", "P/U"]

# Short names for organ names met in other data sets' dataset.json (lower-case keys).
_KNOWN_ABBREVS = dict(zip(SYNAPSE_NAMES + AMOS_NAMES, SYNAPSE_ABBREVS + AMOS_ABBREVS))
_KNOWN_ABBREVS.update({"ivc": "IVC", "right adrenal": "RAG", "left adrenal": "LAG", "adrenal gland": "AG"})


def abbreviate(names: Sequence[str]) -> list[str]:
    """Short column names for ``names``: the usual organ abbreviation where known, else the initials
    (or the first three letters of a one-word name); a number is appended to keep them unique."""
    abbrevs: list[str] = []
    for index, name in enumerate(names):
        key = name.strip().lower().replace("_", " ")
        abbrev = "BG" if index == 0 else _KNOWN_ABBREVS.get(key)
        if abbrev is None:
            words = key.split() or [f"c{index}"]
            abbrev = "".join(w[0] for w in words).upper() if len(words) > 1 else words[0][:3].capitalize()
        if abbrev in abbrevs:
            abbrev = f"{abbrev}{index}"
        abbrevs.append(abbrev)
    return abbrevs
