"""Ownership of OUT: one run at a time, stale owners taken over, on local disk and S3.

Time is a ManualClock that the tests move by hand: expiry, staleness and renewal are
exact to the second and take no time; storage is real (a directory, or S3 on moto)."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import re
import subprocess
import threading
import time
import uuid

import pytest
import s3_server

from dreg.errors import InputError, StorageError
from dreg.io import ownership, storage
from dreg.io.ownership import LeaseLost, OwnedElsewhere, acquire, is_stale, read_owner
from dreg.io.ownership import process as owner_process
from dreg.io.ownership import s3 as s3_records
from dreg.io.ownership.records import record_name

START = 1_000_000.0  # when a ManualClock starts: long ago, so no real time passes for it


class ManualClock(ownership.Clock):
    """A clock the test moves by hand. A thread waiting on it (a lease's renewer) sleeps
    until the test moves the time to its deadline."""

    def __init__(self, now: float = START):
        self._now = now
        self._changed = threading.Condition()
        self._deadlines: dict[threading.Thread, float] = {}

    def now(self) -> float:
        with self._changed:
            return self._now

    # Storage's clock is this clock too: a record was written when its writer's clock
    # (this one, in these tests) said it was renewed.
    def storage_now(self, backend) -> float:
        return self.now()

    def written(self, record: dict) -> float:
        return float(record["renewed"])

    def advance(self, seconds: float) -> None:
        with self._changed:
            self._now += seconds
            self._changed.notify_all()

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        me = threading.current_thread()
        with self._changed:
            self._deadlines[me] = self._now + seconds
            self._changed.notify_all()
            try:
                # `stop` is set without notifying this condition: look at it now and then.
                while not stop.is_set() and self._now < self._deadlines[me]:
                    self._changed.wait(0.01)
            finally:
                del self._deadlines[me]
                self._changed.notify_all()
            return stop.is_set()

    def wake_renewer(self) -> float:
        """Move the time to the deadline of the one thread waiting on this clock, and
        return the new time once that thread has done its work (it waits again, or has
        ended)."""
        limit = time.monotonic() + 30  # against a hang only: nothing depends on it
        with self._changed:
            assert self._changed.wait_for(lambda: self._deadlines, timeout=30), "no renewer"
            [(thread, deadline)] = self._deadlines.items()
            self._now = max(self._now, deadline)
            self._changed.notify_all()
            # Busy until it waits again with a later deadline; an ending thread does not
            # notify, so look now and then.
            while thread.is_alive() and self._deadlines.get(thread, self._now) <= self._now:
                assert time.monotonic() < limit, "the renewer did not finish"
                self._changed.wait(0.01)
            return self._now


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def out(request, tmp_path):
    """A fresh OUT: a local directory (not created yet) or an S3 prefix on moto."""
    if request.param == "local":
        return str(tmp_path / "out")
    server = request.getfixturevalue("s3")
    return server.uri(f"owned-{uuid.uuid4().hex[:8]}")


def write_lease(out: str, owner: str, expires: float, generation: int | None = None,
                renewed: float | None = None) -> None:
    """A lease record as a run on another machine would have left it (a 60 s lease unless
    `renewed` says otherwise)."""
    if generation is None:
        current = read_owner(out)
        generation = (current["generation"] if current else 0) + 1
    record = {
        "owner": owner,
        "host": "elsewhere",
        "pid": 4242,
        "acquired": expires - 60 if renewed is None else renewed,
        "renewed": expires - 60 if renewed is None else renewed,
        "expires": expires,
        "token": uuid.uuid4().hex,
        "generation": generation,
        "released": None,
    }
    name = record_name(generation)
    storage.write_text(storage.join(out, ownership.LEASE_DIR, name), json.dumps(record))


def test_second_owner_refused_and_same_owner_reacquires(out):
    first = acquire(out, "run-a")
    assert read_owner(out)["owner"] == "run-a"
    with pytest.raises(OwnedElsewhere) as refused:
        acquire(out, "run-b")
    message = str(refused.value)
    assert isinstance(refused.value, InputError)
    assert storage.normalize_uri(out) in message and "run run-a" in message
    assert re.search(r"lease renewed \d+ s ago, expires in \d+ s\); wait for it", message)
    assert refused.value.lease["owner"] == "run-a"
    copy = pickle.loads(pickle.dumps(refused.value))
    assert str(copy) == message and copy.lease == refused.value.lease

    retried = acquire(out, "run-a")  # a retried flow with the same run id
    assert retried.token != first.token and read_owner(out)["token"] == retried.token
    with pytest.raises(LeaseLost, match="run-a"):  # the earlier attempt is superseded
        first.renew()
    retried.release()
    assert read_owner(out) is None


def test_release_lets_another_owner_in(out):
    first = acquire(out, "run-a")
    first.release()
    assert read_owner(out) is None
    second = acquire(out, "run-b")
    assert second.previous is None
    first.release()  # a second release is a no-op
    with pytest.raises(LeaseLost, match="released"):
        first.renew()
    assert read_owner(out)["owner"] == "run-b"


def test_expired_lease_is_taken_over_and_old_owner_loses_it(out):
    clock = ManualClock()
    old = acquire(out, "run-a", lease_seconds=30, clock=clock)
    clock.advance(31)
    with pytest.raises(OwnedElsewhere):  # expired, but within the clock-skew margin
        acquire(out, "run-b", lease_seconds=60, clock=clock)
    new = acquire(out, "run-b", lease_seconds=60, skew_seconds=0, clock=clock)
    assert new.previous["owner"] == "run-a"
    assert read_owner(out)["took_over_from"] == "run-a"
    with pytest.raises(LeaseLost, match="run-b took it over"):
        old.renew()
    with pytest.raises(LeaseLost):
        old.check()
    old.release()  # not the owner any more: does nothing
    assert read_owner(out)["owner"] == "run-b"
    clock.advance(59)
    new.renew()
    assert read_owner(out)["expires"] == new.expires == START + 31 + 59 + 60
    new.check()


def test_a_lease_is_stale_exactly_skew_seconds_after_it_expires(out):
    clock = ManualClock()
    acquire(out, "run-a", lease_seconds=30, clock=clock)
    clock.advance(30 + ownership.CLOCK_SKEW_S)
    assert not is_stale(read_owner(out, clock), clock.now())
    with pytest.raises(OwnedElsewhere, match=r"lease renewed 35 s ago, expires in 0 s\)"):
        acquire(out, "run-b", lease_seconds=60, clock=clock)
    clock.advance(0.5)
    assert is_stale(read_owner(out, clock), clock.now())
    assert acquire(out, "run-b", lease_seconds=60, clock=clock).previous["owner"] == "run-a"


def test_dead_owner_from_another_machine_is_stale(out):
    clock = ManualClock()
    write_lease(out, "run-dead", expires=clock.now() - 3600)
    lease = read_owner(out, clock)
    assert lease["owner"] == "run-dead" and is_stale(lease, clock.now())
    assert not is_stale(dict(lease, written=clock.now() - 1), clock.now())
    taken = acquire(out, "run-b", clock=clock)
    assert taken.previous["owner"] == "run-dead"
    assert read_owner(out)["owner"] == "run-b"


def test_live_owner_from_another_machine_is_respected(out):
    clock = ManualClock()
    write_lease(out, "run-live", expires=clock.now() + 60)
    expected = r"run run-live \(host elsewhere, pid 4242; lease renewed 0 s ago, expires in 60 s\)"
    with pytest.raises(OwnedElsewhere, match=expected):
        acquire(out, "run-b", clock=clock)
    clock.advance(59)
    with pytest.raises(OwnedElsewhere, match="lease renewed 59 s ago, expires in 1 s"):
        ownership.check_free(out, clock=clock)


def test_old_generations_are_pruned(out):
    lease = acquire(out, "run-a", lease_seconds=5)
    for _ in range(5):
        lease.renew()
    fs, path = storage.filesystem(storage.join(out, ownership.LEASE_DIR))
    names = sorted(name.rsplit("/", 1)[-1] for name in fs.ls(path, detail=False, refresh=True))
    assert names == [record_name(g) for g in (5, 6)]
    lease.release()


@pytest.mark.parametrize("stale_first", [False, True], ids=["fresh", "takeover"])
def test_thread_race_has_one_winner(out, stale_first):
    # The dead owner's record was just written: its age is told by the writer's clock.
    clock = ManualClock(time.time())
    if stale_first:
        write_lease(out, "run-dead", expires=time.time() - 3600)
    else:
        acquire(out, "warm-up").release()  # S3 support checked and client made outside the race
    barrier = threading.Barrier(8)
    results: dict[int, object] = {}

    def contend(i: int) -> None:
        barrier.wait()
        try:
            results[i] = acquire(out, f"run-{i}", lease_seconds=10, clock=clock)
        except OwnedElsewhere as exc:
            results[i] = exc

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    winners = [i for i, r in results.items() if isinstance(r, ownership.Lease)]
    assert len(results) == 8 and len(winners) == 1, results
    assert read_owner(out)["owner"] == f"run-{winners[0]}"
    for i, result in results.items():
        if i != winners[0]:
            assert f"run run-{winners[0]}" in str(result)


def _contend_in_process(out: str, index: int, barrier, queue) -> None:
    """Two rounds: acquire a fresh OUT, then take over the stale lease the test wrote."""
    clock = ManualClock(time.time())  # dates records as their writers' clocks did
    for round_ in ("fresh", "takeover"):
        barrier.wait()  # all start together
        try:
            acquire(out, f"proc-{round_}-{index}", lease_seconds=10, clock=clock)
            queue.put((round_, index, "won"))
        except OwnedElsewhere as exc:
            queue.put((round_, index, str(exc)))
        barrier.wait()  # round over; the test prepares the next one


@pytest.mark.full  # starts processes that race
def test_process_race_on_local_disk_has_one_winner(tmp_path):
    """4 spawned processes race to create, then to take over, the same OUT (one set of
    processes for both rounds: each spends a second or two importing dreg)."""
    out = str(tmp_path / "out")
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(5)  # the processes and this test
    queue = context.Queue()
    processes = [
        context.Process(target=_contend_in_process, args=(out, i, barrier, queue), daemon=True)
        for i in range(4)
    ]
    for process in processes:
        process.start()
    try:
        for round_ in ("fresh", "takeover"):
            barrier.wait(timeout=60)
            barrier.wait(timeout=60)
            outcomes = [queue.get(timeout=10) for _ in processes]
            assert {r for r, _, _ in outcomes} == {round_}
            winners = [i for _, i, outcome in outcomes if outcome == "won"]
            assert len(winners) == 1, outcomes
            assert read_owner(out)["owner"] == f"proc-{round_}-{winners[0]}"
            if round_ == "fresh":  # the winner "dies": its lease is left to expire
                write_lease(out, "run-dead", expires=time.time() - 3600)
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


def test_keep_alive_renews_and_releases(out):
    clock = ManualClock()
    lease = acquire(out, "run-a", lease_seconds=30, clock=clock)
    first_expiry = read_owner(out)["expires"]
    assert first_expiry == START + 30
    with lease.keep_alive() as kept:  # renewed every 10 s
        for renewal in (1, 2, 3, 4):
            assert clock.wake_renewer() == START + 10 * renewal
            assert read_owner(out)["expires"] == START + 10 * renewal + 30
        kept.check()  # 40 s on: past the first expiry, owned thanks to the renewals
        current = read_owner(out)
        assert current["token"] == lease.token and current["expires"] == first_expiry + 40
        with pytest.raises(OwnedElsewhere):
            acquire(out, "run-b", skew_seconds=0, clock=clock)
    assert read_owner(out) is None
    acquire(out, "run-b").release()


def test_keep_alive_fails_loudly_when_taken_over(out):
    clock = ManualClock()
    lease = acquire(out, "run-a", lease_seconds=30, clock=clock)
    with pytest.raises(LeaseLost, match="run-b took it over"):
        with lease.keep_alive():
            lease.check()
            # Taken over elsewhere (between two renewals: the renewer sleeps meanwhile).
            write_lease(out, "run-b", expires=clock.now() + 60)
            clock.wake_renewer()  # its renewal is refused: it stops
            with pytest.raises(LeaseLost, match="run-b took it over"):
                lease.check()
    assert read_owner(out)["owner"] == "run-b"  # not released by the run that lost it


def test_release_inside_keep_alive_is_not_a_failure(out):
    clock = ManualClock()
    lease = acquire(out, "run-a", lease_seconds=30, clock=clock)
    with lease.keep_alive():
        lease.release()
        clock.wake_renewer()  # its renewal finds the lease released, and stops quietly
    assert read_owner(out) is None


def test_keep_alive_rides_out_storage_failures_until_the_lease_expires(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    clock = ManualClock()
    lease = acquire(out, "run-a", lease_seconds=30, clock=clock)
    backend_of = ownership.lease._backend
    answers = {"store": False}

    class Unanswered:  # a store that does not answer for now
        def generations(self):
            raise StorageError("the store does not answer")

    monkeypatch.setattr(ownership.lease, "_backend",
                        lambda uri: backend_of(uri) if answers["store"] else Unanswered())
    with pytest.raises(LeaseLost, match="could not renew the ownership lease of run run-a "
                                        "before it expired: .*the store does not answer"):
        with lease.keep_alive():
            clock.wake_renewer()  # 10 s: the renewal fails, and is tried again
            assert isinstance(lease.last_error, StorageError)
            lease.check()
            answers["store"] = True
            clock.wake_renewer()  # 20 s: renewed until 50 s
            assert lease.last_error is None and lease.expires == START + 50
            answers["store"] = False
            for _ in range(3):  # 30, 40, 50 s: failures while the lease is still valid
                clock.wake_renewer()
            lease.check()  # at 50 s: its last second
            clock.advance(0.5)
            with pytest.raises(LeaseLost, match="expired without renewal .*does not answer"):
                lease.check()
            clock.wake_renewer()  # 60 s: too late; the renewer gives up
            with pytest.raises(LeaseLost, match="before it expired"):
                lease.check()
    answers["store"] = True
    assert read_owner(out)["owner"] == "run-a"  # expired, not released: stale for others


def test_keep_alive_releases_when_the_block_fails(out):
    lease = acquire(out, "run-a", lease_seconds=5)
    with pytest.raises(RuntimeError, match="boom"):
        with lease.keep_alive():
            raise RuntimeError("boom")
    assert read_owner(out) is None


def test_lease_expired_without_renewal_fails_check(out):
    clock = ManualClock()
    lease = acquire(out, "run-a", lease_seconds=30, clock=clock)
    lease.check()
    clock.advance(30)
    lease.check()  # its last second
    clock.advance(0.5)
    with pytest.raises(LeaseLost, match="expired without renewal"):
        lease.check()


def test_invalid_arguments(out):
    with pytest.raises(InputError):
        acquire(out, "", lease_seconds=5)
    with pytest.raises(InputError):
        acquire(out, "run-a", lease_seconds=0)


def test_unreadable_record_is_held_then_stale(tmp_path):
    out = str(tmp_path / "out")
    storage.write_text(storage.join(out, ownership.LEASE_DIR, record_name(1)), "")
    with pytest.raises(OwnedElsewhere, match="being written or is damaged"):
        acquire(out, "run-a")
    # Its age is told by its modification time (storage's clock), not by its contents.
    written = START - 3600
    path = tmp_path / "out" / ownership.LEASE_DIR / record_name(1)
    os.utime(path, (written, written))
    clock = ManualClock(written + ownership.UNREADABLE_GRACE_S + ownership.CLOCK_SKEW_S)
    with pytest.raises(OwnedElsewhere, match="being written or is damaged"):
        acquire(out, "run-a", clock=clock)
    clock.advance(0.5)
    assert acquire(out, "run-a", clock=clock).generation == 2


class _IgnoresConditions:
    """A client for a store that silently ignores If-None-Match."""

    def __init__(self, client):
        self._client = client

    def put_object(self, **kwargs):
        kwargs.pop("IfNoneMatch", None)
        return self._client.put_object(**kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


@pytest.mark.s3
def test_s3_store_without_conditional_writes_is_refused(s3, monkeypatch):
    client = s3_records._s3_client()
    monkeypatch.setattr(s3_records, "_s3_client", lambda: _IgnoresConditions(client))
    monkeypatch.setattr(s3_records, "_atomic_checked", set())
    out = s3.uri("no-conditions")
    with pytest.raises(StorageError, match="does not honour conditional writes") as refused:
        acquire(out, "run-a")
    assert s3_server.SECRET_ACCESS_KEY not in str(refused.value)
    assert read_owner(out) is None


def test_lease_length_comes_from_the_environment(out, monkeypatch):
    monkeypatch.setenv(ownership.LEASE_VARIABLE, "20")
    clock = ManualClock()
    lease = acquire(out, "run-a", clock=clock)
    assert lease.lease_seconds == 20
    assert read_owner(out)["expires"] == lease.record["expires"] == START + 20


@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan"])
def test_a_bad_lease_length_is_refused_naming_the_variable(out, monkeypatch, value):
    monkeypatch.setenv(ownership.LEASE_VARIABLE, value)
    for attempt in (lambda: acquire(out, "run-a"), lambda: ownership.check_free(out)):
        with pytest.raises(InputError, match=f"DREG_LEASE_SECONDS={value!r}: must be a num"):
            attempt()


# --- issue 18 item 5: staleness by storage's clock, a bounded lease, fencing ---------------


def test_a_live_owner_whose_clock_is_behind_is_not_taken_over(out):
    """issue 18 item 5: the record was written just now (storage's clock), though its
    writer's clock says an hour ago: its lease is live."""
    write_lease(out, "run-behind", expires=time.time() - 3600)
    with pytest.raises(OwnedElsewhere, match=r"run run-behind .*lease renewed [01] s ago, "
                                             r"expires in (59|60) s\)"):
        acquire(out, "run-b")
    with pytest.raises(OwnedElsewhere, match="run-behind"):
        ownership.check_free(out)


def test_a_dead_owner_whose_clock_is_ahead_is_taken_over(tmp_path):
    """issue 18 item 5: a record last written two minutes ago (by its modification time)
    is stale, though its writer's clock dated it an hour ahead."""
    out = str(tmp_path / "out")
    write_lease(out, "run-ahead", expires=time.time() + 3660)
    two_minutes_ago = time.time() - 120
    path = tmp_path / "out" / ownership.LEASE_DIR / record_name(1)
    os.utime(path, (two_minutes_ago, two_minutes_ago))
    assert is_stale(read_owner(out), time.time())
    assert acquire(out, "run-b").previous["owner"] == "run-ahead"


def test_a_record_claiming_more_than_the_longest_lease_is_damaged(out):
    """issue 18 item 5: a lease ten years long is no run to wait for: damaged, held only
    for the grace of an unreadable record."""
    now = time.time()
    write_lease(out, "run-forever", expires=now + 10 * 365 * 86400, renewed=now)
    with pytest.raises(OwnedElsewhere, match="being written or is damaged"):
        acquire(out, "run-b")
    clock = ManualClock(now + ownership.UNREADABLE_GRACE_S + ownership.CLOCK_SKEW_S + 2)
    assert acquire(out, "run-b", clock=clock).owner == "run-b"


@pytest.mark.parametrize("value", ["1e308", "inf", "3601"])
def test_a_lease_longer_than_the_longest_is_refused(out, monkeypatch, value):
    """issue 18 item 5: DREG_LEASE_SECONDS=1e308 killed the renewal thread."""
    monkeypatch.setenv(ownership.LEASE_VARIABLE, value)
    with pytest.raises(InputError, match=f"DREG_LEASE_SECONDS={value!r}: .*at most 3600"):
        acquire(out, "run-a")
    with pytest.raises(InputError, match="at most 3600"):
        acquire(out, "run-a", lease_seconds=1e308)
    monkeypatch.setenv(ownership.LEASE_VARIABLE, "3600")
    acquire(out, "run-a").release()


class _BrokenClock(ManualClock):
    def wait(self, stop, seconds):
        raise OverflowError("timeout value is too large")


def test_a_renewer_that_dies_fails_the_run(tmp_path):
    """issue 18 item 5: a renewal thread that dies of anything is noticed by the run."""
    lease = acquire(str(tmp_path / "out"), "run-a", lease_seconds=30, clock=_BrokenClock())
    with pytest.raises(LeaseLost, match="renewal .* stopped: OverflowError"):
        with lease.keep_alive():
            deadline = time.monotonic() + 10
            while lease._failure is None and time.monotonic() < deadline:
                time.sleep(0.01)
            lease.check("creating the field")


def test_verify_sees_a_takeover_before_the_renewer_does(out):
    """issue 18 item 5: a run that lost OUT between renewals stops before its next write
    (one read of the lease), naming what it was about to do."""
    clock = ManualClock()
    lease = acquire(out, "run-a", lease_seconds=30, clock=clock)
    lease.verify("stage 1")
    write_lease(out, "run-b", expires=clock.now() + 60)
    lease.check()  # the local check cannot know
    with pytest.raises(LeaseLost, match="before creating the field: run run-b took it over"):
        lease.verify("creating the field")
    with pytest.raises(LeaseLost, match="run-b took it over"):
        lease.check("writing a chunk")  # from now on, the local check knows too


def test_verify_during_a_renewal_keeps_the_lease(out, monkeypatch):
    """A renewal by the renewer thread that lands while `verify` reads the lease: the read
    shows the generation before the renewal, which is still this run's. (Seen as a
    failed run, "changed by another process of this run", on S3 under a loaded cluster.)"""
    from dreg.io.ownership import lease as lease_module

    clock = ManualClock()
    lease = acquire(out, "run-a", lease_seconds=30, clock=clock)
    read = lease_module.latest
    renewing = []

    def read_then_renew(backend, uri):
        found = read(backend, uri)
        if not renewing:  # the renewer writes its next generation after this read
            renewing.append(True)
            lease.renew()
        return found

    monkeypatch.setattr(lease_module, "latest", read_then_renew)
    before = lease.generation
    lease.verify("recording stage 1")
    assert lease.generation == before + 1
    lease.check("writing a chunk")


def test_flows_fence_every_write_under_the_held_out(tmp_path):
    """issue 18 item 5: the flows' fence checks the lease of the OUT that contains the
    written location, before each stage, field creation or removal and batch."""
    from flows.ownership import fence, holding

    out = str(tmp_path / "out")
    clock = ManualClock()
    lease = acquire(out, "run-a", lease_seconds=30, clock=clock)
    inside = str(tmp_path / "out" / "stages" / "1-affine" / "field-x.ome.zarr")
    fence(inside, "creating the field")  # no lease held here yet: nothing to check
    with holding(lease):
        fence(inside, "creating the field", verify=True)
        fence(str(tmp_path / "outside"), "anything", verify=True)
        write_lease(out, "run-b", expires=clock.now() + 60)
        fence(str(tmp_path / "out-other"), "anything", verify=True)  # another OUT
        with pytest.raises(LeaseLost, match="before removing the field: run run-b took it over"):
            fence(inside, "removing the field", verify=True)
        with pytest.raises(LeaseLost, match="submitting batch 3"):
            fence(inside, "submitting batch 3")
        clock.advance(31)
    fence(inside, "after the run")  # released from the fence with the block


# --- issue 18 item 12: an owner that died on this very machine ------------------------------


def dead_process() -> tuple[int, int]:
    """The pid and start time of a process that ran here and is gone."""
    child = subprocess.Popen(["sleep", "30"])
    started = owner_process.start_time(child.pid)[0]
    child.kill()
    child.wait()
    return child.pid, started


def write_local_lease(out: str, owner: str, pid: int, started: int, **changes) -> None:
    """A live lease record as a run on this machine, in this boot, would have left it."""
    now = time.time()
    record = {"owner": owner, **owner_process.identity(), "pid": pid, "pid_start": started,
              "acquired": now, "renewed": now, "expires": now + 60,
              "token": uuid.uuid4().hex, "generation": 1, "released": None, **changes}
    storage.write_text(storage.join(out, ownership.LEASE_DIR, record_name(1)),
                       json.dumps(record))


needs_proc = pytest.mark.skipif(owner_process.boot_id() is None, reason="no /proc boot id")


@needs_proc
def test_an_owner_that_died_on_this_machine_is_taken_over_at_once(out):
    """issue 18 item 12: its lease is live, but its pid is gone from this host and boot:
    taken over at once, saying so; never 'stop it'."""
    pid, started = dead_process()
    write_local_lease(out, "run-dead", pid, started)
    told = []
    notice = ownership.check_free(out, tell=told.append)
    assert told == [notice]
    assert f"run run-dead (pid {pid} on this machine) is no longer running" in notice
    assert "taking over" in notice and "stop it" not in notice
    lease = acquire(out, "run-b")
    assert lease.owner_gone and lease.previous["owner"] == "run-dead"
    assert read_owner(out)["took_over_from"] == "run-dead"


@needs_proc
def test_a_reused_pid_is_an_owner_gone(out):
    """issue 18 item 12: the pid runs, but a process started at another time holds it."""
    me = owner_process.identity()
    write_local_lease(out, "run-dead", me["pid"], me["pid_start"] + 1)
    assert acquire(out, "run-b").owner_gone


@needs_proc
def test_a_live_owner_on_this_machine_is_still_refused(out):
    """issue 18 item 12: the owner's process runs (this one): refused, as before."""
    me = owner_process.identity()
    write_local_lease(out, "run-live", me["pid"], me["pid_start"])
    with pytest.raises(OwnedElsewhere, match=r"run run-live .*wait for it to finish or "
                                             r"stop it$"):
        acquire(out, "run-b")
    with pytest.raises(OwnedElsewhere):
        ownership.check_free(out)


@pytest.mark.parametrize("changes", [{"boot_id": "another-boot"}, {"host": "elsewhere"},
                                     {"pid_namespace": "pid:[1]"},
                                     {"boot_id": None, "pid_start": None}],
                         ids=["another boot", "another host", "another container",
                              "an old record"])
def test_an_owner_that_cannot_be_checked_is_waited_for(out, changes):
    """issue 18 item 12: a dead pid of another boot, host or container (or a record
    without the fields) cannot be checked: the lease is waited for, as before, and the
    message says when OUT is free if that run is gone."""
    pid, started = dead_process()
    write_local_lease(out, "run-unknown", pid, started, **changes)
    with pytest.raises(OwnedElsewhere, match=r"run run-unknown .*wait for it to finish or "
                                             r"stop it; if it is no longer running, OUT is "
                                             r"free in (64|65) s"):
        acquire(out, "run-b")


class SteppingClock(ManualClock):
    """A clock whose waits pass at once: each moves the time on by its seconds, then
    calls `after_wait` (the test's way to act while a caller waits). Like a real clock,
    it also moves on a little (`tick` seconds) whenever it is read."""

    def __init__(self, after_wait=lambda now: None, tick: float = 0.0):
        super().__init__()
        self.after_wait = after_wait
        self.tick = tick
        self.waits: list[float] = []

    def now(self) -> float:
        if self.tick:
            self.advance(self.tick)
        return super().now()

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        self.waits.append(seconds)
        self.advance(seconds)
        self.after_wait(self.now())
        return stop.is_set()


def test_waiting_for_a_free_out_returns_at_once(tmp_path):
    told = []
    clock = SteppingClock()
    assert ownership.wait_until_free(str(tmp_path / "out"), 60, clock=clock,
                                     on_wait=told.append) == 0
    assert told == [] and clock.waits == []


def test_a_duplicate_waits_until_the_owner_releases(tmp_path):
    out = str(tmp_path / "out")
    owner = acquire(out, "run-a", lease_seconds=60, clock=ManualClock())
    told = []
    clock = SteppingClock(lambda now: owner.release() if now >= START + 20 else None,
                          tick=1e-6)
    waited = ownership.wait_until_free(out, 3600, poll_s=5, clock=clock,
                                       on_wait=told.append)
    assert waited == pytest.approx(20, abs=0.01) and clock.waits == [5, 5, 5, 5]
    assert len(told) == 1 and "run run-a" in told[0]


def test_a_duplicate_waits_until_a_silent_owner_is_stale(tmp_path):
    out = str(tmp_path / "out")
    clock = SteppingClock()
    write_lease(out, "run-silent", expires=clock.now() + 60)
    waited = ownership.wait_until_free(out, 3600, poll_s=5, clock=clock)
    # Stale once more than CLOCK_SKEW_S past its expiry: seen at the next poll after that.
    assert 60 + ownership.CLOCK_SKEW_S < waited <= 60 + ownership.CLOCK_SKEW_S + 5


def test_a_duplicate_gives_up_after_its_timeout_naming_the_owner(tmp_path):
    out = str(tmp_path / "out")
    clock = SteppingClock()

    def renew(now: float) -> None:  # a live owner elsewhere, renewing every poll
        write_lease(out, "run-busy", expires=now + 60)

    clock.after_wait = renew
    renew(clock.now())
    with pytest.raises(OwnedElsewhere, match="run run-busy"):
        ownership.wait_until_free(out, 30, poll_s=7, clock=clock)
    assert sum(clock.waits) == 30 and clock.waits[-1] == 2
