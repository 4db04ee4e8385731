"""pyproject.toml: the package `pip install -e .` builds holds every module the engine imports,
the requirements, and a console script that exits with main()'s status.

The metadata is built by setuptools itself (the build backend pip calls), in a subprocess that
writes only under tmp_path; the modules the engine needs are found here by reading the imports
of the files, functions' own imports included, not by importing them.
"""

import ast
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytest.importorskip("setuptools", reason="the build backend pyproject.toml names (requirements-dev.txt)")


def imported_names(path):
    """Top-level names of the absolute imports anywhere in the file at `path`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def repository_imports(start):
    """The repository's top-level modules and packages that module `start` needs, directly or
    through one another."""
    modules, packages, todo = {start}, set(), [REPO / f"{start}.py"]
    while todo:
        for name in imported_names(todo.pop()) - modules - packages:
            if (REPO / f"{name}.py").is_file():
                modules.add(name)
                todo.append(REPO / f"{name}.py")
            elif (REPO / name / "__init__.py").is_file():
                packages.add(name)
                todo.extend((REPO / name).glob("*.py"))
    return modules, packages


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    """The dist-info folder setuptools prepares for a wheel of the repository."""
    out = tmp_path_factory.mktemp("metadata")
    script = ("import sys; from setuptools import build_meta; "
              "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))")
    run = subprocess.run([sys.executable, "-c", script, str(out)], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    return out / run.stdout.splitlines()[-1]


def test_the_package_holds_every_module_the_engine_imports(metadata):
    modules, packages = repository_imports("engine")
    assert {"engine", "model", "parallelcomp", "llama_triton"} <= modules and packages == {"weights"}
    assert set((metadata / "top_level.txt").read_text().split()) == modules | packages


def test_dependencies_are_requirements_txt(metadata):
    lines = (REPO / "requirements.txt").read_text().splitlines()
    expected = [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]
    fields = [line.split(": ", 1) for line in (metadata / "METADATA").read_text().splitlines()]
    assert [value for key, *value in fields if key == "Requires-Dist"] == [[r] for r in expected]
    assert expected[0].startswith("torch")


def test_console_script_exits_with_mains_status(metadata, tmp_path):
    """pip writes `sys.exit(main())` for the entry point; run that from another folder, with the
    repository on the path as the editable install puts it: a missing prompt exits 1 with one line."""
    entry = (metadata / "entry_points.txt").read_text().split("[console_scripts]")[1].split()
    assert entry[:2] == ["parallelcomp", "="]
    module, function = entry[2].split(":")
    script = f"import sys; from {module} import {function}; sys.exit({function}())"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", script, "--prompt", "absent.txt", "--device", "cpu"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: ") and "absent.txt" in run.stderr


def test_the_shipped_locret_heads_are_package_data(metadata):
    """locret.py reads its default heads next to itself, in weights/; the package must carry them."""
    import locret
    sources = (metadata.parent / "parallelcomp.egg-info" / "SOURCES.txt").read_text().split()
    assert locret.DEFAULT_HEADS.relative_to(REPO).as_posix() in sources
