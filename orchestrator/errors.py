"""Typed failures: every way a request can end badly carries a code (Triton's error codes) and a message
written for the client. Codes travel between models as data, never re-parsed from prose."""

from __future__ import annotations

import enum


class Code(enum.Enum):
    """The Triton error codes a request can end with (pb_utils.TritonError has one attribute per name)."""

    INVALID_ARG = "INVALID_ARG"  # the request is wrong; retrying it unchanged fails again
    UNAVAILABLE = "UNAVAILABLE"  # the server cannot take or finish it now: queue full, SLO infeasible,
    #                              a component restarting, shutting down; a retry may succeed
    CANCELLED = "CANCELLED"  # the client cancelled it or its deadline passed
    INTERNAL = "INTERNAL"  # a bug or a component failure that is not the request's fault


class ServingError(Exception):
    """A request's failure: `code` for the protocol, `message` for the client (no traceback, path or
    internal name), `reason` a short machine-readable tag for metrics and benchmarks."""

    code = Code.INTERNAL
    reason = "internal"

    def __init__(self, message: str, *, code: Code | None = None, reason: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if reason is not None:
            self.reason = reason

    def to_dict(self) -> dict:
        return {"code": self.code.value, "reason": self.reason, "message": self.message}

    @classmethod
    def from_dict(cls, data: dict) -> "ServingError":
        try:
            code = Code(data.get("code"))
        except ValueError:
            code = Code.INTERNAL
        return cls(str(data.get("message", "request failed")), code=code, reason=str(data.get("reason", "internal")))


class InvalidRequest(ServingError):
    """A request field is out of range; the message starts with the field's name."""

    code, reason = Code.INVALID_ARG, "invalid"

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class QueueFull(ServingError):
    code, reason = Code.UNAVAILABLE, "queue_full"


class Rejected(ServingError):
    """The request's SLO cannot be met at the current load."""

    code, reason = Code.UNAVAILABLE, "slo"


class ShuttingDown(ServingError):
    code, reason = Code.UNAVAILABLE, "shutting_down"

    def __init__(self, message: str = "server is shutting down; retry on another replica"):
        super().__init__(message)


class Cancelled(ServingError):
    code, reason = Code.CANCELLED, "cancelled"


class ComponentUnavailable(ServingError):
    """A component model is dead, restarting or did not answer in time: retrying later may succeed."""

    code, reason = Code.UNAVAILABLE, "component_unavailable"

    def __init__(self, component: str, message: str):
        super().__init__(f"{component} {message}")
        self.component = component


class ComponentFailed(ServingError):
    """A component answered with an error for this call."""

    code, reason = Code.INTERNAL, "component_failed"

    def __init__(self, component: str, message: str):
        super().__init__(f"{component} {message}")
        self.component = component
