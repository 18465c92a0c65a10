"""The executor's arguments, checked once: ``Settings``.

Owns: validating every constructor argument of ``SSHPoolExecutor`` that is not about
hosts (those are ``_hosts``') into one frozen ``Settings``, with the errors
``ProcessPoolExecutor`` raises for the arguments they share. Must not import: asyncio,
the pool, or do I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from ._hosts import TRANSPORTS
from ._wire.protocol import MAX_FRAME_LIMIT


@dataclass(frozen=True)
class Settings:
    max_workers: Optional[int]
    initializer: Optional[Callable[..., object]]
    max_tasks_per_child: Optional[int]
    connect_timeout: float
    keepalive_interval: float
    max_retries: int
    prefetch: int
    max_frame: int
    shutdown_grace: float
    reconnect_grace: float
    transport: str
    forward_modules: bool

    def __post_init__(self) -> None:
        if self.max_workers is not None:
            if not isinstance(self.max_workers, int) or isinstance(self.max_workers, bool):
                raise TypeError("max_workers must be an int or None")
            if self.max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        if self.initializer is not None and not callable(self.initializer):
            raise TypeError("initializer must be a callable")
        if self.max_tasks_per_child is not None:
            if not isinstance(self.max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if self.max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        for name, value, lowest in (
            ("max_retries", self.max_retries, 0),
            ("prefetch", self.prefetch, 1),
        ):
            if not isinstance(value, int) or value < lowest:
                raise ValueError(f"{name} must be an int >= {lowest}")
        if not isinstance(self.max_frame, int) or not 1024 <= self.max_frame <= MAX_FRAME_LIMIT:
            raise ValueError(f"max_frame must be an int in 1024..{MAX_FRAME_LIMIT}")
        for name in ("connect_timeout", "keepalive_interval", "shutdown_grace", "reconnect_grace"):
            number: Any = getattr(self, name)
            if not isinstance(number, (int, float)) or number <= 0:
                raise ValueError(f"{name} must be a positive number of seconds")
        if self.transport not in TRANSPORTS:
            raise ValueError(
                f"transport must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}"
            )
