"""The pure placement policy: prefetch, breadth-first filling, losses, retries, budgets."""

from __future__ import annotations

import pytest

from sshexec._scheduler import IN_FLIGHT_BYTES, MAX_DEPTH, Loss, Scheduler, depth_for, refill_at


def scheduler_with(
    *workers: str, prefetch: int = 2, max_retries: int = 1, tasks: int = 0
) -> Scheduler:
    sched = Scheduler(prefetch=prefetch, max_retries=max_retries)
    for worker_id in workers:
        sched.add_worker(worker_id)
    for task_id in range(tasks):
        sched.submit(task_id)
    return sched


# ---- construction ---------------------------------------------------------------------


def test_defaults() -> None:
    sched = Scheduler()
    assert (sched.prefetch, sched.max_retries) == (2, 1)
    assert (sched.queued, sched.in_flight, sched.workers()) == (0, 0, [])
    assert sched.assignments() == []


@pytest.mark.parametrize("prefetch", [0, -1])
def test_prefetch_must_be_positive(prefetch: int) -> None:
    with pytest.raises(ValueError, match="prefetch"):
        Scheduler(prefetch=prefetch)


def test_max_retries_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="max_retries"):
        Scheduler(max_retries=-1)
    assert Scheduler(max_retries=0).max_retries == 0


# ---- placement ------------------------------------------------------------------------


def test_prefetch_caps_tasks_per_worker() -> None:
    sched = scheduler_with("alpha#0", prefetch=2, max_retries=0, tasks=4)
    assert sched.assignments() == [("alpha#0", 0), ("alpha#0", 1)]
    assert sched.assignments() == []  # full: nothing more until a slot frees
    assert (sched.queued, sched.in_flight, sched.load("alpha#0")) == (2, 2, 2)
    sched.complete("alpha#0", 0)
    assert sched.assignments() == [("alpha#0", 2)]
    assert sched.load("alpha#0") == 2


def test_set_depth_deepens_one_worker_breadth_first() -> None:
    sched = scheduler_with("alpha#0", "beta#0", prefetch=1, tasks=6)
    sched.set_depth("alpha#0", 4)
    assert sched.depth("alpha#0") == 4 and sched.depth("beta#0") == 1
    placed = sched.assignments()
    # every worker gets its first task before alpha gets its deeper ones
    assert placed[:2] == [("alpha#0", 0), ("beta#0", 1)]
    assert placed[2:] == [("alpha#0", 2), ("alpha#0", 3), ("alpha#0", 4)]
    assert (sched.load("alpha#0"), sched.load("beta#0"), sched.queued) == (4, 1, 1)
    sched.set_depth("alpha#0", 0)  # never below prefetch
    assert sched.depth("alpha#0") == 1
    sched.set_depth("gone#0", 5)  # unknown worker: ignored
    sched.complete("beta#0", 1)
    assert sched.assignments() == [("beta#0", 5)]  # alpha is over its new depth


def test_a_deep_worker_is_refilled_half_at_a_time() -> None:
    assert [refill_at(d) for d in (1, 2, 3, 4, 5, 8, 64)] == [0, 1, 2, 2, 3, 4, 32]
    sched = scheduler_with("alpha#0", prefetch=8, max_retries=0, tasks=20)
    assert [t for _, t in sched.assignments()] == list(range(8))
    for done in range(3):
        sched.complete("alpha#0", done)
        assert sched.assignments() == []  # still more than half full: nothing sent yet
    sched.complete("alpha#0", 3)
    # half empty: topped up to its depth in one go (one write, one packet)
    assert [t for _, t in sched.assignments()] == [8, 9, 10, 11]
    assert sched.load("alpha#0") == 8


def test_depth_for_covers_the_round_trip() -> None:
    assert depth_for(rtt=0.05, task_seconds=0.01, payload_bytes=100) == 12  # 2 x 5 + 2
    assert depth_for(rtt=0.0001, task_seconds=0.05, payload_bytes=100) == 2
    assert depth_for(rtt=0.5, task_seconds=0.0, payload_bytes=100) == MAX_DEPTH
    big = IN_FLIGHT_BYTES // 3
    assert depth_for(rtt=0.5, task_seconds=0.001, payload_bytes=big) == 3
    assert depth_for(rtt=0.5, task_seconds=0.001, payload_bytes=IN_FLIGHT_BYTES * 4) == 1


def test_prefetch_one_means_one_task_at_a_time() -> None:
    sched = scheduler_with("alpha#0", prefetch=1, tasks=3)
    assert sched.assignments() == [("alpha#0", 0)]
    sched.complete("alpha#0", 0)
    assert sched.assignments() == [("alpha#0", 1)]


def test_breadth_first_filling() -> None:
    sched = scheduler_with("alpha#0", "alpha#1", "beta#0", prefetch=2, tasks=5)
    # Every worker gets one task before any gets a second.
    assert sched.assignments() == [
        ("alpha#0", 0),
        ("alpha#1", 1),
        ("beta#0", 2),
        ("alpha#0", 3),
        ("alpha#1", 4),
    ]
    assert [sched.load(w) for w in sched.workers()] == [2, 2, 1]


def test_breadth_first_tops_up_the_least_loaded_first() -> None:
    sched = scheduler_with("alpha#0", "beta#0", prefetch=3, tasks=6)
    assert len(sched.assignments()) == 6
    sched.complete("beta#0", 1)
    sched.complete("beta#0", 3)
    for task_id in (10, 11, 12):
        sched.submit(task_id)
    # beta has 1 in flight, alpha 3 (full): beta is filled first, alpha gets nothing.
    assert sched.assignments() == [("beta#0", 10), ("beta#0", 11)]
    assert sched.queued == 1


def test_fewer_tasks_than_slots() -> None:
    sched = scheduler_with("alpha#0", "beta#0", prefetch=4, tasks=1)
    assert sched.assignments() == [("alpha#0", 0)]
    assert (sched.queued, sched.in_flight) == (0, 1)


def test_a_worker_added_later_gets_work() -> None:
    sched = scheduler_with("alpha#0", prefetch=1, tasks=3)
    assert sched.assignments() == [("alpha#0", 0)]
    sched.add_worker("beta#0")
    assert sched.assignments() == [("beta#0", 1)]
    assert sched.workers() == ["alpha#0", "beta#0"]


def test_complete() -> None:
    sched = scheduler_with("alpha#0", prefetch=3, tasks=3)
    sched.assignments()
    sched.complete("alpha#0", 1)  # out of order is fine
    assert (sched.load("alpha#0"), sched.in_flight) == (2, 2)
    sched.complete("alpha#0", 1)  # twice: no error, no change
    sched.complete("gone#0", 0)  # unknown worker: no error
    assert sched.in_flight == 2
    sched.complete("alpha#0", 0)
    sched.complete("alpha#0", 2)
    assert sched.in_flight == 0


# ---- cancel and drain -----------------------------------------------------------------


def test_cancel_a_queued_task() -> None:
    sched = scheduler_with("alpha#0", prefetch=1, tasks=4)
    assert sched.assignments() == [("alpha#0", 0)]
    assert sched.cancel(2) is True
    assert sched.queued == 2
    assert sched.cancel(2) is False  # already gone
    assert sched.cancel(0) is False  # dispatched: not the scheduler's to cancel
    assert sched.cancel(99) is False
    sched.complete("alpha#0", 0)
    assert sched.assignments() == [("alpha#0", 1)]
    sched.complete("alpha#0", 1)
    assert sched.assignments() == [("alpha#0", 3)]


def test_cancel_forgets_losses() -> None:
    sched = scheduler_with("alpha#0", "beta#0", prefetch=1, max_retries=3, tasks=1)
    sched.assignments()
    sched.remove_worker("alpha#0")
    assert sched.attempts_lost(0) == 1
    assert sched.cancel(0) is True
    assert sched.attempts_lost(0) == 0


def test_drain_queue() -> None:
    sched = scheduler_with("alpha#0", prefetch=1, tasks=5)
    assert sched.assignments() == [("alpha#0", 0)]
    assert sched.drain_queue() == [1, 2, 3, 4]
    assert (sched.queued, sched.in_flight) == (0, 1)
    assert sched.drain_queue() == []
    sched.complete("alpha#0", 0)
    assert sched.assignments() == []


def test_drain_queue_forgets_losses() -> None:
    sched = scheduler_with("alpha#0", prefetch=1, max_retries=5, tasks=2)
    sched.assignments()
    sched.remove_worker("alpha#0")
    assert sched.attempts_lost(0) == 1
    assert sched.drain_queue() == [0, 1]
    assert sched.attempts_lost(0) == 0


# ---- losing workers -------------------------------------------------------------------


def test_remove_worker_charges_only_the_oldest_and_requeues_the_rest_in_front() -> None:
    sched = scheduler_with("alpha#0", prefetch=3, max_retries=1, tasks=6)
    assert sched.assignments() == [("alpha#0", 0), ("alpha#0", 1), ("alpha#0", 2)]
    loss = sched.remove_worker("alpha#0")
    assert loss == Loss(requeued=(0, 1, 2), failed=(), charged=0)
    assert [sched.attempts_lost(t) for t in range(6)] == [1, 0, 0, 0, 0, 0]
    assert sched.workers() == []
    assert (sched.queued, sched.in_flight) == (6, 0)
    sched.add_worker("beta#0")
    sched.add_worker("beta#1")
    # Requeued tasks come first, in their original order, ahead of 3, 4, 5.
    assert sched.assignments() == [
        ("beta#0", 0),
        ("beta#1", 1),
        ("beta#0", 2),
        ("beta#1", 3),
        ("beta#0", 4),
        ("beta#1", 5),
    ]


def test_remove_worker_charge_respects_dispatch_order_not_task_ids() -> None:
    sched = Scheduler(prefetch=2, max_retries=1)
    sched.add_worker("alpha#0")
    for task_id in (30, 10, 20):
        sched.submit(task_id)
    sched.assignments()
    loss = sched.remove_worker("alpha#0")
    assert loss.charged == 30
    assert loss.requeued == (30, 10)
    assert sched.drain_queue() == [30, 10, 20]


def test_remove_worker_after_completion_charges_the_next_running_task() -> None:
    sched = scheduler_with("alpha#0", prefetch=2, tasks=2)
    sched.assignments()
    sched.complete("alpha#0", 0)
    loss = sched.remove_worker("alpha#0")
    assert loss == Loss(requeued=(1,), failed=(), charged=1)


def test_remove_worker_without_charge() -> None:
    sched = scheduler_with("alpha#0", prefetch=2, max_retries=0, tasks=3)
    sched.assignments()
    loss = sched.remove_worker("alpha#0", charge=False)
    assert loss == Loss(requeued=(0, 1), failed=(), charged=None)
    assert sched.attempts_lost(0) == 0
    assert sched.drain_queue() == [0, 1, 2]


def test_remove_idle_or_unknown_worker() -> None:
    sched = scheduler_with("alpha#0", tasks=0)
    assert sched.remove_worker("alpha#0") == Loss((), (), None)
    assert sched.remove_worker("alpha#0") == Loss((), (), None)
    assert sched.remove_worker("never#0") == Loss((), (), None)
    assert sched.workers() == []


def test_max_retries_exhaustion_fails_the_task() -> None:
    sched = scheduler_with("w#0", prefetch=2, max_retries=1, tasks=2)
    sched.assignments()
    first = sched.remove_worker("w#0")
    assert first == Loss(requeued=(0, 1), failed=(), charged=0)
    assert sched.attempts_lost(0) == 1

    sched.add_worker("w#1")
    assert sched.assignments() == [("w#1", 0), ("w#1", 1)]
    second = sched.remove_worker("w#1")
    assert second == Loss(requeued=(1,), failed=(0,), charged=0)
    assert sched.attempts_lost(0) == 0  # failed tasks are forgotten
    assert sched.drain_queue() == [1]


def test_max_retries_zero_fails_on_first_loss() -> None:
    sched = scheduler_with("w#0", prefetch=3, max_retries=0, tasks=4)
    sched.assignments()
    loss = sched.remove_worker("w#0")
    assert loss == Loss(requeued=(1, 2), failed=(0,), charged=0)
    assert sched.drain_queue() == [1, 2, 3]


def test_losses_accumulate_per_task_across_workers() -> None:
    sched = Scheduler(prefetch=1, max_retries=2)
    sched.submit(7)
    for attempt in range(1, 3):
        worker_id = f"w#{attempt}"
        sched.add_worker(worker_id)
        assert sched.assignments() == [(worker_id, 7)]
        assert sched.remove_worker(worker_id) == Loss((7,), (), 7)
        assert sched.attempts_lost(7) == attempt
    sched.add_worker("w#3")
    sched.assignments()
    assert sched.remove_worker("w#3") == Loss((), (7,), 7)
    assert sched.queued == 0


def test_complete_forgets_losses() -> None:
    sched = scheduler_with("w#0", prefetch=1, max_retries=1, tasks=1)
    sched.assignments()
    sched.remove_worker("w#0")
    sched.add_worker("w#1")
    sched.assignments()
    sched.complete("w#1", 0)
    assert sched.attempts_lost(0) == 0


# ---- budgets (max_tasks_per_child) ----------------------------------------------------


def test_budget_limits_tasks_given() -> None:
    sched = Scheduler(prefetch=2, max_retries=0)
    sched.add_worker("w#0", budget=3)
    for task_id in range(6):
        sched.submit(task_id)
    assert sched.assignments() == [("w#0", 0), ("w#0", 1)]
    sched.complete("w#0", 0)
    assert sched.assignments() == [("w#0", 2)]
    sched.complete("w#0", 1)
    assert sched.assignments() == []  # budget used up even with a free slot
    assert not sched.is_spent("w#0")  # task 2 still in flight
    sched.complete("w#0", 2)
    assert sched.is_spent("w#0")
    assert sched.queued == 3


def test_spent_worker_is_skipped_for_others() -> None:
    sched = Scheduler(prefetch=1)
    sched.add_worker("w#0", budget=1)
    sched.add_worker("w#1")
    for task_id in range(4):
        sched.submit(task_id)
    assert sched.assignments() == [("w#0", 0), ("w#1", 1)]
    sched.complete("w#0", 0)
    sched.complete("w#1", 1)
    assert sched.assignments() == [("w#1", 2)]
    assert sched.is_spent("w#0")
    assert not sched.is_spent("w#1")


def test_without_budget_never_spent() -> None:
    sched = scheduler_with("w#0", prefetch=1, tasks=3)
    for task_id in range(3):
        assert sched.assignments() == [("w#0", task_id)]
        sched.complete("w#0", task_id)
        assert not sched.is_spent("w#0")


def test_zero_budget_is_spent_at_once() -> None:
    sched = Scheduler()
    sched.add_worker("w#0", budget=0)
    sched.submit(1)
    assert sched.is_spent("w#0")
    assert sched.assignments() == []


def test_is_spent_of_unknown_worker_raises() -> None:
    with pytest.raises(KeyError):
        Scheduler().is_spent("nobody#0")


# ---- tasks only the client's Python can run --------------------------------------------


def test_bound_tasks_go_only_to_workers_of_the_clients_python() -> None:
    sched = Scheduler(prefetch=1, max_retries=0)
    sched.add_worker("same#0")
    sched.add_worker("other#0", same_python=False)
    sched.submit(0, bound=True)
    sched.submit(1)
    sched.submit(2, bound=True)
    assert sched.queued == 3
    assert sorted(sched.assignments()) == [("other#0", 1), ("same#0", 0)]
    sched.complete("other#0", 1)
    assert sched.assignments() == []  # task 2 waits for the worker that may run it
    sched.complete("same#0", 0)
    assert sched.assignments() == [("same#0", 2)]


def test_bound_and_shared_tasks_keep_their_order_on_a_same_python_worker() -> None:
    sched = Scheduler(prefetch=1, max_retries=0)
    sched.add_worker("same#0")
    for task_id, bound in ((0, False), (1, True), (2, False), (3, True)):
        sched.submit(task_id, bound=bound)
    order = []
    for _ in range(4):
        ((worker, task_id),) = sched.assignments()
        order.append(task_id)
        sched.complete(worker, task_id)
    assert order == [0, 1, 2, 3]


def test_a_lost_bound_task_goes_back_to_the_bound_queue() -> None:
    sched = Scheduler(prefetch=2, max_retries=1)
    sched.add_worker("same#0")
    sched.add_worker("other#0", same_python=False)
    sched.submit(0, bound=True)
    sched.submit(1, bound=True)
    assert sched.assignments() == [("same#0", 0), ("same#0", 1)]
    loss = sched.remove_worker("same#0")
    assert loss.requeued == (0, 1)
    assert sched.assignments() == []  # the other worker never takes them
    sched.add_worker("same#1")
    assert sched.assignments() == [("same#1", 0), ("same#1", 1)]


def test_bound_tasks_drain_and_cancel() -> None:
    sched = Scheduler()
    sched.submit(0, bound=True)
    sched.submit(1)
    sched.submit(2, bound=True)
    assert sched.cancel(2) is True and sched.cancel(2) is False
    assert sched.drain_bound() == [0]
    assert sched.queued == 1 and sched.drain_queue() == [1]


def test_no_bound_task_is_stolen_for_an_idle_worker_of_another_python() -> None:
    sched = Scheduler(prefetch=3, max_retries=0)
    sched.add_worker("same#0")
    for task_id in range(3):
        sched.submit(task_id, bound=True)
    assert len(sched.assignments()) == 3
    sched.add_worker("other#0", same_python=False)
    assert sched.steals() == []  # it could not run what it took back
    sched.add_worker("same#1")
    assert sched.steals() == [("same#0", 2)]
