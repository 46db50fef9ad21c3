"""A round's clients go out in cohorts: as many client-train tasks as the runner runs at once."""

from __future__ import annotations

import os

from flows.experiment import cohorts, local_slots


def test_clients_split_into_at_most_slots_even_consecutive_cohorts() -> None:
    assert cohorts([7, 0, 3, 5, 1], 2) == [(0, 1), (3, 5, 7)]
    assert cohorts([4, 2], 8) == [(2,), (4,)]  # never an empty cohort
    assert [len(c) for c in cohorts(list(range(128)), 3)] == [42, 43, 43]


def test_on_a_cluster_each_cohort_is_the_clients_one_set_of_workers_serves() -> None:
    served = {0: ["w1"], 1: ["w2"], 2: ["w1"], 3: ["w1", "w2"]}
    assert cohorts([0, 1, 2, 3], 1, served) == [(0, 2), (1,), (3,)]


def test_a_local_runner_gets_no_more_tasks_than_the_cores_the_flow_may_use() -> None:
    cores = len(os.sched_getaffinity(0))
    assert local_slots(1) == 1
    assert local_slots(cores + 7) == cores
    assert local_slots(max(cores - 1, 1)) == max(cores - 1, 1)
