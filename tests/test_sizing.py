"""Cost model and pool planning on constructed costs and clusters (pure: no Ray)."""

import pytest

from cosed.config import PoolConfig, PoolResources, RayConfig, RunConfig, SDConfig
from cosed.distributed.costs import (CostModel, TaskWork, batch_work, candidate_counts, expected_work, flow_order,
                                    measured_factors, task_work)
from cosed.distributed.sizing import (ClusterPlan, Node, PlanError, PoolPlan, grow_pools, nodes_from_ray, place,
                                      plan_cluster, plan_for_cluster, rebalance_move, rebalance_window_s,
                                      wait_for_gpus, wanted_gpus)
from cosed.tasks import Task

A100 = {"render": {"fixed": 2.5, "per_item": 2.1}, "animate": {"fixed": 45.0},
        "embed_texts": {"fixed": 0.01}, "embed_images": {"fixed": 0.01, "per_item": 0.004},
        "selector_scores": {"fixed": 0.002}, "needs_gpu": True}
COSTS = CostModel.from_dict(A100)
CFG = RunConfig(sd=SDConfig(batch_size=8), pool=PoolConfig())


def work(sd: float, video: float, clip: float = 0.1) -> dict[str, float]:
    return {"sd": sd, "video": video, "clip": clip}


def shape(plan: ClusterPlan) -> dict[str, tuple[int, float]]:
    return {kind: (p.replicas, p.num_gpus) for kind, p in plan.pools.items()}


def test_candidate_counts_follow_the_engine_plan():
    assert candidate_counts(5, PoolConfig()) == [4, 4, 7, 10, 13]
    assert candidate_counts(3, PoolConfig(steps="previous")) == [4, 4, 4]
    assert candidate_counts(8, PoolConfig(max_candidates=6)) == [4, 4, 6, 6, 6, 6, 6, 6]


def test_task_work_counts_calls_and_seconds():
    one = task_work(4, CFG, COSTS)  # candidates 4, 4, 7, 10 -> batches 1, 1, 1, 2
    assert one.calls == {"render": 5, "animate": 4, "embed_texts": 2, "embed_images": 4, "selector_scores": 3,
                         "caption": 0}  # captions only under the lm rewriter
    assert one.images == 25
    assert one.seconds["sd"] == pytest.approx(5 * 2.5 + 25 * 2.1)
    assert one.seconds["video"] == pytest.approx(180.0)
    # The clips queue on one video actor after the first image: video is the critical path.
    first_image = 0.01 + 2.5 + 4 * 2.1 + 0.01 + 4 * 0.004
    assert one.critical_path == pytest.approx(first_image + 4 * 45.0)
    both = batch_work([4, 2], CFG, COSTS)
    assert both.tasks == 2 and both.calls["animate"] == 6


def test_expected_work_is_per_pool_over_the_tasks():
    tasks = [Task(id="a", title="A", steps=("x",) * 4), Task(id="b", title="B", steps=("y",) * 2)]
    seconds = expected_work(tasks, CFG, COSTS)
    assert seconds == pytest.approx(batch_work([4, 2], CFG, COSTS).seconds)
    assert seconds["video"] == pytest.approx(6 * 45.0) and seconds["sd"] > 0 and 0 < seconds["clip"] < 1


def test_costs_are_overridable_and_refined_from_measured_calls():
    costs = CostModel.from_dict(A100, overrides={"animate": {"fixed": 30.0}, "whole_gpu": {"clip": True}})
    assert costs.seconds("animate") == 30.0 and costs.seconds("render", 8) == pytest.approx(2.5 + 16.8)
    assert costs.whole_gpu == {"sd": True, "video": True, "clip": True, "caption": False}
    refined = costs.scaled({"video": 1.5})
    assert refined.seconds("animate") == pytest.approx(45.0) and refined.seconds("render", 8) == costs.seconds("render", 8)
    work = TaskWork(seconds={"sd": 40.0, "video": 90.0, "clip": 1.0},
                    calls={"render": 4, "animate": 3, "embed_texts": 2, "embed_images": 3, "selector_scores": 2, "caption": 0})
    # SD measured 2x its model (20 s per call instead of 10); video on model; CLIP has too few calls to say.
    factors = measured_factors(work, {"sd": (200.0, 10), "video": (300.0, 10), "clip": (5.0, 2)})
    assert factors == pytest.approx({"sd": 2.0, "video": 1.0})
    with pytest.raises(ValueError, match="unknown cost"):
        CostModel.from_dict(A100, overrides={"unet": {"fixed": 1.0}})


def test_gpus_split_in_proportion_to_work_with_whole_gpus():
    plan = plan_cluster(RayConfig(), [Node(cpus=64, gpus=16)], work(sd=250, video=750), COSTS)
    assert plan.pools["sd"].replicas == 4 and plan.pools["video"].replicas == 12
    assert plan.pools["sd"].num_gpus == 1.0
    plan = plan_cluster(RayConfig(), [Node(cpus=64, gpus=8)], work(sd=700, video=100), COSTS)
    assert (plan.pools["sd"].replicas, plan.pools["video"].replicas) == (7, 1)


def test_clip_takes_a_fractional_share_of_the_busiest_pools_gpu():
    plan = plan_cluster(RayConfig(), [Node(cpus=16, gpus=4)], work(sd=250, video=750, clip=2), COSTS)
    clip, video = plan.pools["clip"], plan.pools["video"]
    assert clip.replicas == 1 and 0 < clip.num_gpus < 0.5 and clip.partner == "video"
    # Only the one video actor that hosts CLIP leaves room on its GPU; the others ask for a whole GPU.
    assert video.num_gpus == 1.0 and video.hosts == 1 and video.host_gpus == pytest.approx(1 - clip.num_gpus)
    assert plan.gpus == pytest.approx(4) and place(plan.pools, [Node(cpus=16, gpus=4)]) is not None
    assert "clip shares 1 video GPU" in plan.reason


def test_two_guest_pools_share_the_gpus_of_two_different_host_pools():
    """CLIP and the caption pool (lm rewriter) both take GPU shares: each has its own host pool, since a host
    actor leaves room for one guest; every actor places and no GPU is asked for twice."""
    costs = CostModel.from_dict({**A100, "caption": {"fixed": 1.5, "per_item": 0.01}})
    nodes = [Node(cpus=64, gpus=8), Node(cpus=64, gpus=8)]
    plan = plan_cluster(RayConfig(), nodes, {**work(sd=250, video=750, clip=2), "caption": 3}, costs)
    clip, caption = plan.pools["clip"], plan.pools["caption"]
    assert {clip.partner, caption.partner} == {"sd", "video"} and 0 < clip.num_gpus < 1 and 0 < caption.num_gpus < 1
    for guest in (clip, caption):
        host = plan.pools[guest.partner]
        assert host.partner in ("clip", "caption") and plan.pools[host.partner] is guest
        assert host.hosts == guest.replicas and host.host_gpus == pytest.approx(host.num_gpus - guest.num_gpus)
    assert plan.gpus == pytest.approx(16) and place(plan.pools, nodes) is not None
    assert plan.pools["sd"].replicas + plan.pools["video"].replicas == 16


def test_fixed_replicas_and_gpus_from_the_config_are_kept():
    cfg = RayConfig(sd=PoolResources(replicas=2), clip=PoolResources(replicas=1, num_gpus=1))
    plan = plan_cluster(cfg, [Node(cpus=64, gpus=8)], work(sd=900, video=100), COSTS)
    assert shape(plan)["sd"] == (2, 1.0)
    assert shape(plan) == {"sd": (2, 1.0), "video": (5, 1.0), "clip": (1, 1.0)}


def test_a_cpu_poor_node_never_gets_a_plan_that_cannot_place():
    # `ray start --head --num-cpus 2 --num-gpus 4`: every actor must fit in 2 CPUs.
    node = Node(cpus=2, gpus=4)
    plan = plan_cluster(RayConfig(), [node], work(sd=250, video=750), COSTS)
    actors = sum(p.replicas for p in plan.pools.values())
    assert sum(p.replicas * p.num_cpus for p in plan.pools.values()) <= 2 + 1e-9
    assert actors == 5 and place(plan.pools, [node]) is not None
    with pytest.raises(PlanError):
        plan_cluster(RayConfig(sd=PoolResources(num_cpus=4)), [node], work(sd=1, video=1), COSTS)


def test_fixed_cpus_drop_actors_until_every_one_places():
    cfg = RayConfig(sd=PoolResources(num_cpus=1), video=PoolResources(num_cpus=1), clip=PoolResources(num_cpus=1))
    plan = plan_cluster(cfg, [Node(cpus=3, gpus=8)], work(sd=250, video=750), COSTS)
    assert sum(p.replicas for p in plan.pools.values()) == 3
    assert "fewer so that every actor places" in plan.reason


def test_plan_spans_nodes_and_whole_gpus_stay_on_one_node():
    nodes = [Node(cpus=8, gpus=4), Node(cpus=8, gpus=4), Node(cpus=1, gpus=0)]
    plan = plan_cluster(RayConfig(), nodes, work(sd=300, video=700), COSTS)
    assert plan.pools["sd"].replicas + plan.pools["video"].replicas == 8
    where = place(plan.pools, nodes)
    assert sorted(set(i for ids in where.values() for i in ids)) == [0, 1]


def test_single_gpu_and_cpu_only_clusters():
    one = plan_cluster(RayConfig(), [Node(cpus=8, gpus=1)], work(sd=250, video=750), COSTS)
    assert all(p.replicas == 1 for p in one.pools.values()) and one.gpus <= 1
    assert one.pools["video"].num_gpus > one.pools["sd"].num_gpus
    cpu = plan_cluster(RayConfig(), [Node(cpus=8, gpus=0)], work(sd=250, video=750), COSTS)
    assert all(p.num_gpus == 0 for p in cpu.pools.values()) and sum(p.replicas for p in cpu.pools.values()) == 8
    assert cpu.pools["video"].replicas > cpu.pools["sd"].replicas


def test_legacy_policy_is_the_even_split():
    cfg = RayConfig(policy="legacy")
    plan = plan_cluster(cfg, [Node(cpus=64, gpus=16)], work(sd=250, video=750), COSTS)
    assert shape(plan) == {"sd": (8, 1.0), "video": (7, 1.0), "clip": (1, 1.0)} and plan.drivers == 16


def test_drivers_keep_every_pool_busy():
    mean = task_work(4, CFG, COSTS)
    plan = plan_cluster(RayConfig(), [Node(cpus=64, gpus=16)], mean.seconds, COSTS, mean.critical_path / mean.total)
    assert plan.drivers >= 16  # more than the SD replicas alone would give (2 x 4)
    assert plan_cluster(RayConfig(max_concurrent_tasks=3), [Node(64, 16)], mean.seconds, COSTS).drivers == 3
    assert plan.to_dict()["pools"]["sd"]["replicas"] == plan.pools["sd"].replicas and "pool plan" in plan.describe()


def test_waits_for_gpu_workers_then_plans_with_them():
    clock = {"t": 0.0}
    seen = iter([[Node(cpus=4, gpus=0)], [Node(cpus=4, gpus=0)], [Node(cpus=4, gpus=0), Node(cpus=8, gpus=4)]])
    said = []

    def sleep(s):
        clock["t"] += s

    nodes = wait_for_gpus(lambda: next(seen), expected=1, timeout_s=60, strict=True, log=said.append,
                          sleep=sleep, clock=lambda: clock["t"])
    assert sum(n.gpus for n in nodes) == 4
    assert len(said) == 1 and "waiting for GPU workers" in said[0]


def test_waiting_for_gpus_is_bounded():
    clock = {"t": 0.0}

    def sleep(s):
        clock["t"] += s

    args = dict(get_nodes=lambda: [Node(cpus=4, gpus=0)], expected=2, timeout_s=30, log=lambda _: None,
                sleep=sleep, clock=lambda: clock["t"])
    with pytest.raises(TimeoutError, match="gave up after 30 s"):
        wait_for_gpus(strict=True, **args)
    assert clock["t"] == pytest.approx(30)
    assert wait_for_gpus(strict=False, **{**args, "clock": lambda: clock["t"]})[0].gpus == 0


def test_nodes_from_ray_drops_dead_nodes():
    nodes = nodes_from_ray([{"Alive": True, "NodeID": "a", "Resources": {"CPU": 2.0, "GPU": 4.0, "memory": 1e9}},
                            {"Alive": False, "NodeID": "b", "Resources": {"CPU": 8.0}}])
    assert nodes == [Node(cpus=2.0, gpus=4.0, memory=1e9, node_id="a")]


def _plan(sd: int, video: int) -> ClusterPlan:
    return ClusterPlan(pools={"sd": PoolPlan(sd, 1.0, 1.0), "video": PoolPlan(video, 1.0, 1.0, 1, 0.99, "clip"),
                              "clip": PoolPlan(1, 0.01, 1.0, partner="video")}, drivers=8, reason="")


def test_rebalance_moves_an_actor_from_the_idle_pool_to_the_bottleneck():
    assert rebalance_move({"sd": 0.3, "video": 0.98, "clip": 0.01}, _plan(4, 4)) == ("sd", "video")
    assert rebalance_move({"sd": 0.99, "video": 0.4, "clip": 0.01}, _plan(4, 4)) == ("video", "sd")


def test_rebalance_has_hysteresis():
    assert rebalance_move({"sd": 0.8, "video": 0.8, "clip": 0.0}, _plan(4, 4)) is None      # nobody idles
    assert rebalance_move({"sd": 0.55, "video": 0.9, "clip": 0.0}, _plan(2, 6)) is None     # sd 1.1 after
    assert rebalance_move({"sd": 0.1, "video": 0.99, "clip": 0.0}, _plan(1, 7)) is None     # last sd actor
    # the fractional CLIP actor never donates a GPU
    assert rebalance_move({"sd": 0.95, "video": 0.9, "clip": 0.0}, _plan(4, 4)) is None


def test_a_rebalancing_window_spans_many_calls_of_the_slowest_pool():
    assert rebalance_window_s(5.0, {"sd": 12.0, "video": 45.0, "clip": 0.01}) == 450.0  # ten clips
    assert rebalance_window_s(5.0, {"clip": 0.01}) == 15.0  # never under three ticks
    assert rebalance_window_s(5.0, {}) == 15.0


def test_tasks_start_in_johnsons_order_for_the_plan():
    """SD-light tasks first, by SD work; SD-heavy ones last, by decreasing video work."""
    tasks = [Task(id=f"{n}-{i}", title="t", steps=tuple(f"s{k}" for k in range(n)))
             for i, n in enumerate((4, 6, 2, 5, 3, 2))]

    def order(capacity):
        return [t.id for t in flow_order(tasks, CFG, COSTS, capacity)]

    # One SD GPU, three video GPUs: per GPU a 3-step task is SD 39 s / video 45 s, a 4-step one 65 s / 60 s.
    assert order({"sd": 1, "video": 3}) == ["2-2", "2-5", "3-4", "6-1", "5-3", "4-0"]
    # Video scarce: every task's video stage is the longer one, so all go by increasing SD work.
    assert order({"sd": 5, "video": 1}) == ["2-2", "2-5", "3-4", "4-0", "5-3", "6-1"]


def test_wanted_gpus_is_capped_by_config_and_useful_work():
    assert wanted_gpus(0, 10_000, 200, 50) == 0
    assert wanted_gpus(32, 10_000, 200, 50) == 32
    assert wanted_gpus(32, 1_000, 200, 4) == 5
    assert wanted_gpus(32, 100, 200, 1) == 2


def test_plan_for_cluster_waits_only_at_start():
    calls = []

    def nodes():
        calls.append(1)
        return [Node(cpus=8, gpus=4)] if len(calls) > 1 else [Node(cpus=8, gpus=0)]

    cfg = RayConfig(min_gpus=4, gpu_wait_s=60)
    slept = []
    plan = plan_for_cluster(cfg, nodes, work(sd=1, video=3), COSTS, log=lambda _: None, sleep=slept.append)
    assert plan.pools["sd"].replicas + plan.pools["video"].replicas == 4 and len(calls) == 2 and len(slept) == 1
    calls.clear()
    assert plan_for_cluster(cfg, nodes, work(sd=1, video=3), COSTS, wait=False).gpus == 0


def test_without_known_work_clip_gets_a_whole_gpu_when_there_is_one_to_spare():
    plan = plan_cluster(RayConfig(), [Node(cpus=6, gpus=4)], {}, CostModel.from_dict({}))
    assert shape(plan) == {"sd": (2, 1.0), "video": (1, 1.0), "clip": (1, 1.0)}
    fixed = RayConfig(sd=PoolResources(num_gpus=1), video=PoolResources(num_gpus=1))
    plan = plan_cluster(fixed, [Node(cpus=6, gpus=2)], work(sd=1, video=1, clip=0.01), COSTS)
    assert shape(plan) == {"sd": (1, 1.0), "video": (1, 1.0), "clip": (1, 0.0)}


def test_gpus_that_join_go_to_the_pool_with_the_most_work_per_gpu():
    pools = {"sd": PoolPlan(1, 1.0, 1.0), "video": PoolPlan(2, 1.0, 1.0, 1, 0.8, "clip"),
             "clip": PoolPlan(1, 0.2, 1.0, partner="video")}
    work = {"sd": 28.0, "video": 72.0, "clip": 0.3}

    def room(gpus, cpus=8.0):
        return [Node(cpus=cpus, gpus=gpus)]

    # video: 72 s of work on 1.8 GPUs vs sd 28 on 1: video first, then sd, then video again.
    assert grow_pools(pools, room(1), work) == {"sd": 0, "video": 1, "clip": 0}
    assert grow_pools(pools, room(2), work) == {"sd": 1, "video": 1, "clip": 0}
    assert grow_pools(pools, room(3), work) == {"sd": 1, "video": 2, "clip": 0}
    assert grow_pools(pools, room(2), {"sd": 28.0, "video": 72.0}, fixed={"video"}) == {"sd": 2, "video": 0, "clip": 0}
    assert grow_pools(pools, room(0), work) == {"sd": 0, "video": 0, "clip": 0}
    assert grow_pools(pools, room(3, cpus=1.0), work) == {"sd": 0, "video": 1, "clip": 0}  # CPUs for one actor
    assert grow_pools(pools, [Node(cpus=1, gpus=1), Node(cpus=1, gpus=1)], work) == {"sd": 1, "video": 1, "clip": 0}


def test_the_clip_pool_is_sized_grown_and_rebalanced_by_its_work_like_the_others():
    nodes = [Node(cpus=64, gpus=8)] * 4
    # Heavy CLIP work (more than half a GPU's worth): whole GPUs in proportion to it, several actors.
    heavy = CostModel.from_dict({**A100, "embed_images": {"fixed": 0.5, "per_item": 0.6}})
    mean = task_work(6, CFG, heavy)
    plan = plan_cluster(RayConfig(), nodes, mean.seconds, heavy)
    assert plan.pools["clip"].replicas == 3 and plan.pools["clip"].num_gpus == 1.0
    assert plan_cluster(RayConfig(clip=PoolResources(replicas=1)), nodes, mean.seconds,
                        heavy).pools["clip"].replicas == 1  # a count set in the config is kept
    # Light CLIP work: one actor on a share of a video GPU. Measured three hundred times its model, the
    # next GPU goes to a new CLIP actor and the video actor that hosts it.
    light = task_work(6, CFG, COSTS)
    plan = plan_cluster(RayConfig(), nodes, light.seconds, COSTS)
    clip, video = plan.pools["clip"], plan.pools["video"]
    assert clip.replicas == 1 and clip.partner == "video" and video.hosts == 1
    grown = grow_pools(plan.pools, [Node(cpus=8, gpus=1)], {**light.seconds, "clip": 300 * light.seconds["clip"]})
    assert grown == {"sd": 0, "video": 1, "clip": 1}
    # ... and a busy CLIP pool takes an idle pool's actor when rebalancing.
    assert rebalance_move({"sd": 0.2, "video": 0.7, "clip": 0.99}, plan) == ("sd", "clip")


def test_growth_on_a_256_gpu_cluster_adds_only_actors_that_place():
    """sd21-svd costs, 8-step tasks: the plan hosts CLIP on one video GPU. Eight GPUs join: every actor added
    places, and what the plan counts as used is exactly what the actors ask for."""
    from cosed.models.profiles import profile_data
    from cosed.distributed.sizing import free_room, with_added

    costs = CostModel.from_dict(profile_data("sd21-svd")["costs"])
    mean = task_work(8, CFG, costs)
    nodes = [Node(cpus=96, gpus=8, node_id=f"n{i}") for i in range(32)]
    plan = plan_cluster(RayConfig(), nodes, mean.seconds, costs, mean.critical_path / mean.total)
    assert plan.gpus == pytest.approx(256) and place(plan.pools, nodes) is not None
    grown_nodes = nodes + [Node(cpus=96, gpus=8, node_id="new")]
    room = free_room(plan.pools, grown_nodes)
    assert sum(n.gpus for n in room) == 8
    after = with_added(plan.pools, grow_pools(plan.pools, room, mean.seconds))
    assert place(after, grown_nodes) is not None
    assert sum(p.gpus for p in after.values()) == pytest.approx(264)
    # Nothing more fits: another growth step on the same cluster adds no actor.
    assert sum(grow_pools(after, free_room(after, grown_nodes), mean.seconds).values()) == 0


def test_a_busy_window_over_a_replacement_reads_the_true_busy_fraction():
    from cosed.distributed.policies import Sample, window_busy

    # Two video actors, each 80 % busy. At t=0 both are sampled; "a" dies at t=40 (its last sample: 32 s busy
    # of 40) and "a2" replaces it at t=50 (80 % busy for its 50 s); "b" serves the whole 100 s window.
    start = {"a#1": Sample("video", busy=100.0, alive=200.0), "b#1": Sample("video", busy=160.0, alive=200.0)}
    latest = {"a#1": Sample("video", busy=132.0, alive=240.0), "b#1": Sample("video", busy=240.0, alive=300.0),
              "a2#1": Sample("video", busy=40.0, alive=50.0)}
    assert window_busy(start, latest)["video"] == pytest.approx(0.8)
    # A restart is a new life of the same actor: its old counters do not turn into a negative delta.
    latest = {**latest, "b#2": Sample("video", busy=8.0, alive=10.0)}
    assert window_busy(start, latest)["video"] == pytest.approx((32 + 80 + 40 + 8) / (40 + 100 + 50 + 10))


def test_leads_move_whole_gpus_to_the_pool_that_must_end_first():
    """A pool that cannot work at one end of the run (`costs.pool_leads`: SD's last scene still needs its clip)
    gets the GPUs that even out work per GPU plus lead; with no work known, leads change nothing."""
    even = plan_cluster(RayConfig(), [Node(cpus=64, gpus=16)], work(sd=250, video=750), COSTS)
    led = plan_cluster(RayConfig(), [Node(cpus=64, gpus=16)], work(sd=250, video=750), COSTS,
                       leads={"sd": 20.0, "video": 0.0})
    assert (even.pools["sd"].replicas, even.pools["video"].replicas) == (4, 12)
    assert (led.pools["sd"].replicas, led.pools["video"].replicas) == (5, 11)  # 250/5 + 20 = 70 vs 750/11 = 68
    blind = plan_cluster(RayConfig(), [Node(cpus=64, gpus=16)], work(sd=0, video=0, clip=0), COSTS,
                         leads={"sd": 1000.0})
    assert shape(blind) == shape(plan_cluster(RayConfig(), [Node(cpus=64, gpus=16)], work(sd=0, video=0, clip=0),
                                              COSTS))


def test_pool_leads_are_the_first_scene_for_video_and_one_clip_for_sd():
    from cosed.distributed.costs import pool_leads

    leads = pool_leads(CFG, COSTS)
    assert leads["sd"] == pytest.approx(45.0)
    assert leads["video"] == pytest.approx(2.5 + 4 * 2.1 + 0.01 + 4 * 0.004)  # step 1: one batch of 4, scored
