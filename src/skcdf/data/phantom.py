"""A synthetic abdominal CT data set with Synapse's 13 organs, hard in the ways real data is.

**Anatomy.** Each case is drawn from a canonical abdomen in millimetres (X towards the patient's
left, Y posterior, Z superior; body centre at X = Y = 0) made of superellipsoids with wavy
surfaces and tubes along smooth centre lines: a body outline with subcutaneous fat, an abdominal
wall with ribs, visceral fat, spine, psoas, lung bases, colon and small bowel loops, the duodenum,
the iliac vessels and the superior mesenteric artery (all background), and the 13 labeled organs
at their usual places: liver right-upper with a left lobe across the midline, spleen left-posterior,
kidneys posterior on both sides, gallbladder under the liver, stomach left-upper, pancreas across
the middle in front of the splenic vein, aorta and inferior vena cava as vertical tubes in front of
the spine, esophagus a thin tube joining the stomach, portal and splenic veins thin curved tubes,
adrenals thin Λ-shaped plates above the kidneys' upper poles. Every organ gets its own shift,
scale and rotation, every case a patient size, pose, scan window and a smooth random deformation
of the whole abdomen, so a model has to learn shape and context, not a fixed map.

**Imbalance.** Organ volumes follow real ones (liver ~1.5 l, adrenal ~4 ml), so the liver has
several hundred times the voxels of an adrenal and background dominates (table in docs/data.md).

**Intensities** are Hounsfield-like: soft-tissue organs within a few tens of HU of each other (liver
~105, spleen ~115, kidneys ~130, pancreas ~95), brighter vessels, a per-case contrast phase,
per-organ offsets and texture, fat, gas in bowel and stomach, bone, partial-volume blur, a smooth
bias field and correlated noise. Intensity alone cannot segment it.

**Default shape 48×96×96** (D, H, W): the CPU demo trains with 32×64×64 patches (each patch sees a
third of a volume, sliding-window inference needs 8 windows), a case generates in well under a
second, and the smallest organs still have tens of voxels (the liver/adrenal ratio stays above 200).
Voxels are about 4.2 mm in-plane and 5 mm apart in depth (a 400×400×240 mm field of view, ±8 % per case).

Per-case seeds come from ``SeedSequence([seed, case index])``, so a case depends on nothing else (not
on the number of workers); the anatomy has its own random stream, so a case keeps its anatomy at
any shape.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from skcdf.data.classes import CT_WINDOW, SYNAPSE_ABBREVS, SYNAPSE_NAMES
from skcdf.data.geometry import Geometry
from skcdf.data.layout import dataset_info, staged_output_dir, write_case, write_dataset_info, write_split
from skcdf.parallel import map_cases
from skcdf.data.splits import SYNAPSE_SPLIT, counts_from_fractions, make_splits
from skcdf.utils import atomic_path, atomic_write_text

DEFAULT_SHAPE = (48, 96, 96)
DEFAULT_CASES = 30
FIELD_OF_VIEW_MM = np.array([400.0, 400.0, 240.0])  # (x, y, z)
# Varied scans (`--varied`, issue 27): the ranges clinical abdominal CTs span.
VARIED_Z_EXTENT_MM = (240.0, 650.0)      # abdomen only .. chest-abdomen-pelvis
VARIED_IN_PLANE_FOV_MM = (340.0, 500.0)  # a wide field of view pads the body with air and shows the table
VARIED_IN_PLANE_SPACING_MM = (0.6, 1.0)
VARIED_SLICE_SPACING_MM = (1.0, 5.0)

# Labels in Synapse order.
SP, RK, LK, GA, ES, LI, ST, AO, IVC, PSV, PA, RAG, LAG = range(1, 14)

# Tissue → (unenhanced HU, enhancement at a typical portal-venous phase, texture amplitude in HU).
_TISSUES: dict[str, tuple[float, float, float]] = {
    "air": (-1000, 0, 5), "table": (100, 0, 20), "fat": (-105, 0, 12), "visceral_fat": (-90, 0, 18),
    "muscle": (45, 12, 8), "bone": (650, 0, 80), "marrow": (220, 0, 40), "csf": (15, 0, 5),
    "lung": (-850, 0, 35), "gas": (-950, 0, 20), "fluid": (12, 0, 5), "food": (40, 0, 35),
    "feces": (-180, 0, 140), "contrast": (300, 0, 40), "bowel_wall": (35, 45, 10),
    "liver": (55, 50, 7), "lesion": (35, 10, 6), "spleen": (45, 70, 7), "kidney": (35, 95, 9),
    "medulla": (35, 60, 9), "bile": (10, 0, 4), "pancreas": (45, 48, 16), "artery": (40, 150, 8),
    "vein": (40, 110, 8), "portal": (40, 125, 8), "adrenal": (30, 22, 8), "esophagus": (35, 15, 8),
    "stomach_wall": (35, 40, 10),
}
_TISSUE_IDS = {name: index for index, name in enumerate(_TISSUES)}


@dataclass(frozen=True)
class PhantomCase:
    """One generated case: image float32 (D, H, W) in HU, label uint8 (D, H, W) 0..13, its scan geometry."""

    image: np.ndarray
    label: np.ndarray
    geometry: Geometry


# ------------------------------------------------------------------------------------------------ shapes


def _rotation(degrees: Sequence[float]) -> np.ndarray:
    """3×3 rotation about X, then Y, then Z by the given angles."""
    ax, ay, az = np.radians(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class _Ellipsoid:
    """A superellipsoid ``|q|_e <= 1 + wobble(q)`` in its own frame ``q = R^T (p - centre) / semi``."""

    centre: np.ndarray  # (3,) mm
    semi: np.ndarray  # (3,) semi-axes, mm
    rotation: np.ndarray  # (3, 3): columns are the shape's axes
    exponent: float = 2.0  # 2: ellipsoid; larger: boxier
    wobble: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))  # rows: amplitude, frequency (3), phase

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        corner = 3 ** max(0.5 - 1 / self.exponent, 0)  # how far a boxy superellipsoid reaches beyond its axes
        half = np.sqrt(((self.rotation * self.semi) ** 2).sum(1)) * corner * (1 + np.abs(self.wobble[:, 0]).sum())
        return self.centre - half, self.centre + half

    def contains(self, points: np.ndarray) -> np.ndarray:
        to_local = (self.rotation / self.semi).T.astype(points.dtype)
        q = to_local @ (points - self.centre[:, None].astype(points.dtype))
        surface = 1 + sum(a * np.sin(np.asarray(w, dtype=q.dtype) @ q + phase) for a, *w, phase in self.wobble)
        return (np.abs(q) ** self.exponent).sum(0) <= surface ** self.exponent

    def shrunk(self, mm: float) -> "_Ellipsoid":
        return _Ellipsoid(self.centre, np.maximum(self.semi - mm, 1.0), self.rotation, self.exponent, self.wobble)


@dataclass
class _Tube:
    """Capsules along a centre line: radius interpolated linearly along each segment."""

    points: np.ndarray  # (n, 3) mm
    radii: np.ndarray  # (n,) mm

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.points.min(0) - self.radii.max(), self.points.max(0) + self.radii.max()

    def contains(self, points: np.ndarray) -> np.ndarray:
        inside = np.zeros(points.shape[1], dtype=bool)
        for a, b, ra, rb in zip(self.points[:-1], self.points[1:], self.radii[:-1], self.radii[1:]):
            axis = b - a
            t = np.clip((axis @ (points - a[:, None])) / (axis @ axis), 0, 1)
            distance = np.linalg.norm(points - (a[:, None] + axis[:, None] * t), axis=0)
            inside |= distance <= ra + t * (rb - ra)
        return inside

    def shrunk(self, mm: float) -> "_Tube":
        return _Tube(self.points, np.maximum(self.radii - mm, 0.5))


Shape = _Ellipsoid | _Tube


def _mask(shapes: Sequence[Shape], coords: np.ndarray) -> np.ndarray:
    """Union of ``shapes`` at ``coords`` (3, N): bool (N,). Only points in a shape's bounding box are tested."""
    mask = np.zeros(coords.shape[1], dtype=bool)
    for shape in shapes:
        low, high = shape.bounds()
        candidates = np.flatnonzero((coords[0] >= low[0]) & (coords[0] <= high[0]))
        for axis in (1, 2):  # narrow down on the (usually few) points left
            values = coords[axis, candidates]
            candidates = candidates[(values >= low[axis]) & (values <= high[axis])]
        mask[candidates[shape.contains(coords[:, candidates])]] = True
    return mask


class _Frame:
    """An organ's randomly shifted, scaled and rotated frame; parts are placed relative to its anchor."""

    def __init__(self, rng: np.random.Generator, anchor: Sequence[float], shift_mm: float = 6.0,
                 scale_sd: float = 0.08, angle_deg: float = 8.0) -> None:
        self.rng = rng
        self.anchor = np.asarray(anchor, dtype=float) + rng.normal(0, shift_mm, 3)
        self.scale = float(np.exp(rng.normal(0, scale_sd)))
        self.rotation = _rotation(rng.normal(0, angle_deg, 3))

    def point(self, offset: Sequence[float]) -> np.ndarray:
        return self.anchor + self.rotation @ (self.scale * np.asarray(offset, dtype=float))

    def ellipsoid(self, offset: Sequence[float], semi: Sequence[float], degrees: Sequence[float] = (0, 0, 0),
                  exponent: float = 2.0, wobble: float = 0.05) -> _Ellipsoid:
        semi = self.scale * np.asarray(semi, dtype=float) * np.exp(self.rng.normal(0, 0.05, 3))
        waves = np.column_stack([
            wobble * self.rng.uniform(0.3, 1.0, 3),  # amplitudes
            self.rng.normal(0, 2.5, (3, 3)),  # frequencies: one to two bumps across the shape
            self.rng.uniform(0, 2 * np.pi, 3),  # phases
        ])
        return _Ellipsoid(self.point(offset), semi, self.rotation @ _rotation(degrees), exponent, waves)

    def tube(self, offsets: Sequence[Sequence[float]], radii: Sequence[float] | float, wiggle_mm: float = 2.0) -> _Tube:
        points = np.array([self.point(o) for o in offsets]) + self.rng.normal(0, wiggle_mm, (len(offsets), 3))
        radii = np.broadcast_to(np.asarray(radii, dtype=float), (len(offsets),))
        return _Tube(points, self.scale * radii * np.exp(self.rng.normal(0, 0.06)))


# ------------------------------------------------------------------------------------------------ anatomy


@dataclass
class _Part:
    """Paint ``tissue`` (and ``label``, unless None) where the union of ``shapes`` (everywhere if none)
    minus ``minus`` lies inside ``region`` ("body", "wall", "cavity" or None: anywhere), over voxels
    of label ``within`` if given, and where ``condition(coords)`` holds if given."""

    tissue: str
    shapes: list[Shape]
    label: int | None = 0
    minus: list[Shape] = field(default_factory=list)
    region: str | None = "cavity"
    within: int | None = None
    condition: Callable[[np.ndarray], np.ndarray] | None = None


def _gas_above(level_mm: float) -> Callable[[np.ndarray], np.ndarray]:
    """Gas floats up: in a supine patient that is anterior, i.e. Y below a level."""
    return lambda coords: coords[1] < level_mm


def _hollow(rng: np.random.Generator, outer: list[Shape], label: int | None, wall_mm: float,
            contents: Sequence[str], gas_level: float | None = None) -> list[_Part]:
    """A lumen inside ``outer``: one of ``contents``, and gas above ``gas_level`` (if given)."""
    lumen = [shape.shrunk(wall_mm) for shape in outer]
    parts = [_Part(str(rng.choice(contents)), lumen, label=None, within=label)]
    if gas_level is not None:
        parts.append(_Part("gas", lumen, label=None, within=label, condition=_gas_above(gas_level)))
    return parts


def _torso(rng: np.random.Generator) -> tuple[list[_Part], dict[str, _Ellipsoid]]:
    """Body outline (subcutaneous fat), abdominal wall with ribs, visceral fat; and the shapes of the
    body, of the wall's outside and of the cavity."""
    frame = _Frame(rng, (0, 5, 0), shift_mm=3.0, scale_sd=0.05, angle_deg=0.0)
    body = frame.ellipsoid((0, 0, 0), (160, 120, 1e4), exponent=2.4, wobble=0.03)
    fat_mm, wall_mm = rng.uniform(10, 30), rng.uniform(7, 11)
    wall, cavity = body.shrunk(fat_mm), body.shrunk(fat_mm + wall_mm)
    rib_period, rib_phase = rng.uniform(28, 36), rng.uniform(0, 1)

    def ribs(coords: np.ndarray) -> np.ndarray:
        # Bands that run from high at the back to low at the front, only above the costal margin.
        _, y, z = coords
        band = ((z - 0.3 * y) / rib_period + rib_phase) % 1 < 0.3
        return band & (z > -40 - 0.6 * np.minimum(y, 0)) & (y > -90)

    parts = [_Part("fat", [], region="body"), _Part("muscle", [], region="wall"),
             _Part("bone", [], region="wall", condition=ribs), _Part("visceral_fat", [], region="cavity")]
    return parts, {"body": body, "wall": wall, "cavity": cavity}


def _spine_and_muscles(rng: np.random.Generator) -> list[_Part]:
    frame = _Frame(rng, (0, 72, 0), shift_mm=3.0, scale_sd=0.05, angle_deg=0.0)
    vertebra = frame.ellipsoid((0, 0, 0), (20, 19, 1e4), wobble=0.0)
    parts = [
        _Part("muscle", [frame.ellipsoid((side * 38, 36, 0), (24, 18, 1e4)) for side in (-1, 1)], region="body"),
        _Part("bone", [frame.ellipsoid((0, 34, 0), (28, 12, 1e4), exponent=2.5)], region="body"),
        _Part("csf", [frame.ellipsoid((0, 28, 0), (8, 7, 1e4), wobble=0.0)], region="body"),
        _Part("bone", [vertebra], region="body"),
        _Part("marrow", [vertebra.shrunk(3)], region="body"),
    ]
    psoas = [frame.tube([(side * 30, -6, 20), (side * 40, -14, -50), (side * 55, -26, -125)], [8, 16, 22])
             for side in (-1, 1)]
    return parts + [_Part("muscle", psoas)]


def _bowel(rng: np.random.Generator) -> list[_Part]:
    """Colon and small bowel loops (background), with mixed contents: a confounder for every organ."""
    frame = _Frame(rng, (0, 0, 0))
    colon = frame.tube([(-75, -10, -125), (-80, 0, -20), (-65, -40, 15), (0, -75, -5), (75, -25, 30),
                        (88, 10, -20), (80, 10, -125)], 20)
    parts = [_Part("bowel_wall", [colon]), *_hollow(rng, [colon], None, 3, ["feces", "feces", "gas"])]
    oral_contrast = rng.random() < 0.3
    for _ in range(8):
        start = rng.uniform((-55, -75, -120), (55, 15, -20))
        steps = rng.normal(0, 28, (4, 3)).cumsum(0)
        loop = frame.tube(start + np.vstack([np.zeros(3), steps]), rng.uniform(9, 13))
        contents = ["contrast"] if oral_contrast else ["fluid", "gas", "food"]
        parts += [_Part("bowel_wall", [loop]), *_hollow(rng, [loop], None, 3, contents)]
    parts.append(_Part("lung", [frame.ellipsoid((side * 85, 45, 150), (65, 55, 75)) for side in (-1, 1)]))
    return parts


def _upper_organs(rng: np.random.Generator) -> list[_Part]:
    """Liver (with lesions), spleen, stomach, kidneys, gallbladder."""
    liver = _Frame(rng, (-40, 5, 50))
    liver_shapes = [liver.ellipsoid((-15, 10, -5), (68, 76, 64), exponent=2.6),
                    liver.ellipsoid((55, -45, 12), (62, 34, 38), degrees=(0, 0, -25), exponent=2.2)]
    liver_cut = [liver.ellipsoid((60, 0, -110), (90, 200, 70))]  # the liver's lower edge rises medially
    lesions = [liver.ellipsoid(rng.uniform((-50, -20, -10), (10, 40, 40)), rng.uniform(6, 15, 3), wobble=0.1)
               for _ in range(rng.integers(0, 3))]

    spleen = _Frame(rng, (85, 45, 55))
    stomach = _Frame(rng, (50, -5, 45))
    stomach_shapes = [stomach.ellipsoid((-2, 20, 27), (34, 34, 32)),  # fundus
                      stomach.ellipsoid((12, -7, -7), (34, 30, 44), (-20, 0, 0)),  # body
                      stomach.ellipsoid((-30, -43, -33), (44, 20, 20), (0, 0, 25))]  # antrum
    gallbladder = _Frame(rng, (-45, -35, 8))
    parts = [
        _Part("liver", liver_shapes, LI, minus=liver_cut),
        *[_Part("lesion", [lesion], None, within=LI) for lesion in lesions],
        _Part("spleen", [spleen.ellipsoid((0, 0, 0), (25, 50, 48), (0, 0, 35))], SP,
              minus=[spleen.ellipsoid((-33, -15, -5), (28, 40, 42))]),
        _Part("stomach_wall", stomach_shapes, ST),
        *_hollow(rng, stomach_shapes, ST, 4, ["fluid", "food"], gas_level=rng.uniform(-60, 10)),
    ]
    for label, side, anchor in ((RK, -1, (-68, 50, -15)), (LK, 1, (70, 50, 0))):
        kidney = _Frame(rng, anchor)
        bean = kidney.ellipsoid((0, 0, 0), (26, 24, 55), (0, -side * 12, side * 25))
        hilum = kidney.ellipsoid((-side * 24, -10, 0), (11, 11, 22))
        parts += [_Part("kidney", [bean], label, minus=[hilum]),
                  _Part("medulla", [bean.shrunk(9)], None, within=label)]
    parts.append(_Part("bile", [gallbladder.ellipsoid((0, 0, 0), (14, 16, 30), (35, -15, 0))], GA))
    return parts


def _middle_organs(rng: np.random.Generator) -> list[_Part]:
    """Duodenum (background), pancreas, vessels, esophagus, adrenals, painted over the upper organs."""
    centre = _Frame(rng, (0, 0, 0), shift_mm=4.0, scale_sd=0.05, angle_deg=3.0)
    duodenum = centre.tube([(8, -42, 6), (-30, -30, 8), (-52, -5, -5), (-50, 10, -35), (-25, 20, -50),
                            (5, 20, -48), (25, 10, -40)], 12)
    pancreas = centre.tube([(-30, 8, -8), (-15, 6, 2), (0, 6, 8), (25, 10, 16), (50, 16, 25), (72, 24, 34)],
                           [16, 13, 10, 11, 10, 9])
    aorta = centre.tube([(10, 40, 130), (12, 38, 80), (14, 36, 20), (13, 34, -40), (11, 32, -95)],
                        [11, 11, 10.5, 10, 9.5])
    iliac_arteries = [centre.tube([(11, 32, -95), (side * 40 + 8, 28, -135)], 7) for side in (-1, 1)]
    sma = centre.tube([(13, 30, 25), (8, 5, 5), (5, -10, -60)], 4)
    ivc = centre.tube([(-14, 30, 130), (-18, 34, 80), (-22, 36, 30), (-22, 38, -30), (-18, 40, -95)], 10.5)
    iliac_veins = [centre.tube([(-18, 40, -95), (side * 40 - 10, 38, -135)], 8) for side in (-1, 1)]
    veins = [centre.tube([(68, 36, 38), (45, 30, 28), (15, 23, 18), (-6, 19, 12)], 5.5),  # splenic
             centre.tube([(-6, 19, 12), (-20, 14, 28), (-38, 10, 42)], [7.5, 7.5, 7]),  # portal
             centre.tube([(-38, 10, 42), (-70, 18, 50)], 5), centre.tube([(-38, 10, 42), (-15, 0, 55)], 4.5)]
    esophagus = centre.tube([(5, 18, 130), (10, 16, 100), (20, 13, 78), (34, 10, 66)], 8)
    parts = [_Part("bowel_wall", [duodenum]), *_hollow(rng, [duodenum], None, 3, ["fluid", "gas", "food"]),
             _Part("pancreas", [pancreas], PA),
             _Part("artery", iliac_arteries + [sma]), _Part("vein", iliac_veins),
             _Part("vein", [ivc], IVC), _Part("artery", [aorta], AO), _Part("portal", veins, PSV),
             _Part("esophagus", [esophagus], ES)]
    if rng.random() < 0.5:
        parts.append(_Part("gas", [esophagus.shrunk(5.5)], None, within=ES))
    for label, anchor, spread in ((RAG, (-42, 38, 48), (-25, 25)), (LAG, (40, 30, 42), (-30, 20))):
        adrenal = _Frame(rng, anchor, shift_mm=4.0)
        # Two thin limbs (3.5 mm half-thickness) spreading backwards from a common apex, 30 mm tall.
        limbs = [adrenal.ellipsoid(_rotation((0, 0, angle)) @ (0, 11, 0), (3.5, 11, 15), (0, 0, angle), wobble=0.08)
                 for angle in spread]
        parts.append(_Part("adrenal", limbs, label))
    return parts


def _tissue_values(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-case HU and texture amplitude of each tissue (indexed by tissue id): the contrast phase
    scales all enhancement, and each enhancing tissue gets its own offset."""
    phase = rng.uniform(0.7, 1.15)
    base, enhancement, texture = (np.array(column, dtype=float) for column in zip(*_TISSUES.values()))
    offsets = rng.normal(0, 6, len(base)) * (enhancement > 0)
    return base + phase * enhancement + offsets, texture


# ------------------------------------------------------------------------------------------------ rendering


def _scan_grid(rng: np.random.Generator, shape: Sequence[int]) -> tuple[np.ndarray, Geometry]:
    """Scanner coordinates (3, D, H, W) in mm (x, y, z) centred on the field of view, and its geometry.

    The world geometry (written to NIfTI) is deliberately unusual: a tilted direction and an offset origin.
    """
    size_xyz = np.array(shape[::-1])
    spacing = FIELD_OF_VIEW_MM * rng.uniform(0.92, 1.08) / size_xyz
    spacing[2] *= rng.uniform(0.9, 1.1)
    axes = [(np.arange(n) + 0.5 - n / 2) * s for n, s in zip(size_xyz, spacing)]
    z, y, x = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    direction = _rotation((rng.uniform(-10, 10), 0, rng.uniform(-5, 5)))
    centre = rng.normal((0, -150, -300), (20, 20, 40))
    origin = centre - direction @ ((size_xyz - 1) / 2 * spacing)
    geometry = Geometry(tuple(int(n) for n in size_xyz), tuple(spacing.tolist()), tuple(origin.tolist()),
                        tuple(direction.ravel().tolist()))
    return np.stack([x, y, z]).astype(np.float32), geometry


def _varied_scan_grid(rng: np.random.Generator, coarsen: float) -> tuple[np.ndarray, Geometry]:
    """As :func:`_scan_grid`, for a scan of random extent and spacing (the ``VARIED_*`` ranges, every
    spacing times ``coarsen``): its size follows from them, and in a long scan the abdomen sits anywhere
    in the middle half of the extra length."""
    in_plane = rng.uniform(*VARIED_IN_PLANE_SPACING_MM) * coarsen
    spacing = np.array([in_plane, in_plane, rng.uniform(*VARIED_SLICE_SPACING_MM) * coarsen])
    fov, z_extent = rng.uniform(*VARIED_IN_PLANE_FOV_MM), rng.uniform(*VARIED_Z_EXTENT_MM)
    size_xyz = np.maximum(2, np.round(np.array([fov, fov, z_extent]) / spacing)).astype(int)
    axes = [(np.arange(n) + 0.5 - n / 2) * s for n, s in zip(size_xyz, spacing)]
    axes[2] += rng.uniform(-0.25, 0.25) * (z_extent - VARIED_Z_EXTENT_MM[0])
    z, y, x = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    direction = _rotation((rng.uniform(-10, 10), 0, rng.uniform(-5, 5)))
    origin = rng.normal((0, -150, -300), (20, 20, 40)) - direction @ ((size_xyz - 1) / 2 * spacing)
    geometry = Geometry(tuple(int(n) for n in size_xyz), tuple(spacing.tolist()), tuple(origin.tolist()),
                        tuple(direction.ravel().tolist()))
    return np.stack([x, y, z]).astype(np.float32), geometry


def _smooth_field(rng: np.random.Generator, wavelengths_mm: tuple[float, float],
                  modes: int) -> Callable[[np.ndarray], np.ndarray]:
    """A random smooth function of position (3, ...) → (...): a sum of unit-amplitude plane waves."""
    directions = rng.normal(size=(modes, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    waves = (2 * np.pi / rng.uniform(*wavelengths_mm, modes)[:, None] * directions).astype(np.float32)
    phases = rng.uniform(0, 2 * np.pi, modes).astype(np.float32)
    return lambda coords: sum(np.sin(np.tensordot(w, coords, 1) + p) for w, p in zip(waves, phases)) / np.sqrt(modes)


def _anatomical_coordinates(rng: np.random.Generator, scanner: np.ndarray) -> np.ndarray:
    """Where each voxel falls in the canonical abdomen: patient size, pose and position, plus a smooth
    deformation of about 6 mm. (3, D, H, W) → (3, N) float32."""
    scale = rng.uniform(0.9, 1.1) * rng.uniform(0.95, 1.05, 3)
    rotation = _rotation(rng.normal(0, (2, 2, 4)))
    shift = rng.normal(0, (10, 8, 15))
    points = scanner.reshape(3, -1)
    rotation, shift, scale = (a.astype(np.float32) for a in (rotation, shift[:, None], scale[:, None]))
    anatomy = (rotation.T @ (points - shift)) / scale
    for axis in range(3):
        anatomy[axis] += 6.0 * _smooth_field(rng, (150, 400), 4)(points)
    return anatomy


def _paint(parts: Sequence[_Part], coords: np.ndarray, regions: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Tissue ids and labels (N,) from the parts painted in order (later parts cover earlier ones)."""
    tissue = np.full(coords.shape[1], _TISSUE_IDS["air"], dtype=np.uint8)
    label = np.zeros(coords.shape[1], dtype=np.uint8)
    for part in parts:
        mask = _mask(part.shapes, coords) if part.shapes else np.ones(coords.shape[1], dtype=bool)
        if part.minus:
            mask &= ~_mask(part.minus, coords)
        if part.region is not None:
            mask &= regions[part.region]
        if part.within is not None:
            mask &= label == part.within
        if part.condition is not None:
            mask[mask] = part.condition(coords[:, mask])
        tissue[mask] = _TISSUE_IDS[part.tissue]
        if part.label is not None:
            label[mask] = part.label
    return tissue, label


def make_phantom_case(seed: int, index: int, shape: Sequence[int] = DEFAULT_SHAPE,
                      varied: float | None = None) -> PhantomCase:
    """Generate case ``index`` of the phantom data set with ``seed`` at ``shape`` (D, H, W); or, with
    ``varied`` (a factor on every spacing), a scan of random extent and spacing (:func:`_varied_scan_grid`)."""
    anatomy_seed, noise_seed = np.random.SeedSequence([seed, index]).spawn(2)
    rng = np.random.default_rng(anatomy_seed)
    if varied is None:
        scanner, geometry = _scan_grid(rng, tuple(int(n) for n in shape))
    else:
        scanner, geometry = _varied_scan_grid(rng, varied)
    shape = scanner.shape[1:]
    coords = _anatomical_coordinates(rng, scanner)

    torso, outlines = _torso(rng)
    regions = {name: _mask([outline], coords) for name, outline in outlines.items()}
    regions["wall"] &= ~regions["cavity"]
    parts = torso + _spine_and_muscles(rng) + _bowel(rng) + _upper_organs(rng) + _middle_organs(rng)
    tissue, label = _paint(parts, coords, regions)
    # The patient table: a band under the body, fixed in scanner coordinates.
    scanner_y = scanner[1].reshape(-1)
    back = scanner_y[regions["body"]].max(initial=0.0)
    tissue[(scanner_y > back + 8) & (scanner_y < back + 16) & ~regions["body"]] = _TISSUE_IDS["table"]

    hu, texture_hu = _tissue_values(rng)
    bias = rng.uniform(8, 25) * _smooth_field(rng, (400, 900), 3)(scanner)
    noise_rng = np.random.default_rng(noise_seed)
    texture = _unit_noise(noise_rng, shape, sigma=1.2)
    image = (hu[tissue] + texture_hu[tissue] * texture.ravel()).astype(np.float32).reshape(shape)
    image = ndimage.gaussian_filter(image, 0.6)  # partial volume: edges are not steps
    image += bias + rng.uniform(8, 22) * _unit_noise(noise_rng, shape, sigma=0.6)
    image = np.clip(image, -1024, 3071).astype(np.float32)
    return PhantomCase(image, label.reshape(shape), geometry)


def _unit_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian noise smoothed by ``sigma`` voxels (spatially correlated, like CT noise), unit standard deviation."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return noise / noise.std()


# ------------------------------------------------------------------------------------------------ data set


def case_id(index: int) -> str:
    return f"case_{index + 1:04d}"


def generate_phantom(
    out: str | Path,
    cases: int = DEFAULT_CASES,
    shape: Sequence[int] = DEFAULT_SHAPE,
    seed: int = 0,
    labeled_percent: float = 20.0,
    *,
    nifti: bool = False,
    workers: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a phantom data set in the prepared layout (INTERFACES.md) into ``out``.

    Splits follow Synapse's proportions (20 train / 4 eval / 6 test of 30; ``labeled_percent`` of train
    labeled), drawn with ``seed``. With ``nifti`` the cases are also written as an nnU-Net-style
    folder ``out/nifti`` (imagesTr/<id>_0000.nii.gz, labelsTr/<id>.nii.gz, dataset.json) in their
    unusual scan geometry, which ``skcdf prepare nifti`` turns back into the same data set.

    Raises:
        InputError: ``out`` is not empty (and not ``overwrite``), or too few cases for the splits.
    """
    ids = [case_id(i) for i in range(cases)]
    counts = counts_from_fractions(cases, SYNAPSE_SPLIT)
    splits = make_splits(ids, [], counts, labeled_percent, seed, source=f"phantom of {cases} cases")
    with staged_output_dir(out, overwrite) as staging:
        job = functools.partial(_write_phantom_case, out=staging, seed=seed, shape=tuple(shape), nifti=nifti)
        map_cases(job, list(range(cases)), workers, desc="phantom")
        for name, members in splits.items():
            write_split(staging, name, members)
        write_dataset_info(staging, dataset_info("phantom", SYNAPSE_NAMES, shape, CT_WINDOW, "CT", SYNAPSE_ABBREVS))
        if nifti:
            _write_nnunet_dataset_json(staging / "nifti", cases)
    return Path(out)


def _write_phantom_case(index: int, out: Path, seed: int, shape: tuple[int, int, int], nifti: bool) -> None:
    case = make_phantom_case(seed, index, shape)
    write_case(out, case_id(index), case.image, case.label, case.geometry)
    if nifti:
        _write_nifti_case(case, out / "nifti", case_id(index))


def _write_nifti_case(case: PhantomCase, folder: Path, name: str) -> None:
    """``folder/imagesTr/<name>_0000.nii.gz`` and ``folder/labelsTr/<name>.nii.gz`` in the case's scan geometry."""
    for array, path in ((case.image, folder / "imagesTr" / f"{name}_0000.nii.gz"),
                        (case.label, folder / "labelsTr" / f"{name}.nii.gz")):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(case.geometry.spacing)
        image.SetOrigin(case.geometry.origin)
        image.SetDirection(case.geometry.direction)
        with atomic_path(path) as tmp:
            sitk.WriteImage(image, str(tmp), useCompression=True)


def generate_varied_phantom(out: str | Path, cases: int = DEFAULT_CASES, seed: int = 0, coarsen: float = 4.0, *,
                            workers: int | None = None, overwrite: bool = False) -> Path:
    """Write a raw nnU-Net-style phantom data set of scans of varying extent and spacing into ``out``
    (imagesTr/, labelsTr/, dataset.json), for ``skcdf prepare nifti OUT PREPARED --spacing auto``.

    Each scan covers 240 mm (abdomen) to 650 mm (chest-abdomen-pelvis) along z and 340-500 mm in-plane
    (the wide ones padded with air and the table), at 0.6-1.0 mm in-plane and 1-5 mm slice spacing, every
    spacing times ``coarsen`` (1: clinical sizes, up to ~830×830×650 voxels; the default 4 keeps a case
    near a million voxels).

    Raises:
        InputError: ``out`` is not empty (and not ``overwrite``).
    """
    with staged_output_dir(out, overwrite) as staging:
        job = functools.partial(_write_varied_case, out=staging, seed=seed, coarsen=coarsen)
        map_cases(job, list(range(cases)), workers, desc="phantom")
        _write_nnunet_dataset_json(staging, cases)
    return Path(out)


def _write_varied_case(index: int, out: Path, seed: int, coarsen: float) -> None:
    _write_nifti_case(make_phantom_case(seed, index, varied=coarsen), out, case_id(index))


def _write_nnunet_dataset_json(folder: Path, cases: int) -> None:
    info = {"name": "phantom", "channel_names": {"0": "CT"},
            "labels": {name: value for value, name in enumerate(SYNAPSE_NAMES)},
            "numTraining": cases, "file_ending": ".nii.gz"}
    atomic_write_text(folder / "dataset.json", json.dumps(info, indent=2) + "\n")
