"""The simulator's settings (``SimConfig``, env ``FACEGATE_SIM_*``) and the constants every part shares."""

from __future__ import annotations

import json
import random
from typing import Annotated, Final, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_PORT: Final = 8089
#: Added to every answer so the gateway can label sandbox answers as simulated.
SIM_HEADER: Final = "X-Facegate-Simulator"
#: Per-request shape override for callers that talk to the simulator directly.
SHAPE_HEADER: Final = "X-Sim-Shape"
DIRECTIVE_MARK: Final = b"facegate-sim:"
#: ailabapi's own wording in its no-face example.
NO_FACE_MESSAGE: Final = "pic not has face"
#: The sibling /face-analyzer endpoint's documented max_face_num.
MAX_FACES: Final = 120
#: List-style constants from ailabapi's docs (105 landmarks, 1024-d dense feature).
LANDMARK_COUNT: Final = 105
DENSE_FEATURE_LENGTH: Final = 1024
#: Room for multipart headers and boundaries around an image of MAX_BYTES.
MULTIPART_SLACK: Final = 1024 * 1024


class SimConfig(BaseSettings):
    """Knobs of one simulator; env ``FACEGATE_SIM_*`` so ``make run`` and CI can set them."""

    model_config = SettingsConfigDict(env_prefix="FACEGATE_SIM_", extra="ignore")

    #: Accepted ``ailabapi-api-key`` values (env: JSON list or comma-separated).
    api_keys: Annotated[list[str], NoDecode] = ["sim-key"]
    #: Each key's starting credit balance (one credit per billed call; 0 left -> 429 ERROR_NOT_ENOUGH_CREDITS).
    credits: float = Field(1_000_000.0, ge=0)
    shape: Literal["tencent", "list"] = "tencent"
    latency_ms: int = Field(0, ge=0)
    #: Emulate ailabapi's (unknown) per-key limits; 0 = unlimited. Over -> 429 EXCEEDING_LIMITS.
    max_concurrency: int = Field(0, ge=0)
    qps: float = Field(0.0, ge=0)
    #: Token-bucket capacity for ``qps``; 0 = max(1, qps).
    qps_burst: float = Field(0.0, ge=0)
    #: Whether limiter 429s carry Retry-After (ailabapi's behaviour is unknown).
    retry_after_on_throttle: bool = False
    #: Concurrent Pillow decodes; bounds memory when a benchmark sends big PNGs.
    decode_concurrency: int = Field(4, ge=1)
    #: Seed of the RNG behind faults with ``probability`` < 1.
    fault_seed: int = 0
    #: How long shutdown waits for hung calls before cancelling them.
    shutdown_grace_s: int = Field(1, ge=0)
    #: Where the faces come from: ``detect`` = a real face detector (the ``sandbox`` extra;
    #: without it, the hash, said once at start), ``hash`` = laid out from the image's hash
    #: (what the test suite and the benchmarks use: their noise images hold no faces).
    faces: Literal["detect", "hash"] = "detect"

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [key.strip() for key in text.split(",") if key.strip()]
        return value


def rng(seed: object) -> random.Random:
    """Seeded, reproducible randomness (faults with a probability, every face attribute).

    The point is determinism, not secrecy.
    """
    return random.Random(str(seed))  # noqa: S311
