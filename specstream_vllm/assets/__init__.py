"""Files shipped with the package: the trained streams of the embedded default model."""
from __future__ import annotations

from pathlib import Path

SHIPPED = Path(__file__).parent / "streams" / "smollm2-135m-instruct"


def shipped_streams_dir() -> Path | None:
    """The committed SmolLM2-135M-Instruct stream checkpoint, if present."""
    return SHIPPED if (SHIPPED / "config.json").is_file() else None
