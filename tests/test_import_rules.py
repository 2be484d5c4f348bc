"""The layers and their import rules (docs/architecture.md), read from the source itself."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"kernels": "featscope.kernels", "index": "featscope.index", "pipelines": "featscope.pipelines"}


def _modules():
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join([package, *[p for p in parts if p != "__init__"]])
            yield name, path


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in found if name.startswith("featscope")}


MODULES = dict(_modules())
IMPORTS = {name: _imports(path) for name, path in MODULES.items()}


def _violations(where: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{name} imports {imp}" for name, imps in IMPORTS.items() if name.startswith(where)
            for imp in imps if imp.startswith(forbidden)]


def test_kernels_import_nothing_above_them():
    assert not _violations("featscope.kernels", ("featscope.pipelines", "featscope.index"))


def test_index_imports_only_kernels():
    assert not _violations("featscope.index", ("featscope.pipelines",))


def test_core_and_render_import_no_stage_and_no_app():
    assert not _violations("featscope.pipelines.core", ("featscope.pipelines.stages", "featscope.pipelines.app"))
    assert not _violations("featscope.pipelines.render", ("featscope.pipelines.stages", "featscope.pipelines.app"))


def test_stages_import_no_other_stage_and_no_app():
    found = []
    for name, imps in IMPORTS.items():
        if name.startswith("featscope.pipelines.stages."):
            found += [f"{name} imports {imp}" for imp in imps
                      if imp.startswith("featscope.pipelines.app")
                      or (imp.startswith("featscope.pipelines.stages.") and not imp.startswith(name))]
    assert not found


def test_only_the_cli_builds_flags():
    """argparse lives in app/cli.py alone; everything else names parameters."""
    users = [name for name, path in MODULES.items() if "argparse" in path.read_text()]
    assert users == ["featscope.pipelines.app.cli"]


def test_only_the_run_directory_spells_run_file_names():
    spelled = [name for name, path in MODULES.items()
               if '"meta.json"' in path.read_text() and not name.endswith(("core.rundir", "index.search"))]
    assert not spelled


def test_one_spelling_of_neighbour():
    """Code, JSON keys, file names and docs say "neighbour"; the US spelling is left only in
    third-party names and in the aliases kept for this release."""
    allowed = ("KNeighbors", "kneighbors", "n_neighbors", "neighbors_to_retrieve", '"neighbors": "neighbours"',
               '"/api/neighbors")', '"/api/neighbors", include_in_schema', "k_neighbors", "`neighbors` still works",
               "ALIASES")
    us = "neigh" + "bor"  # written so that this file does not match itself
    files = [*MODULES.values(), *(REPO / "tests").rglob("*.py"), REPO / "README.md", REPO / "Snakefile",
             *(REPO / "docs").glob("*.md"), *(REPO / "pipelines" / "app" / "report_assets").iterdir()]
    found = [f"{path.relative_to(REPO)}: {line.strip()}" for path in files
             for line in path.read_text().splitlines() if us in line.lower() and not any(a in line for a in allowed)]
    assert not found, found[:5]
    assert not [p for p in REPO.rglob(f"*{us}*") if ".venv" not in p.parts and ".git" not in p.parts
                and "egg-info" not in str(p) and "runs" not in p.parts]


def test_library_errors_name_parameters_not_flags():
    """Outside app/, an error never spells a flag (`--name`): it raises ParamError naming the
    parameter, and the CLI says the flag. Help texts of command declarations may, and so may a
    whole command suggested in backquotes (`featscope index build --run R --layer L`)."""
    import re

    pattern = re.compile(r"(FeatscopeError|ParamError)\((?:[^()]|\([^()]*\))*?--[a-z]", re.S)
    found = [name for name, path in MODULES.items()
             if not name.startswith("featscope.pipelines.app")
             and pattern.search(re.sub(r"`[^`]*`", "``", path.read_text()))]
    assert not found
