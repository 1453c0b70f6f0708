"""hypyr.messages.json_object: what another (possibly hostile) hypyr process sent, as a dict or None."""

from __future__ import annotations

import pytest

from hypyr.messages import json_object


@pytest.mark.parametrize("data", [b"", b"not json", b"\xff\xfe{}", b"[1, 2]", b'"op"', b"null", b"[" * 5000,
                                  b'{"a": ' * 5000, "{\"op\": NaN"])
def test_anything_but_a_json_object_is_none(data):
    assert json_object(data) is None


def test_a_json_object_is_itself():
    assert json_object(b'{"op": "info", "n": [1, {"x": null}]}\n') == {"op": "info", "n": [1, {"x": None}]}
    assert json_object('{"ok": true}') == {"ok": True}
