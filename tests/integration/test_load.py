"""A bounded load on loopback: bursts of concurrent API calls on the same and on different
tasks, then the invariants checked against SQLite and QEMU: one task per VM, no double Enable,
no lost or impossible transition, exports in the database exactly those QEMU has, bitmaps
exactly the checkpoints, every job finished and none with an internal error."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from collections.abc import Callable
from typing import Any

import pytest
import stack
from apiharness import Api, P

from cbt_agent.store import SyncStore

pytestmark = pytest.mark.stack


def check_invariants(api: Api, vms: dict[str, stack.TestVm]) -> dict[str, str]:
    """Returns {task uuid: status} after checking everything agrees."""
    store = SyncStore(api.config.db_path, readonly=True)
    try:
        tasks = store.list_tasks()
        assert len({t.vm_uuid for t in tasks}) == len(tasks), "two tasks for one VM"
        statuses: dict[str, str] = {}
        for t in tasks:
            history = store.history_rows(t.uuid)
            for prev, row in itertools.pairwise(history):
                assert row["from_status"] == prev["to_status"], f"broken history {history}"
            assert history[-1]["to_status"] == t.status.value
            assert t.operation is None, f"task {t.uuid} left mid-{t.operation}"
            vm = vms[t.vm_uuid]
            exports = store.exports(t.uuid)
            live = {e["id"] for e in vm.qmp("query-block-exports")} if vm.is_running() else set()
            if t.status.value == "Running":
                assert {e.export_id for e in exports} == live and len(live) == len(vm.volumes)
            else:
                assert exports == [] and live == set(), f"{t.status} with exports {live}"
            if vm.is_running():
                # named nodes, not query-block: while fleecing runs it shows the filter node
                nodes = vm.qmp("query-named-block-nodes", {"flat": True})
                on_disk = {
                    b.get("name", "") for n in nodes for b in n.get("dirty-bitmaps", []) or []
                }
                ours = {n for n in on_disk if n.startswith("cbt-") and not n.startswith("cbt-tmp-")}
                assert ours == {c.name for c in store.checkpoints(t.uuid)}
            statuses[t.uuid] = t.status.value
        assert all(j.state != "Running" for j in [store.get_job(u) for u in _job_uuids(store)])
        scratch = api.config.scratch_dir
        running_files = sum(len(store.exports(t.uuid)) for t in tasks)
        assert len(os.listdir(scratch)) == running_files if scratch.exists() else True
        return statuses
    finally:
        store.close()


def _job_uuids(store: SyncStore) -> list[str]:
    return [r[0] for r in store.db.execute("SELECT uuid FROM api_jobs").fetchall()]


async def test_concurrent_calls_leave_a_consistent_state(
    api: Api, vm_factory: Callable[..., stack.TestVm]
) -> None:
    rng = random.Random(20261127)
    running = [vm_factory([16]) for _ in range(2)]
    stopped = vm_factory([16], start=False)
    vms = {vm.vm_uuid: vm for vm in [*running, stopped]}

    # 30 concurrent Creates, 10 per VM: exactly one per VM wins
    creates = [
        api.call(
            "POST", f"{P}/cbt-task/create", {"params": {"name": f"c{i}", "vmInstanceUuid": vm}}
        )
        for i, vm in enumerate(list(vms) * 10)
    ]
    replies = await asyncio.gather(*creates)
    won = [r for r in replies if r.status == 200]
    assert len(won) == 3
    lost = [r for r in replies if r.status != 200]
    assert all("have been protected by task" in r.body["error"]["details"] for r in lost)
    task_of = {
        r.body["inventory"]["resourceRefs"][0]["resourceUuid"]: r.body["inventory"]["uuid"]
        for r in won
    }
    tasks = [task_of[vm.vm_uuid] for vm in running]

    # 100 mixed calls at once, on the same and different tasks
    calls: list[Any] = []
    for _ in range(60):
        task = rng.choice(tasks)
        op = rng.choice(["enable", "disable"])
        calls.append(api.call("POST", f"{P}/cbt-task/{op}/{task}", {"params": {}}))
    for _ in range(10):  # the VM is not running: every Enable fails, nothing changes
        calls.append(api.call("POST", f"{P}/cbt-task/enable/{task_of[stopped.vm_uuid]}", {}))
    for _ in range(20):
        calls.append(api.request("GET", f"{P}/cbt-task", params={"q": "status?=Running,Stopped"}))
    job = "c" * 32  # the same job uuid ten times: one is taken, nine are refused
    for _ in range(10):
        calls.append(
            api.request(
                "POST",
                f"{P}/cbt-task/disable/{tasks[0]}",
                {"params": {}},
                headers={"X-Job-UUID": job},
            )
        )
    rng.shuffle(calls)
    replies = await asyncio.gather(*calls)
    assert len(replies) == 100
    assert sum(1 for r in replies if r.status == 202) == 1  # the one X-Job-UUID that was taken
    assert sum(1 for r in replies if r.status == 400 and "Duplicate job uuid" in r.body) == 9
    for r in replies:
        assert r.status in (200, 202, 400, 503), r
        if r.status == 503:
            assert r.body["error"]["code"] in ("SYS.1006", "SYS.1007"), r
    await api.poll(f"{api.base}/zstack/v1/api-jobs/{job}")
    statuses = check_invariants(api, vms)
    assert statuses[task_of[stopped.vm_uuid]] == "Created"

    # every Enable that succeeded made exactly one Starting -> Running, every Disable that
    # found it Running one Running -> Stopped: count them against the history
    store = SyncStore(api.config.db_path, readonly=True)
    try:
        for task in tasks:
            rows = store.history_rows(task)
            ups = sum(
                1 for r in rows if (r["from_status"], r["to_status"]) == ("Starting", "Running")
            )
            downs = sum(1 for r in rows if r["to_status"] == "Stopped")
            assert ups - downs == (1 if statuses[task] == "Running" else 0)
    finally:
        store.close()

    # and the tasks still work: disable all, one more incremental each
    for task in tasks:
        assert (await api.call("POST", f"{P}/cbt-task/disable/{task}", {})).status == 200
    for vm in running:
        await vm.write(vm.volumes[0].volume_uuid, 0, 512, 0x42)
    for task in tasks:
        r = await api.call("POST", f"{P}/cbt-task/enable/{task}", {})
        info = r.body["volumeCbtBackupInfos"][0]
        assert info["mode"] in ("incremental", "full")
        assert info["changedBytes"] >= 65536
        assert (await api.call("POST", f"{P}/cbt-task/disable/{task}", {})).status == 200
    check_invariants(api, vms)
