"""The package dependency graph points one way, down the pipeline (DESIGN.md): every import of a project package,
at module level or inside a function, is checked against what its package may use."""
import ast

import pytest

from tests.helpers import ROOT

# package -> the project packages it may import (itself always allowed)
ALLOWED = {
    "common": set(),
    "kernels": set(),
    "model": {"common", "kernels"},  # kernels only in model/train.py (see below)
    "export": {"common", "model", "kernels"},  # kernels: the ONNX translations of a patched model's ops
    "quantize": {"common", "model", "export"},
    "serve": {"common", "model", "kernels", "export", "quantize"},  # kernels: the torch backend's --kernels
    "bench": {"common", "model", "kernels", "export", "quantize", "serve"},
}
# the one place that composes the model with the kernels (--kernels, --optimizer fused)
MODEL_USES_KERNELS = {"model/train.py"}


def project_imports(path):
    """(line, top-level package) for every absolute import of a project package in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in ALLOWED:
                yield node.lineno, top


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down_the_pipeline(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        allowed = ALLOWED[package] | {package}
        if package == "model" and rel not in MODEL_USES_KERNELS:
            allowed = allowed - {"kernels"}
        bad += [f"{rel}:{line} imports {top}" for line, top in project_imports(path) if top not in allowed]
    assert not bad, "imports against the pipeline's direction:\n" + "\n".join(bad)
