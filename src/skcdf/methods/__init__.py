"""The methods: the registry of what can be trained (SKCDF, its ablation variants, the two supervised
references, SPEC §3, and the paper's Table 1 methods), and, in submodules, the Table 1 methods
themselves (``cps``, ``uamt``, ``dhc``, ``dst``, …: each checked against DHC's public code,
docs/methods.md), plugged into the trainer through :mod:`skcdf.methods.plugin`.

This is the one place a method is defined, and the one module that names methods. A method is its
switches (the defaults of the configuration keys ``skcm``, ``aux_heads``, ``shared_decoder`` and
``ema_order``), the step it trains with, the split its labeled cases come from, its title in tables,
and whether ``skcdf ablate`` and ``skcdf demo`` run it by default. The configuration
(:mod:`skcdf.train.config`), the trainer, :mod:`skcdf.ablate`, :mod:`skcdf.demo` and the CLI read it
from here.

To add a method: write its module here, ending with a :class:`~skcdf.methods.plugin.Recipe` (its
networks, state, step and test-time rule; ``cps.py`` is the shortest example), then add one
:class:`Method` below with ``step="plugin"`` and ``module`` naming that file. (An SKCDF variant is a
new combination of switches with the ``semi`` step of :mod:`skcdf.train.step`.) Nothing else holds
method names.

This module imports nothing heavy: the CLI reads it to build ``--help``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: How a method trains: the two-flow SKCDF step or the labeled loss alone (:mod:`skcdf.train.step`), or
#: a Table 1 method's own step (:mod:`skcdf.methods.plugin`).
STEP_KINDS = ("semi", "supervised", "plugin")


@dataclass(frozen=True)
class Method:
    """One trainable method and everything the rest of skcdf needs to know about it."""

    name: str                 # the configuration's ``variant`` value and the run folders' name
    title: str                # row title in result tables (ablation.md, comparisons)
    step: str                 # "semi", "supervised" or "plugin" (STEP_KINDS)
    skcm: bool                # defaults of the four method switches (docs/configuration.md)
    aux_heads: bool
    shared_decoder: bool
    ema_order: str
    labeled_split: str = "labeled_split"  # configuration key of the split its labeled cases come from
    ablation: bool = False                # one of `skcdf ablate`'s default rows
    demo_title: str | None = None         # title in `skcdf demo`'s report; None: the demo does not run it
    module: str | None = None             # plug-ins: the module of skcdf.methods that holds its Recipe
    paper: str | None = None              # plug-ins: the paper, for docs/methods.md and tables
    # plug-ins: its step runs on an empty unlabeled batch (``batch_unlabeled: 0``) at ``method_weight: 0``
    trains_without_unlabeled: bool = False

    @property
    def semi(self) -> bool:
        """Whether it trains on unlabeled cases too."""
        return self.step != "supervised"

    @property
    def plugin(self) -> bool:
        """Whether it is a Table 1 method with its own networks and step (:mod:`skcdf.methods.plugin`)."""
        return self.step == "plugin"

    @property
    def control(self) -> dict[str, Any] | None:
        """The settings that make it its own control (``skcdf ablate --controls``): the same networks,
        supervised loss, batches and test-time rule without the unlabeled loss. None for a supervised method."""
        if self.plugin:
            return {"method_weight": 0}
        return {"lambda_u": 0} if self.semi else None

    def switches(self) -> dict[str, bool | str]:
        """Defaults of the four method switches, by configuration key."""
        return {"skcm": self.skcm, "aux_heads": self.aux_heads, "shared_decoder": self.shared_decoder,
                "ema_order": self.ema_order}


_SUPERVISED = dict(step="supervised", skcm=False, aux_heads=False, shared_decoder=True, ema_order="none")
# the SKCDF switches do not apply to a plug-in; they resolve to the plain network's
_PLUGIN = dict(step="plugin", skcm=False, aux_heads=False, shared_decoder=True, ema_order="none")

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
    # the paper's Table 1 methods, in its order, as DHC's code base trains them (GenericSSL: as its own code
    # base does; docs/methods.md)
    *(Method(name, title, module=module, paper=paper, trains_without_unlabeled=without, **_PLUGIN)
      for name, title, module, paper, without in (
        # without: its step takes an empty unlabeled batch at weight 0 (URPC's, DST's, Basak's, DHC's and
        # GenericSSL's unlabeled terms average over no voxels, which is NaN even at weight 0)
        ("uamt", "UA-MT", "uamt", "Yu et al., MICCAI 2019", True),
        ("urpc", "URPC", "urpc", "Luo et al., MICCAI 2021", False),
        ("cps", "CPS", "cps", "Chen et al., CVPR 2021", True),
        ("ssnet", "SS-Net", "ssnet", "Wu et al., MICCAI 2022", True),
        ("dst", "DST", "dst", "Chen et al., NeurIPS 2022", False),
        ("depl", "DePL", "depl", "Wang et al., CVPR 2022", True),
        ("adsh", "Adsh", "adsh", "Guo & Li, ICML 2022", True),
        ("crest", "CReST", "crest", "Wei et al., CVPR 2021", True),
        ("simis", "SimiS", "simis", "Chen et al., arXiv 2022", True),
        ("basak", "Basak et al.", "acisis", "Basak et al., MICCAI 2022", False),
        ("cld", "CLD", "cld", "Lin et al., MICCAI 2022", True),
        ("dhc", "DHC", "dhc", "Wang & Li, MICCAI 2023", False),
        ("genericssl", "GenericSSL", "genericssl", "Wang & Li, NeurIPS 2023", False),
    )),
)}

#: SKCDF itself: the default ``variant``, and the method of the ablations' extra rows (EMA orders, ...).
MAIN: str = "full"
#: The method others are compared against (ablation comparison, demo report).
REFERENCE: str = "labeled_only"
#: Every training case labeled: the upper bound.
UPPER: str = "fully_supervised"
#: What `skcdf ablate --variants table1` expands to (comparison_names).
TABLE1: str = "table1"


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


def plugin_names() -> list[str]:
    """The paper's Table 1 methods, in its order."""
    return [name for name, m in METHODS.items() if m.plugin]


def comparison_names() -> list[str]:
    """The rows of the methods table: labeled-only, the Table 1 methods, SKCDF, fully supervised."""
    return [REFERENCE, *plugin_names(), MAIN, UPPER]


def expand(names: list[str]) -> list[str]:
    """Method names as given, with ``table1`` replaced by :func:`comparison_names` (order kept, no repeats)."""
    expanded = [n for name in names for n in (comparison_names() if name == TABLE1 else [name])]
    return list(dict.fromkeys(expanded))


def title(name: str) -> str:
    """A method's title in tables; an unregistered name stands for itself."""
    return METHODS[name].title if name in METHODS else name
