"""akosha-sync: ship Session-Buddy's memory databases to cloud storage or Akosha."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
