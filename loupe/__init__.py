"""loupe: an LLM serving engine whose every request can be traced end to end."""

from loupe.engine import Engine

__all__ = ["Engine"]
