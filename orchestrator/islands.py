"""Islands: which islands may train which job, and the Ray scheduling options that pin it there.

One unit of an island's custom resource is one worker slot; a node offering `island-a: 4` can host
four single-worker experts of island-a at once, so an island of G GPUs with `num_workers: 1` and
`concurrency: G` packs G experts, one GPU each (data parallelism across GPUs is opt-in per island).

Placement is a plan plus a rule. The plan (longest expected job first, each onto the island where it
would finish earliest) gives each job a preferred island; the controller starts a pending job on the
first island in its `eligible` list with a free slot, so a fast island that empties early takes work
planned for a busy one. An explicit `islands.assignment` (or `router.island`) pins a job: its only
eligible island is the one named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.config import IslandConfig, ModelConfig, RunConfig
from common.keys import ROUTER, job_name


@dataclass(frozen=True)
class Placement:
    job: str  # "expert-03" or "router"
    island: str  # the planned (preferred) island
    expected_cost: float
    eligible: tuple[str, ...] = ()  # islands that may run it, preferred first; () = the planned one only
    pinned: bool = False

    @property
    def candidates(self) -> tuple[str, ...]:
        return self.eligible or (self.island,)


def model_cost(model: ModelConfig) -> float:
    """Relative training cost per image: width^2 * depth, the dominant matmul term of a transformer."""
    from worker.models.dit import DIT_SIZES

    size = DIT_SIZES[model.size]
    width = model.width or size["width"]
    depth = model.depth or size["depth"]
    return float(width * width * depth) / model.patch_size ** 2


def place_jobs(config: RunConfig, eligible: dict[str, list[str]] | None = None) -> list[Placement]:
    """Plan every expert and the router onto an island (explicit, else longest-job-first).

    `eligible` maps a job to the islands that satisfy its requirements (default: every island); an
    unpinned job may then run on any of them, its planned island first, then the fastest.
    """
    islands = {i.name: i for i in config.islands.pool}
    k = config.clustering.num_experts
    jobs = [(job_name(e), config.expert_nimg * model_cost(config.model)) for e in range(k)]
    jobs.append((ROUTER, config.router_nimg * model_cost(config.router.model)))
    fixed: dict[str, str] = {}
    if config.islands.assignment != "auto":
        fixed.update({job_name(e): name for e, name in config.islands.assignment.items()})
    if config.router.island is not None:
        fixed[ROUTER] = config.router.island

    # Finish-time estimate per island: queued work / (speed x slots). Equal costs tie-break by name.
    load = {name: 0.0 for name in islands}
    placements = []
    by_speed = sorted(islands, key=lambda i: (-islands[i].speed, list(islands).index(i)))
    for name, cost in sorted(jobs, key=lambda j: (-j[1], j[0])):
        allowed = [i for i in by_speed if eligible is None or i in eligible.get(name, islands)]
        if name in fixed:
            island, candidates = fixed[name], (fixed[name],)
            if eligible is not None and island not in eligible.get(name, islands):
                raise ValueError(f"{name} is pinned to island {island}, whose workers cannot split its batch")
        else:
            if not allowed:
                raise ValueError(f"{name}: no island satisfies its requirements")
            island = min(allowed, key=lambda i: ((load[i] + cost) / (islands[i].speed * islands[i].concurrency),
                                                 list(islands).index(i)))
            candidates = (island, *[i for i in allowed if i != island])
        load[island] += cost
        placements.append(Placement(name, island, cost, eligible=candidates, pinned=name in fixed))
    return sorted(placements, key=lambda p: (p.job == ROUTER, p.job))


def actor_options(island: IslandConfig, name: str) -> dict:
    """Ray options for the slot actor `name` that runs `island`'s jobs one after another.

    A single-worker job trains inside the actor, which holds the worker's CPU/GPU and one island slot.
    A multi-worker job's actor only drives a Ray Train group; the group's workers hold the resources.
    """
    options: dict = {"name": name, "max_restarts": 0, "max_concurrency": 4}
    if island.num_workers == 1:
        options["num_cpus"] = island.cpus_per_worker
        options["num_gpus"] = 1 if island.use_gpu else 0
        options["resources"] = {key: value for key, value in island.resources.items()}
        if island.use_gpu and island.accelerator_type:
            options["accelerator_type"] = island.accelerator_type
    elif not island.label_selector:
        options["num_cpus"] = 0
        # Without a label, a sliver of the island's resource keeps the driver actor on the island's nodes.
        options["resources"] = {key: 0.001 for key in island.resources}
    else:
        # The label alone keeps the driver on the island: a resource sliver would make its node unable to
        # host a whole worker, so a group that loses a node could not re-form on the nodes that are left.
        options["num_cpus"] = 0
    if island.label_selector:
        options["label_selector"] = dict(island.label_selector)
    return options


def worker_resources(island: IslandConfig) -> dict:
    """Per-worker resources of a Ray Train group on `island` (CPU, GPU and the island's slot)."""
    return {"CPU": island.cpus_per_worker, **({"GPU": 1} if island.use_gpu else {}), **island.resources}


def local_node_resources(config: RunConfig, num_cpus: int) -> dict[str, float]:
    """Custom resources for a single local node simulating every island (local mode)."""
    resources: dict[str, float] = {}
    for island in config.islands.pool:
        for key, value in island.resources.items():
            # Ray wants whole numbers here; one spare unit covers multi-worker jobs' driver actors.
            resources[key] = resources.get(key, 0.0) + math.ceil(value * island.num_workers * island.concurrency) + 1
    return resources
