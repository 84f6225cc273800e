"""The methods: the registry of what can be trained (SKCDF, its ablation variants and the two
supervised references, SPEC §3), and, in submodules, the steps of the paper's Table 1 baselines
(``cps``, ``uamt``, ``dhc``, ``dst``, …: each checked against DHC's public code, docs/methods.md; not
registered yet).

This is the one place a method is defined, and the one module that names methods. A method is its
switches (the defaults of the configuration keys ``skcm``, ``aux_heads``, ``shared_decoder`` and
``ema_order``), the step it trains with, the split its labeled cases come from, its title in tables,
and whether ``skcdf ablate`` and ``skcdf demo`` run it by default. The configuration
(:mod:`skcdf.train.config`), the trainer, :mod:`skcdf.ablate`, :mod:`skcdf.demo` and the CLI read it
from here.

To add a method: write its step, if it is new, in :mod:`skcdf.train.step` (and name it in
``STEPS`` there), then add one :class:`Method` below. Nothing else holds method names.

This module imports nothing heavy: the CLI reads it to build ``--help``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The step families of :mod:`skcdf.train.step`: the two-flow SKCDF step, and the labeled loss alone.
STEP_KINDS = ("semi", "supervised")


@dataclass(frozen=True)
class Method:
    """One trainable method and everything the rest of skcdf needs to know about it."""

    name: str                 # the configuration's ``variant`` value and the run folders' name
    title: str                # row title in result tables (ablation.md, comparisons)
    step: str                 # "semi" or "supervised" (STEP_KINDS)
    skcm: bool                # defaults of the four method switches (docs/configuration.md)
    aux_heads: bool
    shared_decoder: bool
    ema_order: str
    labeled_split: str = "labeled_split"  # configuration key of the split its labeled cases come from
    ablation: bool = False                # one of `skcdf ablate`'s default rows
    demo_title: str | None = None         # title in `skcdf demo`'s report; None: the demo does not run it

    @property
    def semi(self) -> bool:
        """Whether it trains on unlabeled cases (the two-flow step)."""
        return self.step == "semi"

    def switches(self) -> dict[str, bool | str]:
        """Defaults of the four method switches, by configuration key."""
        return {"skcm": self.skcm, "aux_heads": self.aux_heads, "shared_decoder": self.shared_decoder,
                "ema_order": self.ema_order}


_SUPERVISED = dict(step="supervised", skcm=False, aux_heads=False, shared_decoder=True, ema_order="none")

#: Every method, in the order of the paper's Table 3, then the two references.
METHODS: dict[str, Method] = {method.name: method for method in (
    Method("baseline", "Baseline (pseudo-labelling)", "semi", skcm=False, aux_heads=False, shared_decoder=True,
           ema_order="none", ablation=True),
    Method("df", "+ DF", "semi", skcm=False, aux_heads=False, shared_decoder=False, ema_order="D", ablation=True),
    Method("df_skcm", "+ DF + SKCM", "semi", skcm=True, aux_heads=False, shared_decoder=False, ema_order="D",
           ablation=True),
    Method("df_absh", "+ DF + ABSH", "semi", skcm=False, aux_heads=True, shared_decoder=False,
           ema_order="Hl,D,Hu", ablation=True),
    Method("full", "SKCDF", "semi", skcm=True, aux_heads=True, shared_decoder=False, ema_order="Hl,D,Hu",
           ablation=True, demo_title="SKCDF (phantom)"),
    # the same network on the labeled cases alone: the lower reference every method is compared with
    Method("labeled_only", "Labeled only (VNet)", ablation=True, demo_title="Labeled only (phantom)", **_SUPERVISED),
    # every training case labeled: the upper bound
    Method("fully_supervised", "Fully supervised (VNet)", labeled_split="train_split", **_SUPERVISED),
)}

#: SKCDF itself: the default ``variant``, and the method of the ablations' extra rows (EMA orders, ...).
MAIN: str = "full"
#: The method others are compared against (ablation comparison, demo report).
REFERENCE: str = "labeled_only"


def method(name: str) -> Method:
    """The registered method ``name``; KeyError names the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r} (known: {', '.join(METHODS)})") from None


def ablation_names() -> list[str]:
    """`skcdf ablate`'s default rows: Table 3 and the labeled-only reference."""
    return [name for name, m in METHODS.items() if m.ablation]


def demo_methods() -> list[Method]:
    """The methods `skcdf demo` trains side by side, SKCDF first."""
    return [m for m in METHODS.values() if m.demo_title is not None]


def title(name: str) -> str:
    """A method's title in tables; an unregistered name stands for itself."""
    return METHODS[name].title if name in METHODS else name
