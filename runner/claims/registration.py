"""Pre-registration: a claim's rule written to `<results_dir>/rules/<id>-<hash12>.json` once,
before any of its trials (DESIGN.md §5). Every task that records trials for a claim registers
its rule here first."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from runner.claims.claim import Claim
from runner.ledger import utc_now
from runner.trial import Provenance

RULES_DIR = "rules"


def register_rule(results_dir: str | Path, claim: Claim,
                  provenance: Provenance | None = None) -> Path:
    """Write `results/rules/<id>-<hash12>.json` once (the pre-registration record)."""
    rules = Path(results_dir) / RULES_DIR
    rules.mkdir(parents=True, exist_ok=True)
    final = rules / f"{claim.id}-{claim.rule_hash[:12]}.json"
    if final.exists():
        return final
    provenance = provenance or Provenance.read(results_dir)
    record = {**claim.as_dict(), "registered_at": utc_now(), "git_commit": provenance.git_commit}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=rules)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(record, indent=2, sort_keys=True) + "\n")
        try:
            os.link(tmp, final)  # atomic; a concurrent job that registered first wins
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    return final


def registered_at(path: Path) -> str:
    return str(json.loads(path.read_text()).get("registered_at", ""))
