"""The package's layers: no module imports a layer above its own (DESIGN.md "The shape")."""

from __future__ import annotations

import ast
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


def imported_layers(path: Path) -> set[str]:
    """The package layers a module imports, relative imports resolved against its own location."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module_parts = [ROOT, *path.relative_to(PACKAGE).with_suffix("").parts]
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module_parts[: len(module_parts) - node.level]
                names = [".".join([*base, node.module] if node.module else base)]
            else:
                names = [node.module or ""]
            if names[0] in (ROOT, f"{ROOT}."):  # `from medsam2_endpoint import x`: x is the layer
                names = [f"{ROOT}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == ROOT and len(parts) > 1:
                found.add(parts[1])
    return found


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
    target = PACKAGE / "engines" / "_probe_for_layer_test.py"
    target.write_text("from ..core import service\nimport medsam2_endpoint.api.samapi\nfrom medsam2_endpoint import pipeline\n")
    try:
        assert imported_layers(target) == {"core", "api", "pipeline"}
    finally:
        target.unlink()


def test_serving_code_never_imports_test_tooling() -> None:
    serving = [p for p in PACKAGE.rglob("*.py") if layer_of(p) not in (None, "testing") and p.name != "cli.py"]
    offenders = [str(p.relative_to(PACKAGE)) for p in serving if "testing" in imported_layers(p)]
    assert not offenders, f"serving modules importing medsam2_endpoint.testing: {offenders}"
