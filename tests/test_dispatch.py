"""The dispatcher: least outstanding work, retries on another actor, timeouts (trivial actors, no models)."""

import os
import time

import pytest
import ray

from cosed.distributed.dispatch import CallFailed, CallPolicy, Dispatcher, Membership, QueueCounter


@pytest.fixture(scope="module", autouse=True)
def cluster():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=0, max_restarts=-1, concurrency_groups={"control": 1})
class Echo:
    """A model actor's calling protocol (`ModelWorker`) around a sleep."""

    def __init__(self, name):
        self.name = name
        self.queue = QueueCounter()

    def work(self, seconds, value):
        try:
            time.sleep(seconds)
            return self.name, value
        finally:
            self.queue.finish()

    @ray.method(concurrency_group="control")
    def claim(self):
        self.queue.claim()

    @ray.method(concurrency_group="control")
    def queued(self):
        return self.queue.queued

    def die(self):
        os._exit(1)


def dispatcher(names, members=None, **policy):
    members = members or {"sd": {name: Echo.remote(name) for name in names}}
    return Dispatcher(Membership(1, members), CallPolicy(**{"timeout_floor_s": 30.0, **policy}))


def test_each_call_goes_to_the_actor_with_the_least_outstanding_work():
    pool = dispatcher(["a", "b", "c"])
    first, _ = pool.submit("sd", "work", 3.0, 0)
    second, _ = pool.submit("sd", "work", 3.0, 1)
    assert pool.pick("sd") not in {pool.in_flight[first].name, pool.in_flight[second].name}
    third, name = pool.submit("sd", "work", 0.0, 2)
    assert {pool.in_flight[first].name, pool.in_flight[second].name, name} == {"a", "b", "c"}
    assert ray.get(third) == (name, 2)
    # Once "c" answered, it is again the least loaded while "a" and "b" still work.
    assert pool.pick("sd") == name


def test_the_least_loaded_actor_counts_every_callers_work():
    """Two drivers share a pool: the second sees the first one's calls and picks the idle actor."""
    first = dispatcher(["a", "b", "c"])
    second = dispatcher([], members=first.membership.members)
    busy = {first.submit("sd", "work", 3.0, i)[1] for i in range(2)}
    assert not second.in_flight
    picks = {second.pick("sd") for _ in range(6)}
    assert picks == {"a", "b", "c"} - busy
    ref, name = second.submit("sd", "work", 0.0, "x")
    assert ray.get(ref) == (name, "x") and name not in busy
    # Finished calls leave the count: once the first driver's calls are done, every actor is a choice again.
    ray.get(list(first.in_flight))
    assert {second.pick("sd") for _ in range(9)} == {"a", "b", "c"}


def test_a_call_whose_actor_dies_is_answered_by_another():
    pool = dispatcher(["a", "b"])
    ray.get(pool.membership.members["sd"]["a"].work.remote(0, 0))
    pool.membership.members["sd"]["a"].die.remote()
    time.sleep(0.5)
    results = pool.call_many("sd", "work", [(0.2, i) for i in range(4)])
    assert [value for _, value in results] == [0, 1, 2, 3]


def test_a_call_that_hangs_times_out_and_is_retried_elsewhere():
    pool = dispatcher(["a", "b"], timeout_floor_s=1.0, timeout_factor=1.0)
    pool.membership.members["sd"]["a"].work.remote(60.0, "stuck")  # "a" hangs, unknown to the dispatcher
    answers = [pool.call("sd", "work", 0.0, i) for i in range(4)]
    assert answers == [("b", i) for i in range(4)]
    assert "a" in pool.suspect  # tried, timed out, avoided since
    failing = dispatcher(["x"], timeout_floor_s=0.5, timeout_factor=1.0, attempts=2)
    with pytest.raises(CallFailed, match="2 attempts"):
        failing.call("sd", "work", 5.0, "slow")
