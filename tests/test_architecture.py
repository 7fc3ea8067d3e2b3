"""The code's shape, as the README states it: no import cycle, and one home for every scheduling policy,
which the Ray runtime and the virtual-time simulator both import (what is simulated is what runs)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cosed"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Every import of a cosed module by another, at module level or inside a function alike."""
    mods = modules()
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module if not node.level else ".".join(name.split(".")[:-node.level] + [node.module])
                graph[name] |= {m for m in [base] + [f"{base}.{a.name}" for a in node.names] if m in mods}
        graph[name].discard(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_cosed():
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# Where drivers and writers run and what they ask for: no question in virtual time.
PLACEMENT = ["host_nodes", "host_node", "driver_destination", "process_resources"]
POLICIES = {
    "cosed.distributed.policies": ["sample_candidates", "choose_actor", "admission", "window_busy", "lend_to_video",
                                   *PLACEMENT],
    "cosed.distributed.sizing": ["plan_cluster", "grow_pools", "free_room", "rebalance_move", "rebalance_window_s"],
    "cosed.distributed.costs": ["flow_order", "estimated_work"],
    "cosed.distributed.core": ["JobCore"],
}


def test_each_policy_has_one_home_and_the_runtime_and_the_simulator_both_use_it():
    import importlib

    definitions: dict[str, list[str]] = {}
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                definitions.setdefault(node.name, []).append(name)
    simulator = importlib.import_module("cosed.distributed.simulator")
    runtime = [importlib.import_module(f"cosed.distributed.{m}") for m in ("job", "pools", "dispatch", "core")]
    for home, names in POLICIES.items():
        module = importlib.import_module(home)
        for policy in names:
            assert definitions[policy] == [home], f"{policy} is defined in {definitions[policy]}"  # no copy
            function = getattr(module, policy)
            users = [m.__name__ for m in runtime if getattr(m, policy, None) is function]
            if policy not in PLACEMENT:
                assert getattr(simulator, policy, None) is function, f"the simulator does not use {home}.{policy}"
            assert users, f"no runtime module uses {home}.{policy}"
