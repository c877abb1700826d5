"""Every third-party package that the project's code imports is pinned in requirements.txt."""
import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OURS = {"stages", "tests", "benchmarks"}


def imported_modules(folder: Path) -> set[str]:
    """The top-level names of every module imported anywhere in folder's .py files."""
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_pinned_in_requirements():
    pinned = {normalised(line.split("==")[0]) for line in (REPO / "requirements.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    distributions = packages_distributions()
    imported = set().union(*(imported_modules(REPO / folder) for folder in OURS)) - OURS - set(sys.stdlib_module_names)
    assert {"torch", "numpy", "PIL", "hydra", "safetensors", "pytest"} <= imported  # the walk finds imports
    missing = {module: distributions.get(module, ["(not installed)"]) for module in imported
               if not any(normalised(d) in pinned for d in distributions.get(module, []))}
    assert not missing, f"imported but not pinned in requirements.txt: {missing}"
