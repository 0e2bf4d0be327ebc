"""A profile as JSON: one shape for every door.

The HTTP edge answers ``GET /v1/profiles/{user_id}`` with it, and
``sendtime profile --json`` prints the same from the gRPC message: protobuf's
JSON mapping of ``sendtime.v1.Profile`` (google.protobuf.json_format) with the
proto field names, which the mapping allows printers to keep (``user_id``,
``first_seen_time``, ``CONSENT_STATE_OPTED_IN``; times in RFC 3339, UTC; a
field at its default value, an empty list or string, left out), except for two
fields whose mapped form no reader wants: ``extra_traits_json`` (bytes, base64
in the mapping) is ``extra_traits``, the JSON object itself, and
``event_count`` (uint64, a string in the mapping) is a number, always present.
"""

from __future__ import annotations

from typing import Any

import msgspec
from google.protobuf import json_format

from sendtime.server.domain.profile import ProfileView
from sendtime.server.edge import grpc_convert


def profile_json(view: ProfileView) -> dict[str, Any]:
    extra = msgspec.json.encode(view.extra_traits) if view.extra_traits else b""
    message = grpc_convert.profile(view, extra)
    mapped = json_format.MessageToDict(message, preserving_proto_field_name=True)
    mapped.pop("extra_traits_json", None)
    mapped["extra_traits"] = dict(view.extra_traits)
    mapped["event_count"] = view.event_count
    return mapped
