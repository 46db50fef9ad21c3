"""A round's clients go out in cohorts: as many client-train tasks as the runner runs at once."""

from __future__ import annotations

import os

from fedprune_core.engine import ClientStats
from flows.experiment import COHORT_MIN_S, cohorts, local_cohorts, local_slots
from infra.cluster import Placement
from tasks.client_train import Trained


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


def _trained(client_id: int, wall_time_s: float) -> Trained:
    stats = ClientStats(client_id, 10, 0.5, wall_time_s, 0, 0, 0, 0)
    return Trained(f"update-{client_id}", stats, Placement("flow", 0, 0))


def test_brief_training_goes_out_in_fewer_tasks_and_long_training_fills_every_slot() -> None:
    assert local_cohorts(4, 8, []) == 4  # a segment's first round: every slot
    brief = [_trained(c, 0.002) for c in range(8)]  # 16 ms a round: less than COHORT_MIN_S for one task
    assert local_cohorts(4, 8, brief) == 1
    assert local_cohorts(4, 64, brief) == int(64 * 0.002 / COHORT_MIN_S) == 2  # as many tasks as the work fills
    assert local_cohorts(4, 8, [_trained(c, 0.5) for c in range(8)]) == 4  # never more than the slots
    assert local_cohorts(3, 5, [_trained(0, 0.01), _trained(1, 0.03)]) == 2  # the mean client, this round's count
