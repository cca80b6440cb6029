"""The allocator tuning (akosha_sync._alloc): applied on glibc, never over the user's."""

from __future__ import annotations

import platform
import sys

import pytest

from akosha_sync._alloc import tune_allocator


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc only",
)
def test_the_mmap_threshold_is_fixed_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert tune_allocator() is True


@pytest.mark.parametrize(
    ("name", "value"),
    [("MALLOC_MMAP_THRESHOLD_", "65536"),
     ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")],
)
def test_a_threshold_the_user_set_is_left_alone(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    assert tune_allocator() is False
