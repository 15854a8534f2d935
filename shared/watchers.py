"""How the processes that wait for a job hear of its changes, without asking.

An API process that waits for a job (a long poll, a submission with ``?wait``, an event stream)
registers its own pub/sub channel in the job's watchers hash, ``<prefix>:watchers:<id>``
(channel -> ``end``, or ``all`` for every change), in the same atomic step as its read of the
job or its submission (shared.jobs). Every script that changes a job then ends with
:data:`NOTIFY`: it publishes the whole record, once encoded, on each channel that wants this
change. So a job's end reaches only the processes that wait for it, with the job already read:
none of them reads it again, and adding API processes adds no messages to the others (a
pattern subscription to every job's events had each process hear every job's changes).
"""

from __future__ import annotations

import json
from typing import Any

# Lua, prepended to each script that changes a job: ``notify(job hash, watchers hash, final)``
# pushes the record as a JSON array [field, value, ...]; a job's end is its watchers' last
# change, so their hash goes with it.
NOTIFY = """
local function notify(job, watchers, final)
  local who = redis.call('HGETALL', watchers)
  local record = nil
  for i = 1, #who, 2 do
    if final or who[i + 1] == 'all' then
      record = record or cjson.encode(redis.call('HGETALL', job))
      redis.call('PUBLISH', who[i], record)
    end
  end
  if final and #who > 0 then redis.call('DEL', watchers) end
end
"""


def pushed_fields(data: bytes | str) -> dict[Any, Any]:
    """The job's hash as :data:`NOTIFY` pushes it ({} for anything else)."""
    try:
        flat = json.loads(data)
    except ValueError:
        return {}
    return as_fields(flat) if isinstance(flat, list) and len(flat) % 2 == 0 else {}


def as_fields(flat: list[Any]) -> dict[Any, Any]:
    """A hash from Lua's HGETALL (fields and values in turn) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))
