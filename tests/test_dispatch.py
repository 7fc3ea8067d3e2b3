"""The dispatcher: two choices per call, counts that cannot drift, retries, timeouts (trivial actors, no models)."""

import os
import random
import time

import numpy as np
import pytest
import ray

from cosed.distributed.dispatch import CallFailed, CallPolicy, Dispatcher, Membership, ObjectsLost, QueueCounter
from cosed.distributed.policies import PROBES, choose_actor, sample_candidates


@pytest.fixture(scope="module", autouse=True)
def cluster():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address="local", num_cpus=2, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=0, max_restarts=-1, concurrency_groups={"control": 1})
class Echo:
    """A model actor's calling protocol (`ModelWorker`) around a sleep; counts the probes it answers."""

    def __init__(self, name):
        self.name = name
        self.queue = QueueCounter()
        self.probed = 0

    def run(self, call_id, method, request):
        self.queue.start(call_id)
        try:
            seconds, value = request
            time.sleep(seconds)
            if isinstance(value, list):  # object references, as candidate images reach the CLIP actor
                value = ray.get(value)
            return self.name, value
        finally:
            self.queue.finish()

    @ray.method(concurrency_group="control")
    def claim(self, call_id):
        self.queue.claim(call_id)

    @ray.method(concurrency_group="control")
    def release(self, call_id):
        self.queue.release(call_id)

    @ray.method(concurrency_group="control")
    def queued(self):
        self.probed += 1
        return self.queue.queued

    @ray.method(concurrency_group="control")
    def probes(self):
        return self.probed

    def die(self):
        os._exit(1)


def dispatcher(names, members=None, seed=0, **policy):
    """A dispatcher over Echo actors published once they answer, as the job's pools publish members."""
    if not members:
        members = {"sd": {name: Echo.remote(name) for name in names}}
        ray.get([handle.probes.remote() for handle in members["sd"].values()])
    return Dispatcher(Membership(1, members), CallPolicy(**{"timeout_floor_s": 30.0, **policy}), seed=seed)


def test_two_choices_draw_two_distinct_members_and_take_the_less_loaded():
    rng = random.Random(1)
    names = [f"a{i}" for i in range(8)]
    for _ in range(50):
        pair = sample_candidates(names, lambda _: False, rng)
        assert len(pair) == PROBES == len(set(pair))
    assert choose_actor(["x", "y"], {"x": 3, "y": 1}) == "y"
    assert choose_actor(["x", "y"], {"y": 0}) == "y"  # an unanswered probe counts as busy
    suspects = set(names[:7])
    assert sample_candidates(names, suspects.__contains__, rng) == ["a7"]  # a healthy one is found
    assert sample_candidates(["a", "b"], lambda n: n == "a", rng) == ["b"]


def test_a_call_probes_at_most_two_actors_of_a_pool_of_eight():
    pool = dispatcher([f"a{i}" for i in range(8)])
    results = pool.call_many("sd", "run", [(0.0, i) for i in range(24)])
    assert [value for _, value in results] == list(range(24))
    handles = pool.membership.members["sd"].values()
    probed = sum(ray.get([h.probes.remote() for h in handles]))
    assert probed == pool.probes.probes <= PROBES * 24
    assert pool.probes.claims == 24 and pool.probes.per_call <= 3


@ray.remote(num_cpus=0)
class Gate:
    """A call held open until the test says (no sleep that a slow machine could outlast)."""

    def __init__(self):
        import asyncio

        self.event = asyncio.Event()

    async def wait(self):
        await self.event.wait()
        return "x"

    async def open(self):
        self.event.set()


def test_a_caller_sees_every_callers_work():
    """Two drivers share a pool of two: the second sees the first one's calls and picks the idle actor."""
    first = dispatcher(["a", "b"])
    # Every probe must be answered here: an unanswered one counts as busy, which is tested elsewhere.
    second = dispatcher([], members=first.membership.members, seed=7, probe_timeout_s=60.0)
    gate = Gate.remote()
    refs, busy, *_ = first.submit("sd", "run", (0.0, [gate.wait.remote()]))  # runs until the gate opens
    assert {second.pick("sd")[0] for _ in range(6)} == {"a", "b"} - {busy}
    ray.get(gate.open.remote())
    ray.get(refs)
    assert {second.pick("sd")[0] for _ in range(12)} == {"a", "b"}


def test_counts_cannot_drift_a_claim_ends_when_its_call_runs_is_released_or_expires():
    clock = {"t": 0.0}
    queue = QueueCounter(ttl_s=60.0, clock=lambda: clock["t"])
    for call in ("a", "b", "c"):
        queue.claim(call)
    queue.start("a")  # ran
    queue.release("b")  # cancelled while queued: its caller released it
    assert queue.queued == 2  # "a" running, "c" claimed
    queue.finish()
    clock["t"] = 61.0  # "c"'s caller died before sending it
    assert queue.queued == 0
    # A claim may arrive on the control thread after its call started (or was released): not counted.
    queue.start("d")
    queue.claim("d")
    queue.release("e")
    queue.claim("e")
    assert queue.queued == 1  # only "d", running
    queue.finish()
    assert queue.queued == 0


def test_a_call_cancelled_while_queued_leaves_no_claim_behind():
    pool = dispatcher(["only"], timeout_floor_s=0.5, timeout_factor=1.0, attempts=2)
    handle = pool.membership.members["sd"]["only"]
    busy = handle.run.remote("busy", "run", (6.0, "ahead"))  # the actor is busy: the next calls queue behind it
    with pytest.raises(CallFailed):
        pool.call("sd", "run", (0.0, "late"))  # times out while queued, is cancelled and released, twice
    ray.get(busy)
    assert ray.get(handle.queued.remote()) == 0


def test_a_call_whose_actor_dies_is_answered_by_another():
    pool = dispatcher(["a", "b"])
    ray.get(pool.membership.members["sd"]["a"].run.remote("warm", "run", (0, 0)))
    pool.membership.members["sd"]["a"].die.remote()
    time.sleep(0.5)
    results = pool.call_many("sd", "run", [(0.2, i) for i in range(4)])
    assert [value for _, value in results] == [0, 1, 2, 3]


def test_a_call_that_hangs_times_out_and_is_retried_elsewhere():
    pool = dispatcher(["a", "b"], timeout_floor_s=1.0, timeout_factor=1.0)
    pool.membership.members["sd"]["a"].run.remote("stuck", "run", (60.0, "stuck"))  # "a" hangs, unknown to us
    answers = [pool.call("sd", "run", (0.0, i)) for i in range(4)]
    assert answers == [("b", i) for i in range(4)]
    failing = dispatcher(["x"], timeout_floor_s=0.5, timeout_factor=1.0, attempts=2)
    with pytest.raises(CallFailed, match="2 attempts"):
        failing.call("sd", "run", (5.0, "slow"))


@ray.remote(num_cpus=0)
class Owner:
    """Owns an object in the object store, as an SD actor's process owns nothing but holds the candidates."""

    def make(self):
        return [ray.put(np.zeros(1 << 20, np.uint8))]


def test_a_lost_object_ends_the_call_at_once_instead_of_resending_the_lost_references():
    pool = dispatcher(["a", "b"])
    owner = Owner.remote()
    refs = ray.get(owner.make.remote())
    ray.kill(owner)  # the object goes with its owner: the actor's ray.get raises RayTaskError(OwnerDiedError)
    for _ in range(600):  # until its node has let the object go (a copy in the store outlives the owner a moment)
        try:
            ray.get(refs)
        except ray.exceptions.OwnerDiedError:
            break
        time.sleep(0.1)
    sent = pool.probes.calls
    with pytest.raises(ObjectsLost, match="OwnerDiedError"):
        pool.call("sd", "run", (0.0, refs))
    assert pool.probes.calls == sent + 1  # sent once: the other actor would have failed the same way


def test_a_call_whose_whole_pool_died_waits_for_the_replacements_instead_of_failing():
    """The node holding every member of a pool left: the job replaces them after the timeout floor, so the
    call must not give up after the floor (it did, and failed the task: `test_elastic`)."""
    import threading

    pool = dispatcher(["a"], timeout_floor_s=0.0, attempts=2)
    ray.kill(pool.membership.members["sd"]["a"], no_restart=True)
    answer = {}
    thread = threading.Thread(target=lambda: answer.setdefault("value", _outcome(pool.call, "sd", "run", (0.0, 7))))
    thread.start()
    for _ in range(600):
        if pool.probes.calls > pool.policy.attempts or not thread.is_alive():
            break
        time.sleep(0.1)
    assert thread.is_alive(), answer  # past ``attempts`` failures and the floor, still waiting
    pool.update(Membership(2, {"sd": {"b": Echo.remote("b")}}))  # the job's replacement
    thread.join()
    assert answer["value"] == ("b", 7)


def _outcome(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 (the test reads it)
        return exc
