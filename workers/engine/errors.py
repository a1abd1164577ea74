"""Engine errors with stable codes: the API reports them as a job's `error` unchanged."""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    INPUT_NOT_FOUND = "input_not_found"
    UNSAFE_FORMAT = "unsafe_format"
    INVALID_CHECKPOINT = "invalid_checkpoint"
    INCOMPATIBLE_CHECKPOINTS = "incompatible_checkpoints"
    INVALID_PARAMETERS = "invalid_parameters"
    INVALID_DATA = "invalid_data"
    UNSUPPORTED_MODEL = "unsupported_model"
    INSUFFICIENT_MEMORY = "insufficient_memory"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


class EngineError(Exception):
    """A user-facing failure: `message` says what is wrong and how to fix it, `detail` carries the specifics."""

    def __init__(self, code: ErrorCode, message: str, detail: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail or {}

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code.value, "message": self.message, "detail": self.detail}
