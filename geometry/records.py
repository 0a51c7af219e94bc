"""The 15 derived records of the seed's table, by name."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

from geometry.provenance import Derived


@dataclass(frozen=True)
class DerivedRecords:
    """One :class:`~geometry.provenance.Derived` record per row of the seed's table, in row
    order (field i is row i + 1). A record's own ``name`` is its ledger name (row 1's is
    "learning_rate", the knob the MASS ceiling replaces); the field says what it is."""

    mass_ceiling: Derived  # 1
    epsilon_floor: Derived  # 2
    momentum: Derived  # 3
    weight_decay: Derived  # 4
    clipping: Derived  # 5
    warmup: Derived  # 6
    schedule: Derived  # 7
    batch_size: Derived  # 8
    stopping: Derived  # 9
    lora_scale: Derived  # 10
    lora_rank: Derived  # 11
    target_modules: Derived  # 12
    lora_dropout: Derived  # 13
    weight_init: Derived  # 14
    residual_scaling: Derived  # 15

    def items(self) -> Iterator[tuple[int, Derived]]:
        """(row number 1..15, record) in row order: the numbering of the seed's table."""
        for number, f in enumerate(dataclasses.fields(self), start=1):
            yield number, getattr(self, f.name)

    def replace(self, **records: Derived) -> DerivedRecords:
        """A copy with the named records replaced."""
        return dataclasses.replace(self, **records)

    def to_dict(self) -> dict[str, dict]:
        """The ledger's form: ``{"1": record dict, ..., "15": ...}``."""
        return {str(number): record.to_dict() for number, record in self.items()}
