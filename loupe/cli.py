"""`loupe serve [flags]` starts a server; `loupe bench [flags]` measures a running one;
`loupe traces summary|show|why|diff|export|plot …` looks at the spans a server wrote to a file."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"serve": "loupe.launch_server", "bench": "loupe.bench", "traces": "loupe.traces.commands"}
    if not argv or argv[0] not in commands:
        print("usage: loupe {serve,bench,traces} [flags]   (loupe COMMAND --help for the flags)", file=sys.stderr)
        sys.exit(2)
    module = __import__(commands[argv[0]], fromlist=["main"])
    module.main(argv[1:])


if __name__ == "__main__":
    main()
