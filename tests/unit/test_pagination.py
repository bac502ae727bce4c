from __future__ import annotations

import pytest

from runyard import InvalidArgument
from runyard.common.pagination import decode_page_token, encode_page_token, page_size


def test_tokens_round_trip_and_belong_to_one_listing():
    token = encode_page_token("sessions", ["2026-01-01T00:00:00+00:00", "abc"])
    assert decode_page_token("sessions", token) == ["2026-01-01T00:00:00+00:00", "abc"]
    assert decode_page_token("sessions", "") is None
    with pytest.raises(InvalidArgument) as other:
        decode_page_token("runs", token)
    assert other.value.reason == "INVALID_PAGE_TOKEN"


@pytest.mark.parametrize("token", ["garbage", "%%%", "eyJ9", "W10"])
def test_malformed_tokens_are_invalid_argument(token: str):
    with pytest.raises(InvalidArgument) as error:
        decode_page_token("sessions", token)
    assert error.value.field == "page_token"


def test_page_size_defaults_caps_and_rejects_negative():
    assert page_size(0) == 50
    assert page_size(5000) == 1000
    with pytest.raises(InvalidArgument):
        page_size(-1)
