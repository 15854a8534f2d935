"""Live galleries in Redis: a catalogue that changes while it is served.

Redis is the one place an item lives (with its append-only file, an acknowledged add or delete
survives any restart); it is all that hosts need to share. Per gallery ``g``::

    <p>:live                      set of live gallery names
    <p>:live:<g>                  hash: name, owner, model, created_at, updated_at, version,
                                  adds (adds accepted: each add job's number)
    <p>:live:<g>:items            sorted set: item id -> the version that last added it
    <p>:live:<g>:item:<id>        hash: attributes (JSON), sha256, image (what the model
                                  takes: pixels, or a JPEG of them), added_at, accepted
                                  (version the add was accepted at), seq (its number among
                                  the gallery's adds), emb:<model> (float16)
    <p>:live:<g>:sha              hash: sha256 of the uploaded bytes -> first item id with them
    <p>:live:<g>:gone             hash: item id -> the version that deleted it
    <p>:live:<g>:pending          hash: item id -> job id of an add not yet committed
    <p>:live:<g>:log              stream of changes: v (version), op (add | del), id
    <p>:live-log                  stream of created galleries: op (create), name

Every change bumps the gallery's ``version`` and appends to its log, in the same script. A job
records the version of its gallery when it is accepted; a worker applies the log up to that
version before answering it. So a search accepted after a delete answered never sees the
deleted item, and workers follow the log within milliseconds. An add is embedded by a worker
like a search (the same batched forward pass) and committed by :data:`_COMMIT`, at most once:
a redelivered add finds its job ended; an add accepted before a delete of the same item is
dropped; an older add committed after a newer one changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
import redis.asyncio as aioredis

from shared.watchers import NOTIFY

LOG_MAXLEN = 100_000  # entries kept per gallery log; a worker further behind reloads
SHOWN = ["attributes", "sha256", "added_at"]  # an item's fields the API shows

# KEYS: the live set, the gallery hash, the global log. ARGV: name, owner, model, now.
# 1: created; 0: it exists with this owner; -1: it exists and belongs to another key.
_CREATE = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then
  if (redis.call('HGET', KEYS[2], 'owner') or '') == ARGV[2] then return 0 end
  return -1
end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], 'name', ARGV[1], 'owner', ARGV[2], 'model', ARGV[3],
  'created_at', ARGV[4], 'updated_at', ARGV[4], 'version', 0)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 10000, '*', 'op', 'create', 'name', ARGV[1])
return 1
"""

# KEYS: gallery hash, items, item hash, sha index, tombstones, log, pending adds.
# ARGV: item id, now. Returns the new version, or 0 when there was no such item.
_DELETE = """
local known = redis.call('EXISTS', KEYS[3]) == 1 or redis.call('HEXISTS', KEYS[7], ARGV[1]) == 1
if not known then return 0 end
local v = redis.call('HINCRBY', KEYS[1], 'version', 1)
local sha = redis.call('HGET', KEYS[3], 'sha256')
if sha and redis.call('HGET', KEYS[4], sha) == ARGV[1] then redis.call('HDEL', KEYS[4], sha) end
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[7], ARGV[1])
redis.call('HSET', KEYS[5], ARGV[1], v)
redis.call('HSET', KEYS[1], 'updated_at', ARGV[2])
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[3], '*', 'v', v, 'op', 'del', 'id', ARGV[1])
return v
"""

# Commit an embedded add and end its job, once. KEYS: gallery hash, items, item hash, sha
# index, tombstones, log, pending adds, the job hash, its watchers, the pending-jobs
# set, the job's upload. ARGV: item id, job id, accepted version, embedding field, embedding,
# attributes JSON, sha256, image, now, result JSON (with "item":null, filled in here), log max
# length, gallery name, the add's number (shared.jobs: accepted adds of a gallery are numbered,
# so of two adds of an item the later accepted wins, whichever commits first).
# Returns: 1 committed; 2 dropped (deleted after it was accepted); 3 superseded (a newer add of
# the item is in); 0 the job had already ended (a redelivery); -2 the job is gone.
_COMMIT = (
    NOTIFY
    + """
local status = redis.call('HGET', KEYS[8], 'status')
if not status then return -2 end
redis.call('HINCRBY', KEYS[8], 'computed', 1)
if status == 'succeeded' or status == 'failed' then return 0 end
local accepted = tonumber(ARGV[3])
local item = {id = ARGV[1], gallery = ARGV[12], state = 'indexed', version = cjson.null,
  duplicate_of = cjson.null}
local outcome = 1
local gone = redis.call('HGET', KEYS[5], ARGV[1])
local seq = tonumber(ARGV[13])
local current = redis.call('HGET', KEYS[3], 'seq')
if gone and tonumber(gone) > accepted then
  outcome = 2
elseif current and tonumber(current) > seq then
  outcome = 3
end
if outcome == 1 then
  local old = redis.call('HGET', KEYS[3], 'sha256')
  if old and redis.call('HGET', KEYS[4], old) == ARGV[1] then redis.call('HDEL', KEYS[4], old) end
  local first = redis.call('HGET', KEYS[4], ARGV[7])
  if first and first ~= ARGV[1] then
    item['duplicate_of'] = first
  else
    redis.call('HSET', KEYS[4], ARGV[7], ARGV[1])
  end
  redis.call('DEL', KEYS[3])
  redis.call('HSET', KEYS[3], 'attributes', ARGV[6], 'sha256', ARGV[7], 'image', ARGV[8],
    'added_at', ARGV[9], 'accepted', accepted, 'seq', seq, ARGV[4], ARGV[5])
  local v = redis.call('HINCRBY', KEYS[1], 'version', 1)
  redis.call('HSET', KEYS[1], 'updated_at', ARGV[9])
  redis.call('ZADD', KEYS[2], v, ARGV[1])
  redis.call('HDEL', KEYS[5], ARGV[1])
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[11], '*', 'v', v, 'op', 'add', 'id', ARGV[1])
  item['version'] = v
elseif outcome == 2 then
  item['state'] = 'deleted'
else
  item['state'] = 'superseded'
end
-- (the result is kept as the worker wrote it: cjson would turn its empty lists into objects)
local filled = '"item":' .. cjson.encode(item)
local result = string.gsub(ARGV[10], '"item":null', function() return filled end, 1)
if redis.call('HGET', KEYS[7], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[7], ARGV[1]) end
redis.call('HSET', KEYS[8], 'status', 'succeeded', 'finished_at', ARGV[9],
  'result', result)
redis.call('HDEL', KEYS[8], 'stage')
redis.call('ZREM', KEYS[10], ARGV[2])
redis.call('DEL', KEYS[11])
notify(KEYS[8], KEYS[9], true)
return outcome
"""
)


# KEYS: the item hash. ARGV: its sha256 when embedded, the embedding field, the embedding.
_SAVE_EMBEDDING = """
if redis.call('HGET', KEYS[1], 'sha256') ~= ARGV[1] then return 0 end
return redis.call('HSETNX', KEYS[1], ARGV[2], ARGV[3])
"""


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


class LiveKeys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.galleries = f"{prefix}:live"
        self.log = f"{prefix}:live-log"  # beside the galleries' keys, never one of them

    def gallery(self, name: str) -> str:
        return f"{self.prefix}:live:{name}"

    def items(self, name: str) -> str:
        return f"{self.gallery(name)}:items"

    def item(self, name: str, item_id: str) -> str:
        return f"{self.gallery(name)}:item:{item_id}"

    def sha(self, name: str) -> str:
        return f"{self.gallery(name)}:sha"

    def gone(self, name: str) -> str:
        return f"{self.gallery(name)}:gone"

    def pending(self, name: str) -> str:
        return f"{self.gallery(name)}:pending"

    def changes(self, name: str) -> str:
        return f"{self.gallery(name)}:log"

    def change_keys(self, name: str, item_id: str) -> list[str]:
        """The keys a delete or a commit of ``item_id`` touches, in the scripts' order."""
        return [
            self.gallery(name),
            self.items(name),
            self.item(name, item_id),
            self.sha(name),
            self.gone(name),
            self.changes(name),
            self.pending(name),
        ]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_hash(raw: dict[Any, Any]) -> dict[str, Any]:
    """A Redis hash as text fields, except binary ones (embeddings, images) kept as bytes."""
    decoded: dict[str, Any] = {}
    for key, value in raw.items():
        name = _text(key)
        binary = name == "image" or name.startswith("emb:")
        decoded[name] = value if binary else _text(value)
    return decoded


@dataclass(frozen=True)
class StoredItem:
    """An item as stored (no embedding), for listings and the API."""

    id: str
    attributes: dict[str, Any]
    sha256: str
    added_at: str
    version: int

    @classmethod
    def of(cls, item_id: str, fields: dict[str, Any], version: int) -> StoredItem:
        return cls(
            id=item_id,
            attributes=json.loads(fields.get("attributes") or "{}"),
            sha256=str(fields.get("sha256", "")),
            added_at=str(fields.get("added_at", "")),
            version=version,
        )


class LiveStore:
    """Synchronous access for the worker (loading, following the logs, committing adds)."""

    def __init__(self, client: redis.Redis, *, prefix: str) -> None:
        self.client = client
        self.keys = LiveKeys(prefix)
        self._commit = client.register_script(_COMMIT)
        self._save = client.register_script(_SAVE_EMBEDDING)

    def names(self) -> list[str]:
        return sorted(_text(n) for n in self.client.smembers(self.keys.galleries))  # type: ignore[union-attr]

    def meta(self, name: str) -> dict[str, str]:
        raw = self.client.hgetall(self.keys.gallery(name))
        return {_text(k): _text(v) for k, v in raw.items()}  # type: ignore[union-attr]

    def version(self, name: str) -> int:
        return int(self.client.hget(self.keys.gallery(name), "version") or 0)  # type: ignore[arg-type]

    def last_change_id(self, name: str) -> str:
        """The id of the gallery log's newest entry ("0-0" for none): where a loader resumes."""
        newest = self.client.xrevrange(self.keys.changes(name), count=1)
        return _text(newest[0][0]) if newest else "0-0"  # type: ignore[index]

    def item_ids(self, name: str) -> list[str]:
        return [_text(i) for i in self.client.zrange(self.keys.items(name), 0, -1)]  # type: ignore[union-attr]

    def items(self, name: str, ids: Sequence[str], fields: Sequence[str]) -> list[dict[str, Any]]:
        """The ``fields`` of each item (an empty dict for one that is gone), in one round trip."""
        with self.client.pipeline(transaction=False) as pipe:
            for item_id in ids:
                pipe.hmget(self.keys.item(name, item_id), list(fields))
            replies = pipe.execute()
        out = []
        for reply in replies:
            values = dict(zip(fields, reply, strict=True))
            out.append({} if all(v is None for v in reply) else decode_hash(values))
        return out

    def changes_after(
        self, name: str, after: str, *, block_ms: int | None = None, count: int = 1000
    ) -> list[tuple[str, dict[str, str]]]:
        """Log entries of gallery ``name`` after stream id ``after``, oldest first."""
        key = self.keys.changes(name)
        reply: Any = self.client.xread({key: after}, count=count, block=block_ms)
        entries = reply[0][1] if reply else []
        return [(_text(i), {_text(k): _text(v) for k, v in f.items()}) for i, f in entries]

    def save_embedding(
        self, name: str, item_id: str, sha256: str, field: str, embedding: bytes
    ) -> None:
        """This model's embedding of an item another model's worker added, kept with the item
        (only while it is the same item: not deleted, not replaced meanwhile)."""
        self._save(keys=[self.keys.item(name, item_id)], args=[sha256, field, embedding])

    def commit(
        self,
        *,
        gallery: str,
        item_id: str,
        job_id: str,
        accepted: int,
        add_seq: int,
        embedding_field: str,
        embedding: bytes,
        attributes: str,
        sha256: str,
        image: bytes,
        result: str,
        job_keys: Sequence[str],
    ) -> int:
        """Commit an add and end its job (see :data:`_COMMIT`'s return values)."""
        keys = [*self.keys.change_keys(gallery, item_id), *job_keys]
        args: list[str | bytes | int] = [
            item_id,
            job_id,
            accepted,
            embedding_field,
            embedding,
            attributes,
            sha256,
            image,
            now_iso(),
            result,
            LOG_MAXLEN,
            gallery,
            add_seq,
        ]
        return int(self._commit(keys=keys, args=args))


class AsyncLiveStore:
    """Asynchronous access for the API (create, delete, read, list)."""

    def __init__(self, client: aioredis.Redis, *, prefix: str) -> None:
        self.client = client
        self.keys = LiveKeys(prefix)
        self._create = client.register_script(_CREATE)
        self._delete = client.register_script(_DELETE)

    async def create(self, name: str, *, owner: str | None, model: str) -> int:
        keys = [self.keys.galleries, self.keys.gallery(name), self.keys.log]
        return int(await self._create(keys=keys, args=[name, owner or "", model, now_iso()]))

    async def meta(self, name: str) -> dict[str, str] | None:
        raw = await self.client.hgetall(self.keys.gallery(name))
        return {_text(k): _text(v) for k, v in raw.items()} if raw else None

    async def names(self) -> list[str]:
        return sorted(_text(n) for n in await self.client.smembers(self.keys.galleries))

    async def delete(self, name: str, item_id: str) -> int:
        keys = self.keys.change_keys(name, item_id)
        return int(await self._delete(keys=keys, args=[item_id, now_iso(), LOG_MAXLEN]))

    async def item(self, name: str, item_id: str) -> tuple[StoredItem | None, str | None]:
        """The item as indexed (or None) and the job of an add of it still pending (or None)."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hmget(self.keys.item(name, item_id), SHOWN)
            pipe.zscore(self.keys.items(name), item_id)
            pipe.hget(self.keys.pending(name), item_id)
            fields, version, pending = await pipe.execute()
        stored = None
        if version is not None:
            values = decode_hash(dict(zip(SHOWN, fields, strict=True)))
            stored = StoredItem.of(item_id, values, int(version))
        return stored, (_text(pending) if pending else None)

    async def image(self, name: str, item_id: str) -> bytes | None:
        data = await self.client.hget(self.keys.item(name, item_id), "image")
        return data if isinstance(data, bytes) else None

    async def page(
        self, name: str, *, after: int, limit: int
    ) -> tuple[list[StoredItem], int, int | None]:
        """Items in the order they were last added, after version ``after``; the total; the
        cursor of the next page (the version of this page's last item: it holds while items
        come and go), None after the last page."""
        key = self.keys.items(name)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zrange(
                key, f"({after}", "+inf", byscore=True, offset=0, num=limit, withscores=True
            )
            pipe.zcard(key)
            listed, total = await pipe.execute()
        ids = [(_text(i), int(v)) for i, v in listed]
        async with self.client.pipeline(transaction=False) as pipe:
            for item_id, _ in ids:
                pipe.hmget(self.keys.item(name, item_id), SHOWN)
            rows = await pipe.execute()
        items = [
            StoredItem.of(item_id, decode_hash(dict(zip(SHOWN, row, strict=True))), version)
            for (item_id, version), row in zip(ids, rows, strict=True)
            if any(value is not None for value in row)  # deleted between the two reads
        ]
        following = ids[-1][1] if len(ids) == limit else None
        return items, int(total), following

    async def counts(self, names: Sequence[str]) -> dict[str, int]:
        async with self.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.zcard(self.keys.items(name))
            return {n: int(c) for n, c in zip(names, await pipe.execute(), strict=True)}
