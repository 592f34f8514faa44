"""loupe: an LLM serving engine whose every request can be traced end to end."""

__all__ = ["Engine"]


def __getattr__(name: str):
    # Lazy, so that `loupe serve` can refuse a bad flag or a busy port before importing torch.
    if name == "Engine":
        from loupe.engine import Engine

        return Engine
    raise AttributeError(f"module 'loupe' has no attribute {name!r}")
