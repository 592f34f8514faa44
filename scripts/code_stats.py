"""Lines in loupe/ and its longest functions: the figures issue-sized refactors report
before and after. `python scripts/code_stats.py [--top N]`."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "loupe"


def functions(path: Path) -> list[tuple[int, str]]:
    """(lines, qualified name) of every function in `path`, nested ones included."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                found.append((child.end_lineno - child.lineno + 1, name))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(path.read_text()), "")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    files = sorted(PACKAGE.rglob("*.py"))
    total = sum(len(f.read_text().splitlines()) for f in files)
    ranked = sorted(((n, f"{f.relative_to(PACKAGE.parent)}:{name}") for f in files for n, name in functions(f)),
                    reverse=True)
    print(f"{total} lines in {len(files)} files under loupe/; {sum(n > 60 for n, _ in ranked)} functions over 60 lines")
    for n, name in ranked[: args.top]:
        print(f"{n:5d}  {name}")


if __name__ == "__main__":
    main()
