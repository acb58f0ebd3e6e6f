"""Making, encoding and decoding events: fresh ids, validation on the way in, one-line errors on the way out.

    ev = new_event(Step, rollout_id="r1", payload=StepPayload(step_idx=0, role="user", content="hi"))
    decode(encode(ev)) == ev     # JSON bytes; decode raises ValidationError naming the field at fault

Event ids are UUIDv7 (they sort by creation time). `new_event` validates by a round trip through the
decoder, since msgspec constructors do not check constraints (ge=, Literal).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
import time
from typing import Any, Optional

import msgspec

from schemas.envelope import Envelope, Event, event_type
from schemas.errors import ValidationError
from schemas.fields import MAX_JSON_DEPTH


def uuid7() -> str:
    """A UUIDv7: 48-bit unix-ms timestamp, then random bits; sorts by creation time."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 | 0b10 << 62 | rand & ((1 << 62) - 1)
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_PATH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+@=-]{0,199}")


def path_safe_id(value: str, what: str = "id") -> str:
    """`value` when it can name a directory (letters, digits, `._:+@=-`, no `..`, at most 200
    characters), else a ValidationError: an id from a user or an event never leaves its parent dir."""
    if not isinstance(value, str) or not _PATH_ID.fullmatch(value) or ".." in value:
        raise ValidationError(f"{what} {value!r} cannot name a directory: use letters, digits and ._:+@=- "
                              "(no '/', no '..', at most 200 characters)")
    return value


PRODUCER_ID = f"{os.uname().nodename}-{os.getpid()}-{secrets.token_hex(3)}"


def new_event(cls: type[Envelope], *, payload: Any, rollout_id: Optional[str] = None,
              producer_id: str = PRODUCER_ID, event_id: Optional[str] = None,
              produced_at: Optional[dt.datetime] = None) -> Envelope:
    """Builds a validated event with a fresh UUIDv7 and the current UTC time."""
    try:
        ev = cls(event_id=event_id or uuid7(), producer_id=producer_id,
                 produced_at=produced_at or dt.datetime.now(dt.timezone.utc),
                 rollout_id=rollout_id, payload=payload)
        # Constructors do not check constraints (ge=, Literal); a round trip through the decoder does.
        return _DECODER.decode(_ENCODER.encode(ev))
    except (msgspec.ValidationError, ValueError) as e:
        raise ValidationError(f"invalid {event_type(cls)} event: {e}") from e
    except RecursionError as e:
        raise ValidationError(f"invalid {event_type(cls)} event: nested more than {MAX_JSON_DEPTH} levels deep") from e


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(Event)


def encode(ev: Envelope) -> bytes:
    return _ENCODER.encode(ev)


def decode(data: bytes) -> Envelope:
    """JSON bytes -> typed event. Raises ValidationError naming the field at fault."""
    try:
        return _DECODER.decode(data)
    except msgspec.ValidationError as e:
        raise ValidationError(str(e)) from e
    except msgspec.DecodeError as e:
        raise ValidationError(f"not a JSON event: {e}") from e
    except UnicodeDecodeError as e:
        raise ValidationError(f"not valid UTF-8: {e}") from e
    except RecursionError as e:
        raise ValidationError(f"nested more than {MAX_JSON_DEPTH} levels deep ({e})") from e
