"""Each stage's code deps in dvc.yaml are exactly the project modules its command imports."""
import ast
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def project_imports(module: str, root: Path = REPO) -> set[str]:
    """The project modules (stages.*) that `module` imports, transitively, itself included, as paths."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        path = root / (name.replace(".", "/") + ".py")
        if name in seen or not path.exists():
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stages"):
                todo.append(node.module)
                todo.extend(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                todo.extend(alias.name for alias in node.names if alias.name.startswith("stages"))
    return {name.replace(".", "/") + ".py" for name in seen}


def dep_mismatches(dvc_yaml: dict, root: Path = REPO) -> list[str]:
    problems = []
    for name, stage in dvc_yaml["stages"].items():
        module = stage["cmd"].split("python -m ", 1)[1].split()[0]
        imported = project_imports(module, root)
        listed = {dep for dep in stage.get("deps", []) if dep.startswith("stages/") and dep.endswith(".py")}
        problems += [f"{name}: imports {path} but does not list it in deps" for path in sorted(imported - listed)]
        problems += [f"{name}: lists {path} in deps but does not import it" for path in sorted(listed - imported)]
    return problems


def test_every_stage_depends_on_exactly_the_code_it_runs():
    assert dep_mismatches(yaml.safe_load((REPO / "dvc.yaml").read_text())) == []


def test_a_missing_or_extra_dep_is_named(tmp_path):
    stages = tmp_path / "stages"
    stages.mkdir()
    (stages / "first.py").write_text("from stages import helper\nimport stages.other\n")
    (stages / "helper.py").write_text("from stages.pipeline.errors import UserError\n")
    (stages / "other.py").write_text("")
    (stages / "pipeline").mkdir()
    (stages / "pipeline" / "errors.py").write_text("")
    (stages / "unused.py").write_text("")
    dvc_yaml = {"stages": {"first": {"cmd": "python -m stages.first",
                                     "deps": ["data/x", "stages/first.py", "stages/helper.py", "stages/unused.py"]}}}
    assert dep_mismatches(dvc_yaml, tmp_path) == [
        "first: imports stages/other.py but does not list it in deps",
        "first: imports stages/pipeline/errors.py but does not list it in deps",
        "first: lists stages/unused.py in deps but does not import it"]


def test_every_output_in_dvc_yaml_is_one_that_stages_outputs_declares():
    from stages.pipeline import outputs

    declared = {outputs.INPUTS, outputs.PREPARED, outputs.FEATURES, outputs.FEATURES_MADE_FROM, outputs.FEATURE_METRICS,
                outputs.METRICS, *outputs.MODELS.values(), *outputs.LIVE.values()}
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values()
    paths = [Path(next(iter(entry)) if isinstance(entry, dict) else entry)
             for stage in stages for kind in ("outs", "metrics", "plots") for entry in stage.get(kind, [])]
    assert paths and all(path in declared or declared & set(path.parents) or outputs.PLOTS in path.parents
                         for path in paths), paths


def test_no_stage_imports_the_study_tools():
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values():
        module = stage["cmd"].split("python -m ", 1)[1].split()[0]
        assert not [path for path in project_imports(module) if path.startswith("stages/study/")], module
