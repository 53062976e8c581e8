"""Config validation and size parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from distfinalize.config import FinalizeConfig, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [("5GB", 5 * 10**9), ("200MB", 200 * 10**6), ("1GiB", 2**30), ("64KiB", 65536), ("12345", 12345), (7, 7)],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "", "-5GB", "0", "5 parsecs"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("dtype", "int3", "dtype 'int3' is not supported"),
        ("device", "tpu", "device 'tpu'"),
        ("max_shard_size", 0, "must be positive"),
        ("timeout_s", -1, "timeout must be positive"),
    ],
)
def test_config_rejects(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FinalizeConfig(src=Path("a"), dest=Path("b"), **{field: value})


@pytest.mark.parametrize(("size", "text"), [(812, "812 B"), (195_200, "190.62 KiB"), (3.21 * 2**30, "3.21 GiB")])
def test_format_bytes(size: float, text: str) -> None:
    from distfinalize.config import format_bytes

    assert format_bytes(size) == text
