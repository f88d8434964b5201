"""Deeply nested JSON is refused, not a crash, even after a dependency raised the recursion
limit."""

import sys

import pytest

from common import jsonsafe

pytestmark = pytest.mark.fast  # unit tests: no process, no model (make test-fast)


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


@pytest.mark.parametrize(
    "encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"]
)
def test_only_utf8_is_accepted(encoding: str) -> None:
    """UTF-16/32 (with or without a byte order mark) is refused before the depth scan, which
    reads bytes and could be fooled by a wide character holding a quote byte (U+2222)."""
    deep = '{"s": "\u2222", "a": ' + "[" * 5000 + "]" * 5000 + "}"
    for doc in ('{"ok": 1}', deep):
        with pytest.raises(jsonsafe.JsonNotUtf8, match="UTF-8"):
            jsonsafe.loads(doc.encode(encoding))
    with pytest.raises(jsonsafe.JsonNotUtf8, match="offset 7"):
        jsonsafe.loads(b'{"ok": \xff}')
    assert jsonsafe.loads('{"s": "\u2222"}'.encode()) == {"s": "\u2222"}


def test_deep_json_is_refused_as_text_and_as_utf8_bytes() -> None:
    deep = '{"s": "\u2222", "a": ' + "[" * 5000 + "]" * 5000 + "}"
    for doc in (deep, deep.encode()):
        with pytest.raises(jsonsafe.JsonTooDeep):
            jsonsafe.loads(doc)


def test_utf16_bytes_read_as_text_are_refused_clearly() -> None:
    """A WebSocket text frame holding UTF-16 is valid UTF-8 (NUL is a character): still refused."""
    text = '{"type": "ping"}'.encode("utf-16-le").decode("utf-8")
    with pytest.raises(jsonsafe.JsonNotUtf8, match="NUL"):
        jsonsafe.loads(text)
