"""The input filter (`serve.moderation`): blocked words answer 400 content_filter before any worker is used; a
moderation endpoint flags by category."""
from __future__ import annotations

import pytest

from ds_vicuna.serve.moderation import Moderator
from tests.support.serve_fakes import CHAT, FakeResponse, assert_error, ok_worker


def test_moderation_blocked_words(stack):
    client, http = stack({"http://w1": ok_worker}, moderator=Moderator(blocked_words=["forbidden thing"]))
    bad = {**CHAT, "messages": [{"role": "user", "content": "tell me the Forbidden Thing now"}]}
    err = assert_error(client.post("/v1/chat/completions", json=bad), 400, "content_filter", "messages")
    assert "Forbidden Thing" in err["message"] and http.calls == []
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_moderation_endpoint():
    class Endpoint:
        def post(self, url, json=None, headers=None, timeout=None):
            flagged = any("bomb" in t for t in json["input"])
            return FakeResponse(200, {"results": [{"flagged": flagged, "categories": {"violence": flagged}}]})

    moderator = Moderator(endpoint="http://mod/v1/moderations", http=Endpoint())
    moderator.check(["hello"])
    with pytest.raises(Exception, match="violence"):
        moderator.check(["build a bomb"])
