"""Left/right class pairs and the patient's left-right axis: flips that keep laterality (issue 15).

Mirroring an axial scan along the patient's left-right (L-R) axis puts a left organ where its right
twin belongs. Flips in ``laterality`` mode therefore swap the labels of each left/right class pair
when they flip the L-R axis, and never flip that axis when a class says left or right but has no
twin among the classes (its mirror image would have no correct label).

- :func:`find_laterality`: the pairs (from the class names and abbreviations, or stated in
  dataset.json as ``lateral_pairs``) and the lateral classes without a twin.
- :func:`check_lateral_pairs`: validation of a stated ``lateral_pairs``.
- :func:`left_right_axis`: the array axis of a prepared (D, H, W) volume that runs left-right.
- :func:`flip_plan`: which drawn flips a mode keeps, and whether the pair labels swap.
- :func:`class_order`, :func:`swap_labels`: the swap itself, on label maps or class channels.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from skcdf.utils import InputError

__all__ = ["FLIP_MODES", "FlipMode", "Laterality", "Pairs", "check_lateral_pairs", "class_order",
           "find_laterality", "flip_plan", "left_right_axis", "swap_labels"]

#: Values of the ``flips`` configuration key.
FLIP_MODES: tuple[str, ...] = ("reference", "laterality", "none")
FlipMode = Literal["reference", "laterality", "none"]

#: Left/right class index pairs, each ``(i, j)`` with ``i < j``, sorted.
Pairs = tuple[tuple[int, int], ...]

# Words that mark a side, as the first or last word of a class name.
_SIDE_WORDS = {"left": "L", "lt": "L", "l": "L", "right": "R", "rt": "R", "r": "R"}
# An abbreviation like LK / RK, LAG / RAG: L or R, then an upper-case letter (so "Li", liver, is not lateral).
_SIDE_PREFIX = re.compile(r"^([LR])([A-Z].*)$")


@dataclass(frozen=True)
class Laterality:
    """The lateral classes of a data set.

    Attributes:
        pairs: class pairs whose labels swap when the L-R axis is flipped (``(i, j)``, ``i < j``).
        unpaired: classes whose name says left or right but whose twin is missing; while there is
            one, ``laterality`` flips never flip the L-R axis.
    """

    pairs: Pairs = ()
    unpaired: tuple[int, ...] = ()

    @property
    def can_flip_left_right(self) -> bool:
        return not self.unpaired


def _name_side(name: str) -> tuple[str, str] | None:
    """``("L" | "R", stem)`` when the first or last word of ``name`` is a side word, or any word is
    ``left``/``right``; else None.

    ``left kidney``, ``Kidney_L``, ``l_kidney``, ``kidney rt`` -> side and stem ``kidney``;
    ``rib_left_1`` -> ``("L", "rib 1")``.
    """
    words = re.findall(r"[a-z0-9]+", name.lower())
    if len(words) < 2:
        return None
    positions = [0, len(words) - 1] + [i for i, word in enumerate(words) if word in ("left", "right")]
    for position in positions:
        side = _SIDE_WORDS.get(words[position])
        if side is not None:
            return side, " ".join(words[:position] + words[position + 1:])
    return None


def _abbrev_side(abbrev: str) -> tuple[str, str] | None:
    """``("L" | "R", stem)`` of an abbreviation: by the name rule (``K_L``), else ``LK`` -> ``("L", "K")``."""
    side = _name_side(abbrev)
    if side is not None:
        return side
    match = _SIDE_PREFIX.match(abbrev.strip())
    return None if match is None else (match.group(1), match.group(2).lower())


def _match_sides(sides: dict[int, tuple[str, str]]) -> list[tuple[int, int]]:
    """Pairs of classes with the same stem, one left and one right (a stem with two lefts pairs nothing)."""
    by_stem: dict[str, dict[str, list[int]]] = defaultdict(lambda: {"L": [], "R": []})
    for index, (side, stem) in sides.items():
        by_stem[stem][side].append(index)
    return [tuple(sorted((found["L"][0], found["R"][0]))) for found in by_stem.values()
            if len(found["L"]) == 1 and len(found["R"]) == 1]


def find_laterality(class_names: Sequence[str], class_abbrevs: Sequence[str] | None = None,
                    lateral_pairs: Sequence[Sequence[int]] | None = None) -> Laterality:
    """The left/right pairs among the classes, and the lateral classes without a twin.

    Names pair first (``left X``/``right X``, ``X left``/``X right``, ``X_L``/``X_R``, ``l_X``/``r_X``,
    ``lt``/``rt``, ``X_left_1``/``X_right_1``, any case), then the abbreviations of classes the names left unpaired (``LK``/``RK``,
    ``LAG``/``RAG``). Class 0 (background) is never lateral.

    Args:
        class_names: the K class names, index 0 background.
        class_abbrevs: their K abbreviations, or None.
        lateral_pairs: pairs stated in dataset.json (already checked by :func:`check_lateral_pairs`);
            when given they replace name matching entirely, and no class counts as unpaired.
    """
    if lateral_pairs is not None:
        return Laterality(tuple(sorted(tuple(sorted((int(i), int(j)))) for i, j in lateral_pairs)))
    named = {i: side for i, name in enumerate(class_names) if i > 0 and (side := _name_side(name)) is not None}
    pairs = _match_sides(named)
    paired = {i for pair in pairs for i in pair}
    if class_abbrevs is not None:
        abbreviated = {i: side for i, abbrev in enumerate(class_abbrevs)
                       if i > 0 and i not in paired and (side := _abbrev_side(abbrev)) is not None}
        pairs += _match_sides(abbreviated)
        paired = {i for pair in pairs for i in pair}
    return Laterality(tuple(sorted(pairs)), tuple(sorted(i for i in named if i not in paired)))


def check_lateral_pairs(value: object, num_classes: int, source: str | os.PathLike) -> Pairs | None:
    """A ``lateral_pairs`` value of dataset.json checked: None, or ``[[i, j], ...]`` of distinct
    foreground classes (1..K-1), each class in at most one pair. Returns the pairs sorted.

    Raises:
        InputError: naming ``source`` and the offending entry.
    """
    if value is None:
        return None
    rule = f"{source}: 'lateral_pairs' must be a list of [i, j] pairs of class indices between 1 and {num_classes - 1}"
    if not isinstance(value, (list, tuple)):
        raise InputError(f"{rule}, got {value!r}")
    seen: set[int] = set()
    for pair in value:
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(i, int) and not isinstance(i, bool) and 1 <= i < num_classes for i in pair)):
            raise InputError(f"{rule}, got {pair!r}")
        if pair[0] == pair[1]:
            raise InputError(f"{source}: 'lateral_pairs' pairs class {pair[0]} with itself")
        for index in pair:
            if index in seen:
                raise InputError(f"{source}: 'lateral_pairs' names class {index} in more than one pair")
            seen.add(index)
    return tuple(sorted(tuple(sorted(pair)) for pair in value))


def left_right_axis(direction: Sequence[float] | None) -> int:
    """The array axis (0 = D, 1 = H, 2 = W) of a prepared volume that runs along the patient's left-right.

    Prepared volumes are SimpleITK index (z, y, x) resampled without reorientation, so array axis a
    is index axis 2 - a; the L-R index axis is the one whose direction has the largest |x| (LPS)
    component (the first on a tie).

    Args:
        direction: the scan's direction cosines, SimpleITK's row-major 3×3 (9 numbers); None (no
            geometry recorded, e.g. a reference-implementation folder) gives W (2).
    """
    if direction is None:
        return 2
    matrix = np.asarray(direction, dtype=np.float64)
    if matrix.size != 9:
        raise ValueError(f"direction must have 9 values (row-major 3×3), got {matrix.size}")
    index_axis = int(np.argmax(np.abs(matrix.reshape(3, 3)[0])))  # row 0: the x components of the index axes
    return 2 - index_axis


def flip_plan(mode: FlipMode, axes: Sequence[int], lr_axis: int,
              laterality: Laterality) -> tuple[tuple[int, ...], bool]:
    """The flips to apply of the ``axes`` drawn, and whether the pair labels swap.

    ``reference`` keeps every axis and never swaps; ``none`` keeps none; ``laterality`` drops
    ``lr_axis`` when a lateral class has no twin, and swaps when it flips ``lr_axis`` and there are pairs.

    Returns:
        (axes to flip, swap the labels of ``laterality.pairs``).
    """
    if mode == "reference":
        return tuple(axes), False
    if mode == "none":
        return (), False
    if mode != "laterality":
        raise ValueError(f"flip mode must be one of {', '.join(FLIP_MODES)}, got {mode!r}")
    if not laterality.can_flip_left_right:
        axes = [axis for axis in axes if axis != lr_axis]
    return tuple(axes), lr_axis in axes and bool(laterality.pairs)


def class_order(pairs: Pairs, num_classes: int) -> np.ndarray:
    """``(K,)`` int64 map from each class to its twin (itself when unpaired): ``order[label]`` swaps a
    label map, ``probabilities[:, order]`` swaps class channels. Its own inverse.

    Raises:
        ValueError: a pair names a class >= ``num_classes``.
    """
    order = np.arange(num_classes, dtype=np.int64)
    for i, j in pairs:
        if max(i, j) >= num_classes:
            raise ValueError(f"lateral pair ({i}, {j}) names a class outside the {num_classes} classes")
        order[i], order[j] = j, i
    return order


def swap_labels(label: np.ndarray, pairs: Pairs) -> np.ndarray:
    """``label`` (any shape, integer class indices) with each pair's two labels exchanged (int64)."""
    size = max([int(label.max()) + 1 if label.size else 1] + [j + 1 for _, j in pairs])
    return class_order(pairs, size)[label]
