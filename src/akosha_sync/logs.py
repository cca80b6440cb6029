"""Logging: JSON lines into a rotated file, readable lines on stderr, secrets scrubbed.

stdout is never written to: in stdio mode it carries the MCP protocol.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path
from typing import Any

import structlog

from akosha_sync._fs import private_dir, private_file
from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.redact import scrub, scrubber_for

__all__ = ["configure_logging", "scrub"]


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log whose every file (the new one after a rollover too) is 0600."""

    def _open(self):  # type: ignore[no-untyped-def]
        private_file(Path(self.baseFilename))
        return super()._open()


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
    scrubber = scrubber_for(config)
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
        private_dir(path.parent, tighten=False)  # ~/.claude/logs is not ours alone
        file_handler: logging.Handler = _PrivateRotatingFileHandler(
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
    except OSError as exc:
        file_in_use = None
        # Said once, here: every later "see the log" would otherwise point at nothing.
        print(f"akosha-sync: cannot write the log file {path} ({exc.strerror or exc}); "
              "going on without it. Set log_file to a path this user can write.",
              file=sys.stderr)
        if stderr_level is None:  # else logging's last resort prints raw event dicts
            quiet: logging.Handler = logging.NullHandler()
            quiet._akosha_sync = True  # type: ignore[attr-defined]
            root.addHandler(quiet)

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

    # Libraries log through stdlib too; keep their chatter out of stderr and the file
    # (asyncio's "Using selector" line on every event loop, every command).
    for noisy in ("asyncio", "httpx", "httpcore", "mcp", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    return file_in_use
