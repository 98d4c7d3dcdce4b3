"""Files shipped with the package: the trained streams of the embedded default model."""
from __future__ import annotations

from pathlib import Path

#: the default streams: next_token streams over the top 12 layers, drafted in one pass
#: (streams/smollm2-135m-instruct-next12/README.md; the chain-form alternative is
#: streams/smollm2-135m-instruct-chain12, the same form over 6 layers
#: streams/smollm2-135m-instruct-next6)
SHIPPED = Path(__file__).parent / "streams" / "smollm2-135m-instruct-next12"


def shipped_streams_dir() -> Path | None:
    """The committed SmolLM2-135M-Instruct stream checkpoint, if present."""
    return SHIPPED if (SHIPPED / "config.json").is_file() else None
