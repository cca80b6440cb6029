"""Undo ``configure_logging`` in the test process: its handlers write to a test's files."""

from __future__ import annotations

import logging

__all__ = ["drop_our_log_handlers"]


def drop_our_log_handlers() -> None:
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_akosha_sync", False)]:
        root.removeHandler(handler)
        handler.close()
