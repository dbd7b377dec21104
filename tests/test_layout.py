"""The package's layout holds: no import cycle under spartan/ (imports inside functions count too), and the library
outside spartan/train/ imports neither the trainer nor Hydra, W&B or data code."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "spartan"
TRAINER_ONLY = ("spartan.train", "hydra", "omegaconf", "wandb", "ffcv", "webdataset", "torchvision", "timm", "sklearn")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported_names(path: Path) -> set[str]:
    """Every module name an ``import`` statement in ``path`` names, at any depth (``from a import b`` gives
    ``a.b`` when that is a module, else ``a``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the package uses absolute imports)"
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                names.add(full if full in MODULES else node.module)
    return names


def dependencies(name: str) -> set[str]:
    """The modules of this package ``name`` imports."""
    found = set()
    for imported in imported_names(MODULES[name]):
        while imported and imported not in MODULES:
            imported = imported.rpartition(".")[0]
        if imported and imported != name:
            found.add(imported)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return stack[stack.index(child) :] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_under_spartan():
    graph = {name: dependencies(name) for name in MODULES}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_library_imports_no_trainer_hydra_wandb_or_data_code():
    for name, path in MODULES.items():
        if name.startswith("spartan.train"):
            continue
        bad = sorted(n for n in imported_names(path) if n.split(".")[0] in TRAINER_ONLY or n.startswith(TRAINER_ONLY))
        assert not bad, f"{name} imports {bad}"


# Import names whose distribution (pyproject.toml) is named differently.
DISTRIBUTIONS = {"sklearn": "scikit-learn", "PIL": "pillow", "cv2": "opencv-python", "hydra": "hydra-core"}
USED_IF_INSTALLED = {"cupy"}  # imported under try/except ImportError: FFCV's GPU normalization when present
OPTIONAL_LIBRARY = {"spartan.onnx_export": "export"}  # library modules that need an extra's packages
OPTIONAL_LOADERS = {
    "ffcv": ("spartan.train.data.ffcv_", "ffcv"),
    "webdataset": ("spartan.train.data.webdataset_", "webdataset"),
    "plots": ("spartan.train.reports", "matplotlib"),  # imported by the functions that draw
}


def declared() -> dict[str, set[str]]:
    """pyproject.toml's dependencies (``core``) and extras, as distribution names (self-references expanded)."""
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"core": project["dependencies"], **project["optional-dependencies"]}
    names = {
        g: {re.split(r"[<>=\[ ]", req)[0] for req in reqs if not req.startswith("spartan")}
        for g, reqs in groups.items()
    }
    for group, reqs in groups.items():
        for req in reqs:
            if req.startswith("spartan["):
                for extra in req[len("spartan[") : -1].split(","):
                    names[group] |= names[extra]
    return names


def third_party(name: str) -> set[str]:
    import sys

    tops = {n.split(".")[0] for n in imported_names(MODULES[name])}
    return {DISTRIBUTIONS.get(t, t) for t in tops if t != "spartan" and t not in sys.stdlib_module_names}


def test_pyproject_declares_what_each_part_imports():
    extras = declared()
    for name in MODULES:
        needed = third_party(name)
        if not name.startswith("spartan.train"):
            group = OPTIONAL_LIBRARY.get(name, "core")
        else:
            group = next((extra for extra, (prefix, _) in OPTIONAL_LOADERS.items() if name.startswith(prefix)), "train")
        missing = needed - extras[group] - extras["core"] - USED_IF_INSTALLED
        assert not missing, f"{name} imports {sorted(missing)}, not declared for pyproject extra {group!r}"
