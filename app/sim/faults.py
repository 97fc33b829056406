"""Fault plans, per-key limits and balances: the bodies of ``POST /_sim/faults|limits|keys``.

The modes and their fields are documented in docs/simulator.md.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.upstream import contract

FaultMode = Literal["status", "bad_key", "no_credits", "malformed", "missing_field", "drop", "hang", "redirect"]


class Fault(BaseModel):
    """One entry of the fault queue (see docs/simulator.md)."""

    model_config = ConfigDict(extra="forbid")

    mode: FaultMode
    #: Calls this fault applies to; None = until cleared.
    count: int | None = Field(1, ge=1)
    #: Chance that a call gets the fault (only hits consume ``count``); for flaky-upstream benchmarks.
    probability: float = Field(1.0, gt=0, le=1)
    status: int | None = Field(None, ge=400, le=599)
    code: str | None = Field(None, pattern=r"^[A-Z0-9_]+$")
    message: str | None = None
    retry_after: int | None = Field(None, ge=0)
    seconds: float = Field(3600.0, ge=0)
    location: str | None = None
    body: str | None = None
    content_type: str = "application/json"

    @model_validator(mode="after")
    def _complete(self) -> Fault:
        if self.mode == "status":
            if self.status is None:
                row = contract.ERROR_CODES.get(self.code or "")
                if row is None:
                    raise ValueError("a status fault needs `status`, or a `code` from ailabapi's table")
                self.status = row.status
            elif self.code is None:
                self.code = _default_code(self.status)
        if self.mode == "redirect" and not self.location:
            raise ValueError("a redirect fault needs `location`")
        return self


def _default_code(status: int) -> str:
    if status == 429:
        return "EXCEEDING_LIMITS"  # the table lists ERROR_NOT_ENOUGH_CREDITS first
    for row in contract.ERROR_CODES.values():
        if row.status == status:
            return row.code
    raise ValueError(f"no ailabapi code has status {status}: give `code` too")


class FaultPlan(BaseModel):
    """Body of ``POST /_sim/faults``: replaces the queue (and the latency, when given)."""

    model_config = ConfigDict(extra="forbid")

    faults: list[Fault] = []
    latency_ms: int | None = Field(None, ge=0)


class Limits(BaseModel):
    """Body of ``POST /_sim/limits``: the fields given replace the current limits."""

    model_config = ConfigDict(extra="forbid")

    qps: float | None = Field(None, ge=0)
    qps_burst: float | None = Field(None, ge=0)
    max_concurrency: int | None = Field(None, ge=0)
    retry_after_on_throttle: bool | None = None


class KeyBalance(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Credits left; None = the configured starting balance.
    balance: float | None = Field(None, ge=0)


class KeyBalances(BaseModel):
    """Body of ``POST /_sim/keys``: ``{"keys": {"<key>": {"balance": 50}}}`` (unknown keys are added)."""

    model_config = ConfigDict(extra="forbid")

    keys: dict[str, KeyBalance]
