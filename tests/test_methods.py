"""The registry of methods is the one place that names them."""

import re
from pathlib import Path

from skcdf import methods
from skcdf.ablate import plan_rows
from skcdf.demo import demo_runs
from skcdf.train.config import resolve_config

SRC = Path(__file__).resolve().parents[1] / "src" / "skcdf"


def test_every_method_resolves_to_its_switches_and_a_known_step():
    for name, method in methods.METHODS.items():
        assert method.name == name and method.step in methods.STEP_KINDS
        resolved = resolve_config({"variant": name})
        assert {key: getattr(resolved, key) for key in method.switches()} == method.switches()
    assert methods.MAIN in methods.METHODS and methods.REFERENCE in methods.METHODS


def test_ablate_and_demo_read_the_registry():
    assert [row.title for row in plan_rows(methods.ablation_names())] == [
        methods.METHODS[name].title for name in methods.ablation_names()]
    runs = demo_runs()
    assert [run.method.name for run in runs][0] == methods.MAIN and methods.REFERENCE in [r.method.name for r in runs]
    assert [run.run for run in runs] == ["run", "run-" + methods.REFERENCE.replace("_", "-")]


def test_no_source_module_but_the_registry_names_a_method():
    names = [name for name in methods.METHODS if "_" in name]  # the short ones ("df", "full") are words too
    pattern = re.compile("|".join(rf"(?<![\w]){re.escape(name)}(?![\w])" for name in names))
    registry = SRC / "methods" / "__init__.py"
    offenders = [f"{path.relative_to(SRC)}: {match.group()}" for path in SRC.rglob("*.py") if path != registry
                 for match in pattern.finditer(path.read_text())]
    assert not offenders, offenders


def test_table1_expands_to_the_comparison_rows_in_order():
    rows = methods.expand([methods.TABLE1, methods.MAIN])
    assert rows == methods.comparison_names() and rows[0] == methods.REFERENCE and rows[-1] == methods.UPPER
    assert rows[1:-2] == methods.plugin_names() and len(rows) == len(set(rows)) == 3 + len(methods.plugin_names())
    assert all(methods.METHODS[name].plugin for name in methods.plugin_names())
