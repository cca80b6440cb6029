"""Logging: JSON lines into a rotated file, readable lines on stderr, secrets scrubbed.

stdout is never written to: in stdio mode it carries the MCP protocol.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from collections.abc import Iterable, MutableMapping
from pathlib import Path
from typing import Any

import structlog

from akosha_sync.config import REDACTED, SECRET_FIELDS, AkoshaSyncConfig

__all__ = ["configure_logging", "scrub"]

_SECRET_KEYS = SECRET_FIELDS | {"password", "token", "authorization", "secret"}


class _Scrubber:
    """A structlog processor that removes every known secret from an event."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def clean(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self.secrets:
                value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            return {k: REDACTED if str(k).lower() in _SECRET_KEYS and v else self.clean(v)
                    for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.clean(v) for v in value]
        return value

    def __call__(
        self, logger: Any, name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in list(event.items()):
            if key.lower() in _SECRET_KEYS and value:
                event[key] = REDACTED
            else:
                event[key] = self.clean(value)
        return event


def scrub(text: str, config: AkoshaSyncConfig) -> str:
    """Remove the configuration's secrets from a text meant for output."""
    for secret in config.secrets():
        text = text.replace(secret, REDACTED)
    return text


def configure_logging(
    config: AkoshaSyncConfig,
    *,
    stderr_level: int | None = logging.INFO,
    log_file: Path | None = None,
) -> Path | None:
    """Set up structlog for this process; returns the log file in use (None if unwritable).

    ``stderr_level=None`` keeps stderr quiet (for commands that print their own output).
    """
    path = log_file or config.log_path
    scrubber = _Scrubber(config.secrets())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        scrubber,
    ]
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_akosha_sync", False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.DEBUG)

    file_in_use: Path | None = path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        file_handler: logging.Handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=5 * 1024 * 1024, backupCount=3, encoding="utf-8"
        )
        file_handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processor=structlog.processors.JSONRenderer(),
                foreign_pre_chain=shared,
            )
        )
        file_handler.setLevel(logging.DEBUG)
        file_handler._akosha_sync = True  # type: ignore[attr-defined]
        root.addHandler(file_handler)
    except OSError:
        file_in_use = None

    if stderr_level is not None:
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processor=structlog.dev.ConsoleRenderer(colors=False),
                foreign_pre_chain=shared,
            )
        )
        stderr.setLevel(stderr_level)
        stderr._akosha_sync = True  # type: ignore[attr-defined]
        root.addHandler(stderr)

    # Libraries log through stdlib too; keep their chatter out of stderr.
    for noisy in ("httpx", "httpcore", "mcp", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    return file_in_use
