"""Loggers that cannot stop the pool.

Owns: ``logger(name)``, the loggers of the client's loop-thread code (``sshexec.pool``,
``.ssh``, ``.executor``). A filter or handler of the user's may raise anything, even
``SystemExit``, from inside a ``log.debug`` call; on the loop thread that would end a
reader or a shutdown half-way. These loggers report such a failure once on stderr and
go on. Must not import: any other sshexec module.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, MutableMapping, Tuple


class SafeLogger(logging.LoggerAdapter):  # type: ignore[type-arg]  # generic only in typeshed
    """A ``Logger`` whose calls never raise (what they could not log is dropped)."""

    _reported = False

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        try:
            if self.logger.isEnabledFor(level):
                kwargs.setdefault("stacklevel", 3)  # the record names our caller, not this
                self.logger.log(level, msg, *args, **kwargs)
        except BaseException as exc:  # a user's filter or handler: never into the pool
            if not SafeLogger._reported:
                SafeLogger._reported = True
                try:
                    sys.stderr.write(f"sshexec: a logging filter or handler raised {exc!r}\n")
                except BaseException:  # stderr is gone too: nothing left to tell
                    pass

    def debug(self, msg: object, *args: Any, **kwargs: Any) -> None:
        """As ``log(DEBUG, ...)``, checked first: the hot path's lines cost one call when off."""
        if self.logger.isEnabledFor(logging.DEBUG):
            kwargs.setdefault("stacklevel", 3)
            self.log(logging.DEBUG, msg, *args, **kwargs)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> Tuple[Any, Any]:
        return msg, kwargs


def logger(name: str) -> SafeLogger:
    return SafeLogger(logging.getLogger(name), {})
