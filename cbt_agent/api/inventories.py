"""QueryCbtTask's inventories, kept in memory: a query reads no SQLite and, most of the time,
makes no thread hop.

Each task is held three ways (`Inventory`): its query item (Python values, what conditions and
sorts read), its wire form (what `fields=` cuts down) and its JSON text (a page is a join).
Before each answer they are brought up to date: the store's triggers name every task written
through it from the write's statement on, before its commit (`Store.tasks_written`: a read of
memory); writes by another process show in SQLite's data_version, asked on a connection of its
own at most every millisecond. Only then does one hop to the store thread read back the tasks
written (every task, when another process wrote). Nothing the agent committed before a query
starts is missed by its answer; another process's commit, by any answer starting 1 ms after it.

The common query (no condition, default order) is a slice of the ordered list and a join:
O(limit) on the event loop. `GET /cbt-task/{uuid}` and `q=uuid=...` look the task up. Anything
else runs the query language over every item, in a thread when they are many (it holds the GIL
there too, but the loop gets its turns). A reply is kept for the same request (its uuid and
query string) until the next change: a poller asking the same page again costs a lookup.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import json
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cbt_agent.api import query, replies
from cbt_agent.contract.constants import QUERY_FIELDS
from cbt_agent.contract.replies import INVENTORY_FIELDS
from cbt_agent.contract.schema_map import REPLY_SCHEMA_CLASSES, schema_map
from cbt_agent.engine.results import TaskView
from cbt_agent.errors import InvalidArgument
from cbt_agent.store import Store, SyncStore, TaskChanges, TaskRow

INLINE_ITEMS: Final = 200  # a general query over more items than this runs in a thread
KEEP_REPLIES: Final = 1024  # replies kept for repeated queries, at most (and in bytes:)
KEEP_BYTES: Final = 32 << 20
# Writes by another process (the agent's own CLI opens the database read-only; tests write
# directly) show in any answer starting this long after their commit; the agent's own, at once.
EXTERNAL_CHECK: Final = 0.001

_TASK_CLASS: Final = json.dumps(REPLY_SCHEMA_CLASSES["inventories[]"])
_REF_CLASS: Final = json.dumps(REPLY_SCHEMA_CLASSES["inventories[].resourceRefs[]"])


@dataclass(frozen=True, slots=True)
class Inventory:
    """One task as QueryCbtTask answers it. Never changed: a new one replaces it."""

    uuid: str
    order: tuple[str, int]  # its place in the default order (create date as written, rowid)
    item: dict[str, Any]  # `replies.query_item`
    wire: dict[str, Any]  # `replies.inventory_wire`
    text: bytes  # json.dumps(wire)
    refs: int  # how many resource refs (its entries in the schema map)


def inventory(row: TaskRow) -> Inventory:
    view = TaskView(row.task, row.refs)
    wire = replies.inventory_wire(view)
    return Inventory(
        row.task.uuid,
        row.order,
        replies.query_item(view),
        wire,
        json.dumps(wire).encode(),
        len(row.refs),
    )


@dataclass(frozen=True)
class TaskQuery:
    """A QueryCbtTask's parameters, parsed."""

    conditions: list[query.Condition]
    sort: str | None = None
    start: int = 0
    limit: int | None = None
    count: bool = False
    with_count: bool = False
    fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Read:
    """What one hop to the store thread brought back, built there (not on the loop). `full`:
    `changed` is every task, `keys` and `by_uuid` its index (the loop only assigns them)."""

    full: bool
    changed: list[Inventory]
    gone: frozenset[str]
    keys: list[tuple[tuple[str, int], str]]
    by_uuid: dict[str, Inventory]


def _read(s: SyncStore, full: bool) -> _Read:
    changes = s.task_changes()
    if full and not changes.full:
        changes = TaskChanges(True, s.task_rows(), frozenset())
    changed = [inventory(r) for r in changes.rows]
    if not changes.full:
        return _Read(False, changed, changes.gone, [], {})
    changed.sort(key=lambda inv: inv.order)  # already in order, as the store lists them
    keys = [(inv.order, inv.uuid) for inv in changed]
    return _Read(True, changed, frozenset(), keys, {inv.uuid: inv for inv in changed})


class Inventories:
    """Every task's `Inventory`, in the default order, kept current with the database."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._by_uuid: dict[str, Inventory] = {}
        self._keys: list[tuple[tuple[str, int], str]] = []  # sorted; (order, uuid)
        self._listed: list[Inventory] = []  # in the order of _keys
        self._version: int | None = None  # data_version when the last refresh began
        self._checked = 0.0  # when data_version was last asked (time.monotonic)
        self._need_full = True
        self._refresh: asyncio.Future[None] | None = None
        self._started = 0  # refreshes started
        self._completed = 0  # the last refresh that completed
        self._generation = 0  # changes applied
        # whole replies by the request that asked (pollers ask the same again and again),
        # valid until the next change
        self._replies: dict[Hashable, bytes] = {}
        self._replies_bytes = 0

    async def current(self) -> None:
        """Bring the inventories up to date with every commit this agent made before this
        call, and with every commit of another process made `EXTERNAL_CHECK` seconds before."""
        if self._need_full or self._store.tasks_written():
            need = self._started + 1  # a refresh starting from now on covers this call
        elif self._refresh is not None:
            need = self._started  # every write so far was taken by the refresh under way
        elif self._written_elsewhere():
            need = self._started + 1
        else:
            return
        while self._completed < need:
            if self._refresh is None:
                self._started += 1
                self._refresh = asyncio.ensure_future(self._reload(self._started))
            # shielded: a caller that goes away does not cancel a refresh that has already
            # taken the store's list of changes
            await asyncio.shield(self._refresh)

    def _written_elsewhere(self) -> bool:
        """Whether the database may have changed other than through this agent's store (whose
        writes its triggers announce at once): SQLite's data_version, asked at most every
        `EXTERNAL_CHECK` seconds (its read lock costs two system calls: per query, a tenth of
        the time of a page of 100)."""
        now = time.monotonic()
        if now - self._checked < EXTERNAL_CHECK:
            return False
        self._checked = now
        version = self._store.data_version()
        return version is None or version != self._version

    async def _reload(self, seq: int) -> None:
        try:
            version = self._store.data_version()
            read = await self._store.run(_read, self._need_full)
            self._apply(read)
            self._need_full = False
            self._version = version
            self._completed = seq
        except BaseException:
            self._need_full = True  # the changes taken are lost: read everything next time
            self._version = None
            raise
        finally:
            self._refresh = None

    def _apply(self, read: _Read) -> None:
        if read.full or read.changed or read.gone:
            self._generation += 1
            self._replies.clear()
            self._replies_bytes = 0
        if read.full:
            self._by_uuid, self._keys, self._listed = read.by_uuid, read.keys, read.changed
            return
        for uuid in read.gone:
            self._remove(uuid)
        for inv in read.changed:
            self._remove(inv.uuid)
            key = (inv.order, inv.uuid)
            at = bisect.bisect_left(self._keys, key)
            self._keys.insert(at, key)
            self._listed.insert(at, inv)
            self._by_uuid[inv.uuid] = inv

    def _remove(self, uuid: str) -> None:
        old = self._by_uuid.pop(uuid, None)
        if old is not None:
            at = bisect.bisect_left(self._keys, (old.order, uuid))
            del self._keys[at]
            del self._listed[at]

    async def cached(self, request: Hashable) -> bytes | None:
        """The reply kept for the same `request` (e.g. its uuid and query string), current
        with every commit made before the call; None when there is none."""
        await self.current()
        return self._replies.get(request)

    async def answer(self, q: TaskQuery, request: Hashable | None = None) -> bytes:
        """The reply body of a QueryCbtTask (JSON, ZStack's schema map included), current
        with every commit made before the call, kept for `request` until the next change.
        Raises `InvalidArgument` as `apply_query` does, and for an unknown name in `fields`."""
        await self.current()
        generation = self._generation
        body = await self._answer(q)
        if request is not None and generation == self._generation:  # nothing changed since
            self._keep(request, body)
        return body

    async def _answer(self, q: TaskQuery) -> bytes:
        if not q.conditions and q.sort is None:
            if q.start < 0 or (q.limit is not None and q.limit < 0):
                query.apply_query([], [], fields=QUERY_FIELDS, start=q.start, limit=q.limit)
            end = None if q.limit is None else q.start + q.limit
            return _reply(self._listed[q.start : end], len(self._listed), q)
        candidates = self._by_index(q.conditions)
        listed = self._listed if candidates is None else candidates
        if len(listed) <= INLINE_ITEMS:
            page, total = _select(listed, q)
            return _reply(page, total, q)
        snapshot = list(listed)  # the thread reads a copy: the loop may apply changes meanwhile

        def answer() -> bytes:
            page, total = _select(snapshot, q)
            return _reply(page, total, q)

        return await asyncio.to_thread(answer)

    def _keep(self, request: Hashable, body: bytes) -> None:
        if len(body) > KEEP_BYTES // 8:
            return
        if self._replies_bytes + len(body) > KEEP_BYTES or len(self._replies) >= KEEP_REPLIES:
            self._replies.clear()
            self._replies_bytes = 0
        self._replies_bytes += len(body) - len(self._replies.get(request, b""))
        self._replies[request] = body

    def _by_index(self, conditions: Sequence[query.Condition]) -> list[Inventory] | None:
        """The only tasks a `uuid=` condition lets through (the rest still apply to them)."""
        for c in conditions:
            if c.field == "uuid" and c.op == "=" and c.value is not None:
                found = self._by_uuid.get(c.value)
                return [found] if found is not None else []
        return None


def _select(listed: Sequence[Inventory], q: TaskQuery) -> tuple[list[Inventory], int]:
    of_item = {id(inv.item): inv for inv in listed}
    items, total = query.apply_query(
        [inv.item for inv in listed],
        q.conditions,
        fields=QUERY_FIELDS,
        sort=q.sort,
        start=q.start,
        limit=q.limit,
    )
    return [of_item[id(item)] for item in items], total


def _reply(page: Sequence[Inventory], total: int, q: TaskQuery) -> bytes:
    """The body, byte for byte what json.dumps of the reply dict (schema included) gives."""
    if q.count:
        return json.dumps({"total": total}).encode()
    if q.fields:
        unknown = [f for f in q.fields if f not in INVENTORY_FIELDS]
        if unknown:
            raise InvalidArgument(f"unknown field {unknown[0]!r} in fields", field="fields")
        body: dict[str, Any] = {
            "inventories": [{k: v for k, v in i.wire.items() if k in q.fields} for i in page]
        }
        if q.with_count:
            body["total"] = total
        schema = schema_map(body, REPLY_SCHEMA_CLASSES)
        return json.dumps({**body, "schema": schema} if schema else body).encode()
    parts = [b'{"inventories": [', b", ".join([inv.text for inv in page]), b"]"]
    if q.with_count:
        parts.append(b', "total": %d' % total)
    if page:
        parts += [b', "schema": {', _schema(tuple([inv.refs for inv in page])), b"}"]
    parts.append(b"}")
    return b"".join(parts)


@functools.lru_cache(maxsize=64)
def _schema(refs: tuple[int, ...]) -> bytes:
    """The schema map's entries for a page whose tasks have `refs` resource refs each (pages
    of a kind repeat: tasks with the same number of disks)."""
    parts: list[str] = []
    for i, n in enumerate(refs):
        parts.append(f'"inventories[{i}]": {_TASK_CLASS}')
        parts += [f'"inventories[{i}].resourceRefs[{j}]": {_REF_CLASS}' for j in range(n)]
    return ", ".join(parts).encode()
