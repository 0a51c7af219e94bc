"""Where the project's own files live: the one place that knows the repository layout."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = PROJECT_ROOT / "conf"
CLAIM_DIR = CONF_DIR / "claim"
TRAINER_DIR = CONF_DIR / "trainer"
DATA_DIR = CONF_DIR / "data"


def resolve_data_path(path: str | None) -> str | None:
    """A relative data path is looked up in the working directory, then in the project root."""
    if path is None or Path(path).is_absolute() or Path(path).exists():
        return path
    candidate = PROJECT_ROOT / path
    return str(candidate) if candidate.exists() else path
