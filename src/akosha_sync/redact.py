"""The one secret scrubber: every text, result or log event that leaves the process
passes through it (the store's error messages, the HTTP method, the logs).

Just above the configuration in the dependency order (it takes only ``REDACTED`` and
the config's type from it), so the repository, ``sync/``, the server and the logs can
all use it.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from typing import TYPE_CHECKING, Any

from akosha_sync.config import REDACTED

if TYPE_CHECKING:
    from akosha_sync.config import AkoshaSyncConfig

__all__ = ["REDACTED", "SECRET_KEYS", "Scrubber", "scrub", "scrubber_for"]

# Mapping keys whose values are secrets whatever they hold (log fields, headers, results).
SECRET_KEYS = frozenset({
    "secret_access_key", "akosha_token", "daemon_token", "session_token",
    "aws_session_token", "aws_secret_access_key", "password", "token", "authorization",
    "secret", "x-amz-security-token",
})


class Scrubber:
    """Replaces every known secret value, and the value of every secret-named key."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so a secret that contains another is removed whole.
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def text(self, value: str) -> str:
        for secret in self.secrets:
            value = value.replace(secret, REDACTED)
        return value

    def clean(self, value: Any) -> Any:
        """A copy of ``value`` (str, mapping, list, tuple; others as they are) without secrets."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: REDACTED if _secret_key(k) and v else self.clean(v)
                    for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.clean(v) for v in value]
        if isinstance(value, BaseException):
            return self.text(str(value))
        return value

    def __call__(
        self, logger: Any, name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """As a structlog processor: scrub every field of the event in place."""
        for key, value in list(event.items()):
            event[key] = REDACTED if _secret_key(key) and value else self.clean(value)
        return event


def _secret_key(key: object) -> bool:
    return str(key).lower() in SECRET_KEYS


def scrubber_for(config: AkoshaSyncConfig) -> Scrubber:
    """The scrubber for every secret the configuration holds (environment included)."""
    return Scrubber(config.secrets())


def scrub(text: str, config: AkoshaSyncConfig) -> str:
    """``text`` without any of the configuration's secrets."""
    return scrubber_for(config).text(text)
