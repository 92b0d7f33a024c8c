"""The package's layers: no module imports a layer above its own (DESIGN.md "The shape"), and no import cycles."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "medsam2_endpoint"
ROOT = "medsam2_endpoint"

# What each layer may import from the package (besides itself). Lower layers first.
ALLOWED: dict[str, set[str]] = {
    "base": set(),
    "contract": {"base"},
    "io": {"base"},
    "engines": {"base"},
    "pipeline": {"base", "io", "engines"},
    "core": {"base", "contract", "io", "engines", "pipeline"},
    "api": {"base", "contract", "core", "io"},
    "client": {"base", "io"},
    "testing": {"base", "contract", "io", "engines", "pipeline"},
}
# The command line is the developer's entry point: its `samples` command writes the sample requests.
EXCEPTIONS = {("api", "cli.py", "testing"), ("api", "cli.py", "client")}



def module_name(path: Path, package: Path = PACKAGE) -> str:
    """The dotted name of a module file under `package` (a package's __init__.py is the package itself)."""
    parts = [package.name, *path.relative_to(package).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def imports(path: Path, package: Path = PACKAGE) -> list[tuple[str, list[str]]]:
    """Every import in a module, anywhere in it (functions and `if TYPE_CHECKING:` blocks too), as (module,
    names): `import a.b` is ("a.b", []), `from a import b, c` is ("a", ["b", "c"]); relative imports are
    resolved against the module's own location."""
    tree = ast.parse(path.read_text(), filename=str(path))
    own = module_name(path, package).split(".")
    is_package = path.name == "__init__.py"
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # `.` is the module's own package: its parent for a module, itself for an __init__.py
                base = own[: len(own) - node.level + (1 if is_package else 0)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            found.append((source, [alias.name for alias in node.names]))
    return found


def imported_layers(path: Path, package: Path = PACKAGE) -> set[str]:
    """The package layers a module imports (`from medsam2_endpoint import x`: x is the layer)."""
    layers = set()
    for source, names in imports(path, package):
        for name in [source] if source != package.name else [f"{source}.{n}" for n in names]:
            parts = name.split(".")
            if parts[0] == package.name and len(parts) > 1:
                layers.add(parts[1])
    return layers


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports. `from x import y` points at x.y when that is a module, else
    at x. The parent packages a dotted import runs on the way are not edges: a cycle is between modules named."""
    modules = package_modules(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for source, names in imports(path, package):
            for target in [f"{source}.{n}" if f"{source}.{n}" in modules else source for n in names] or [source]:
                if target in modules and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def find_cycle(graph: Mapping[str, Iterable[str]], ignored_pairs: Iterable[frozenset[str]] = ()) -> list[str] | None:
    """One import cycle as [a, b, ..., a], found by depth-first search, or None. Edges between the two modules
    of an ignored pair are skipped (both directions), so a known cycle hides no other one."""
    skip = set(ignored_pairs)
    white, grey, black = 0, 1, 2
    colour = {node: white for node in graph}
    for start in sorted(graph):
        if colour[start] != white:
            continue
        # iterative DFS: stack of (node, its remaining successors); `path` is the grey chain
        path = [start]
        colour[start] = grey
        stack = [(start, iter(sorted(graph[start])))]
        while stack:
            node, successors = stack[-1]
            advanced = False
            for succ in successors:
                if frozenset({node, succ}) in skip or succ not in colour:
                    continue
                if colour[succ] == grey:
                    return [*path[path.index(succ) :], succ]
                if colour[succ] == white:
                    colour[succ] = grey
                    path.append(succ)
                    stack.append((succ, iter(sorted(graph[succ]))))
                    advanced = True
                    break
            if not advanced:
                colour[node] = black
                path.pop()
                stack.pop()
    return None


def layer_of(path: Path) -> str | None:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else None


def test_every_module_sits_in_a_layer_folder() -> None:
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules outside a layer folder: {loose}"
    layers = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert layers == set(ALLOWED), f"layer folders {sorted(layers)} differ from the declared {sorted(ALLOWED)}"


def test_no_layer_imports_a_higher_one() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = layer_of(path)
        if layer is None:
            continue
        for target in imported_layers(path) - {layer, "__version__"}:
            if target not in ALLOWED[layer] and (layer, path.name, target) not in EXCEPTIONS:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_the_checker_sees_relative_and_absolute_imports(tmp_path: Path) -> None:
    """The walker must catch both spellings, or the test above could pass on a violation."""
    package = tmp_path / ROOT
    (package / "engines").mkdir(parents=True)
    probe = package / "engines" / "probe.py"
    probe.write_text("from ..core import service\nimport medsam2_endpoint.api.samapi\nfrom medsam2_endpoint import pipeline\n")
    assert imported_layers(probe, package) == {"core", "api", "pipeline"}


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle (imports inside functions count): " + " -> ".join(cycle or [])


def test_the_cycle_finder_reports_other_cycles_past_a_known_pair(tmp_path: Path) -> None:
    """On a synthetic package: the known pair is skipped, a three-module cycle through a function-level
    import is still found and named, and an acyclic package passes."""
    package = tmp_path / ROOT
    (package / "api").mkdir(parents=True)
    (package / "core").mkdir()
    for init in (package / "__init__.py", package / "api" / "__init__.py", package / "core" / "__init__.py"):
        init.write_text("")
    (package / "api" / "batch.py").write_text("from medsam2_endpoint.api import batch_worker\n")
    (package / "api" / "batch_worker.py").write_text("def f():\n    from .batch import x\n")
    (package / "core" / "a.py").write_text("from . import b\n")
    (package / "core" / "b.py").write_text("import medsam2_endpoint.core.c\n")
    (package / "core" / "c.py").write_text("def late():\n    from ..core.a import thing\n")
    graph = import_graph(package)
    assert graph[f"{ROOT}.api.batch_worker"] == {f"{ROOT}.api.batch"}
    assert find_cycle(graph) is not None  # the pair alone is a cycle
    known = {frozenset({f"{ROOT}.api.batch", f"{ROOT}.api.batch_worker"})}
    cycle = find_cycle(graph, known)
    assert cycle == [f"{ROOT}.core.a", f"{ROOT}.core.b", f"{ROOT}.core.c", f"{ROOT}.core.a"]
    (package / "core" / "c.py").write_text("def late():\n    pass\n")
    assert find_cycle(import_graph(package), known) is None


def test_serving_code_never_imports_test_tooling() -> None:
    serving = [p for p in PACKAGE.rglob("*.py") if layer_of(p) not in (None, "testing") and p.name != "cli.py"]
    offenders = [str(p.relative_to(PACKAGE)) for p in serving if "testing" in imported_layers(p)]
    assert not offenders, f"serving modules importing medsam2_endpoint.testing: {offenders}"
