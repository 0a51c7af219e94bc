"""Where the project's own files live: the one place that knows the repository layout."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"
CLAIM_DIR = CONF_DIR / "claim"
TRAINER_DIR = CONF_DIR / "trainer"
