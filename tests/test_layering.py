"""The import structure: layers that only import downwards, no circle, no private names.

Layers, bottom to top (a module imports only from its own layer or below):

0. the core — ``hessian_subspace`` itself and its top-level modules (operators, solvers,
   metrics, sharding, private helpers ``_tree``, ``_io`` ...);
1. ``hessian_subspace.checkpoints`` — the checkpoint format, read by the analysis, written by
   training;
2. ``hessian_subspace.analysis`` and ``hessian_subspace.training`` — side by side, neither
   imports the other;
3. ``hessian_subspace.paper`` — the paper's models, data, experiments and figures, a user of
   everything below;
4. ``launch`` — command-line drivers.

Private modules (``_tree``) are shared inside the project; private *names* (``mod._helper``)
are not used outside their module. Read from the source (``ast``), so it costs no import.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# NamedTuple's own methods start with an underscore and are public API.
NAMEDTUPLE_METHODS = {"_replace", "_asdict", "_fields", "_make"}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for package in ("hessian_subspace", "launch"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _rel(path: pathlib.Path) -> pathlib.Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _layer(module: str) -> tuple[int, str]:
    """(layer, side) of a module; side tells apart the two packages of layer 2."""
    parts = module.split(".")
    if parts[0] == "launch":
        return 4, "launch"
    if len(parts) == 1:
        return 0, "core"
    if parts[1] == "checkpoints":
        return 1, "checkpoints"
    if parts[1] in ("analysis", "training"):
        return 2, parts[1]
    if parts[1] == "paper":
        return 3, "paper"
    if len(parts) == 2 and not (ROOT / "hessian_subspace" / parts[1]).is_dir():
        return 0, "core"
    raise AssertionError(f"{module} is in no layer: add its package to tests/test_layering.py")


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` of every import in ``module``, at
    any depth (an import inside a function is still a dependency)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.append((full, None, node.lineno) if full in MODULES
                           else (base, a.name, node.lineno))
    return [(m, n, line) for m, n, line in out if m.split(".")[0] in ("hessian_subspace",
                                                                       "launch")]


def _internal_edges() -> dict[str, set[str]]:
    """Module -> project modules it imports (a package's ``__init__`` counts as a module)."""
    edges = {}
    for module in MODULES:
        targets = set()
        for target, _, _ in _imports(module):
            while target not in MODULES and "." in target:
                target = target.rpartition(".")[0]
            if target in MODULES and target != module:
                targets.add(target)
        edges[module] = targets
    return edges


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_imports_only_go_down():
    bad = []
    for module in MODULES:
        layer, side = _layer(module)
        for target, _, line in _imports(module):
            while target not in MODULES and "." in target:
                target = target.rpartition(".")[0]
            if target == "hessian_subspace" or target not in MODULES:
                continue  # the package facade (the core's public names)
            other, other_side = _layer(target)
            if other > layer or (other == layer == 2 and other_side != side):
                bad.append(f"{_rel(MODULES[module])}:{line} imports {target} "
                           f"(layer {other} {other_side}, above layer {layer} {side})")
    assert not bad, "\n".join(bad)


def test_no_circular_imports():
    """No cycle among modules (packages' ``__init__`` re-exports left out: they import their
    own modules by design)."""
    edges = {m: {t for t in ts if MODULES[t].name != "__init__.py"}
             for m, ts in _internal_edges().items() if MODULES[m].name != "__init__.py"}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_names_of_other_modules():
    bad = []
    for module, path in MODULES.items():
        for target, name, line in _imports(module):
            if name is not None and name.startswith("_") and not name.startswith("__"):
                bad.append(f"{_rel(path)}:{line} imports {name} from {target}")
        tree = ast.parse(path.read_text(), str(path))
        aliases = {a.asname or a.name: f"{n.module}.{a.name}" if isinstance(n, ast.ImportFrom)
                   else a.name
                   for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                   for a in n.names}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and node.attr not in NAMEDTUPLE_METHODS
                    and str(aliases.get(node.value.id, "")).startswith(
                        ("hessian_subspace", "launch"))):
                bad.append(f"{_rel(path)}:{node.lineno} uses "
                           f"{node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("negative", ["upward", "circle", "private"])
def test_the_checks_catch_what_they_guard(negative, tmp_path, monkeypatch):
    """Negative controls: each check fails on a module written to break it."""
    fake = {
        "upward": ("hessian_subspace.metrics_fake",
                   "from hessian_subspace.analysis import store\n"),
        "circle": ("hessian_subspace.paper.summaries",
                   "from hessian_subspace.paper import reproduce\n"),
        "private": ("hessian_subspace.analysis.views",
                    "from hessian_subspace.analysis.builtins import _flat\n"),
    }[negative]
    module, text = fake
    path = tmp_path / "fake.py"
    path.write_text((MODULES[module].read_text() if module in MODULES else "") + text)
    monkeypatch.setitem(MODULES, module, path)
    check = {"upward": test_imports_only_go_down, "circle": test_no_circular_imports,
             "private": test_no_private_names_of_other_modules}[negative]
    with pytest.raises(AssertionError):
        check()


CORE_TESTS = ["test_api.py", "test_curvature.py", "test_fast_paths.py", "test_ggn.py",
              "test_krylov.py", "test_layering.py", "test_metrics.py", "test_spectrum.py",
              "test_tracker.py"]


def test_the_core_and_its_tests_need_no_flax_optax_orbax_or_tfds():
    """The core's tests build plain-JAX models (``tests/_helpers.py``): with flax, optax,
    orbax and tensorflow-datasets unimportable, the core imports and its tests collect."""
    import subprocess
    import sys

    blocked = ("flax", "optax", "orbax", "orbax.checkpoint", "tensorflow_datasets")
    script = (f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
              "import hessian_subspace, pytest\n"
              "sys.exit(pytest.main(['-q', '--co', '-p', 'no:cacheprovider'] + sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", script,
                           *[str(ROOT / "tests" / t) for t in CORE_TESTS]],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "error" not in proc.stdout.lower().splitlines()[-1], proc.stdout[-2000:]
