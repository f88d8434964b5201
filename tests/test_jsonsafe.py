"""Deeply nested JSON is refused, not a crash, even after a dependency raised the recursion limit."""

import sys

import pytest

from registry import jsonsafe


def test_deep_nesting_is_refused_under_a_raised_recursion_limit() -> None:
    import eth_account  # noqa: F401  (imports py_ecc, which raises the limit to 100,000)

    assert sys.getrecursionlimit() >= 100_000
    body = b"[" * 300_000 + b"]" * 300_000
    with pytest.raises(jsonsafe.JsonTooDeep):
        jsonsafe.loads(body)


def test_strings_do_not_count_and_normal_documents_parse() -> None:
    text = '{"a": "' + "[" * 1000 + '", "b": [[[1]]]}'
    assert jsonsafe.loads(text)["b"] == [[[1]]]
    assert jsonsafe.loads(b'{"k": "\\"[[["}') == {"k": '"[[['}
    with pytest.raises(ValueError):
        jsonsafe.loads(b"{not json")
