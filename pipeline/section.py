"""The base of every run-config section (``data``, ``optim``, ``train``, ``checkpoint``, ...).

Each component owns its section next to its code. Types are checked strictly by pydantic (no
silent ``"3"`` -> 3 or ``"yes"`` -> True; an int is accepted where a float is wanted) and unknown
keys are refused; pipeline/config.py turns pydantic's findings into lines that name the dotted
key. ``problems`` adds the value checks that types cannot express, also as dotted-key lines.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, arbitrary_types_allowed=False)

    def problems(self) -> list[str]:
        """Every invalid value as a line naming its dotted key; empty when usable."""
        return []
