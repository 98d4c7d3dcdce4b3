"""Files shipped with the package: the trained streams of the embedded default model."""
from __future__ import annotations

from pathlib import Path

#: the default streams since the fifteenth session: next_token streams over the top 12 layers
#: (one draft pass; batch 1 MT-Bench 1.50x against 1.42x for the N_s = 4 streams in
#: ``smollm2-135m-instruct``, batch 16 the same within noise: docs/benchmarks/next12-s15,
#: next12-b16-s15)
SHIPPED = Path(__file__).parent / "streams" / "smollm2-135m-instruct-next12"


def shipped_streams_dir() -> Path | None:
    """The committed SmolLM2-135M-Instruct stream checkpoint, if present."""
    return SHIPPED if (SHIPPED / "config.json").is_file() else None
