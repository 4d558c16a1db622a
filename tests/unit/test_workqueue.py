"""The operator's work queue: dedup, one worker per key, hand-offs before new work before sweeps."""

from __future__ import annotations

import threading

from thaw_operator.workqueue import HANDOFF, SPEC, SWEEP, WorkQueue


def take(q: WorkQueue):
    item = q.get(timeout=0)
    return None if item is None else item[0]


def test_a_burst_of_events_for_one_job_is_one_reconcile():
    q = WorkQueue()
    for _ in range(5):
        q.add("a")
    q.add("b")
    assert len(q) == 2
    assert take(q) == "a" and take(q) == "b" and take(q) is None


def test_a_key_added_while_being_reconciled_waits_for_that_reconcile_then_runs_again():
    q = WorkQueue()
    q.add("a")
    assert take(q) == "a"
    q.add("a")  # an event arrives mid-reconcile
    q.add("a")
    assert take(q) is None  # no second worker gets it now
    q.done("a")
    assert take(q) == "a"  # once again, not twice
    q.done("a")
    assert take(q) is None


def test_hand_offs_go_before_new_jobs_and_new_jobs_before_the_sweep():
    q = WorkQueue()
    for k in ("s1", "s2", "s3"):
        q.add(k, SWEEP)
    q.add("new1", SPEC)
    q.add("h1", HANDOFF)
    q.add("new2", SPEC)
    q.add("s3", HANDOFF)  # an event for a key the sweep queued moves it up
    q.add("h1", SWEEP)  # and a lower one never moves a key down
    assert [take(q) for _ in range(7)] == ["h1", "s3", "new1", "new2", "s1", "s2", None]


def test_a_key_re_added_mid_reconcile_keeps_the_best_priority_asked():
    q = WorkQueue()
    q.add("a")
    take(q)
    q.add("a", SWEEP)
    q.add("a", HANDOFF)
    q.add("b", SPEC)
    q.done("a")
    assert [take(q) for _ in range(2)] == ["a", "b"]


def test_get_reports_the_wait_and_times_out_when_empty():
    q = WorkQueue()
    q.add("a")
    key, waited, priority = q.get(timeout=0)
    assert key == "a" and waited >= 0 and priority == SPEC
    assert q.get(timeout=0.05) is None
    got = []
    t = threading.Thread(target=lambda: got.append(q.get(timeout=30)))
    t.start()
    q.add("b")
    t.join(5)
    assert not t.is_alive() and got[0][0] == "b"
