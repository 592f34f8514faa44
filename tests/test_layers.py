"""The layers of docs/architecture.md: a part of loupe/ imports only parts on lower levels."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "loupe"
LEVELS = [  # bottom first, as drawn in docs/architecture.md
    {"core"},
    {"config", "distributed"},
    {"ipc", "stops", "process"},
    {"tracing", "traces"},
    {"model"},
    {"runner"},
    {"disagg"},
    {"server", "scheduler", "detokenizer", "dp_controller"},
    {"launch_server", "engine", "cli", "bench"},
    {"__main__"},
]


def runtime_imports(path: Path) -> set[str]:
    """The parts of loupe a file imports, leaving out imports under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for branch in ast.walk(tree) if isinstance(branch, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(branch.test) for node in ast.walk(branch)}
    parts = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        parts.update(name.split(".")[1] for name in names if name.startswith("loupe."))
    return parts


def test_every_part_imports_only_lower_levels():
    level = {part: i for i, parts in enumerate(LEVELS) for part in parts}
    seen = set()
    for path in PACKAGE.rglob("*.py"):
        part = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if part == "__init__":
            continue
        assert part in level, f"{part} is not placed in docs/architecture.md's layers"
        seen.add(part)
        for imported in runtime_imports(path) - {part}:
            assert level[imported] < level[part], f"{path.relative_to(PACKAGE)} imports {imported} (not below it)"
    assert seen == set(level), f"parts that no longer exist: {set(level) - seen}"
