"""A Ray cluster as nodes: `%lepton up --backend ray --address ray://HOST:10001 --nodes N`.

A pool's nodes are bundles of a placement group (``{CPU: ray_cpus_per_node, GPU: gpus}`` each,
spread over machines or packed), each running one agent actor (ray_actor.py) that starts
``python -m lepton_magic.agent`` and is its byte pipe (ray_pipe.py). Everything above the pipe
is what the other backends use. The package travels as one zip through Ray's object store (put
once per pool), so nothing is installed on the nodes; they need Python with msgpack,
cloudpickle, psutil (and torch for torch cells), as the ssh backend's hosts do.

Ray's placement is the scheduler: lepton does not place anything on a Ray cluster itself. A
node's placement (Ray node id, IP, the GPUs Ray gave it) overrides what the agent saw of its
machine, since one machine may hold several nodes.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from .. import private
from ..errors import LeptonError
from . import ray_cluster
from .base import Backend, NodeLink, OnLost, OnMessage
from .ray_pipe import ActorPipe

#: A new worker process, and the first actor on a machine: seconds on a busy machine.
ACTOR_START_TIMEOUT = 120.0


class RayNodeLink(NodeLink):
    """A NodeLink whose facts say where Ray placed it: its GPUs are those Ray assigned (NVML on
    the agent lists every GPU of the machine), its host the Ray node's IP."""

    def __init__(self, *args, placement: dict, **kwargs):
        self.placement = placement
        super().__init__(*args, **kwargs)

    @property
    def facts(self) -> dict:
        return self._facts

    @facts.setter
    def facts(self, reported: dict) -> None:
        self._facts = placed(reported, self.placement) if reported else reported

    @property
    def place(self) -> str:
        gpus = ",".join(map(str, self.placement["gpu_ids"])) or "none"
        return f"ray node {self.placement['ray_node_id'][:12]} · GPUs {gpus}"


def placed(reported: dict, placement: dict) -> dict:
    assigned = set(placement["gpu_ids"])
    facts = dict(reported)
    facts["gpus"] = [g for g in reported.get("gpus") or [] if str(g.get("index")) in assigned]
    facts["host"] = placement["ip"]
    if placement.get("cpus"):
        facts["cpus"] = max(1, int(placement["cpus"]))  # what the bundle holds, not the machine
    facts.update(ray_node_id=placement["ray_node_id"], ray_gpu_ids=placement["gpu_ids"],
                 ray_actor_pid=placement["actor_pid"])
    return facts


@dataclass
class _Node:
    actor: object
    pipe: ActorPipe
    group: object
    placement: dict


@dataclass
class _Group:
    """A placement group, removed once the last of its nodes is stopped."""
    group: object
    members: set = field(default_factory=set)


class RayBackend(Backend):
    name = "ray"

    def __init__(self, settings: dict):
        super().__init__(settings)
        self.ray = ray_cluster.require_ray()
        try:
            self.address = ray_cluster.parse_address(settings.get("ray_address") or "auto")
        except ValueError as e:
            raise LeptonError(f"ray_address: {e}") from None
        self.strategy = settings.get("ray_strategy") or "spread"
        self.cpus = float(settings.get("ray_cpus_per_node") or 1)
        self.gpus = int(settings.get("gpus") or 0)
        self.placement_timeout = float(settings.get("ray_placement_timeout") or 60.0)
        self.preload = settings.get("preload", "torch")
        self.pool_id = settings.get("pool_id", "pool")
        ray_cluster.connect(self.address)
        self._connected = True
        self._nodes: dict[str, _Node] = {}
        self._groups: dict[int, _Group] = {}
        self._lock = threading.Lock()
        self._actor_class = None
        self._package = None  # the package zip, put in the object store once

    # --- nodes -----------------------------------------------------------------------------
    def start_nodes(self, names: list[str], secret: bytes, on_message: OnMessage, on_lost: OnLost,
                    log_dir: str) -> list[NodeLink]:
        ray = self.ray
        bundle = {"CPU": self.cpus, **({"GPU": float(self.gpus)} if self.gpus else {})}
        strategy = ray_cluster.strategy_for(ray, self.strategy, len(names))
        group = ray_cluster.reserve(ray, len(names), bundle, strategy, self.placement_timeout,
                                    name=f"lepton-{self.pool_id}-{names[0]}", say=ray_cluster.progress)
        actors = []
        try:
            actors = [self._actor(group, i) for i in range(len(names))]
            package = self._package_ref()
            starts = [actor.start.remote(name, self.preload, package) for actor, name in zip(actors, names)]
            placements = ray.get(starts, timeout=ACTOR_START_TIMEOUT)
        except BaseException as e:
            for actor in actors:
                _kill(ray, actor)
            self._remove_group(group)
            if isinstance(e, Exception):
                raise LeptonError(f"the agent actors did not start on Ray: {ray_cluster.first_line(e)}") from None
            raise
        links = []
        entry = _Group(group, set(names))
        with self._lock:
            self._groups[id(group)] = entry
        for name, actor, placement in zip(names, actors, placements):
            self._note_where(log_dir, name, placement)
            pipe = ActorPipe(ray, actor, name)
            link = RayNodeLink(name, pipe.to_agent, pipe.from_agent, secret, on_message, on_lost,
                               placement=placement)
            pipe.start(link.lose)
            with self._lock:
                self._nodes[name] = _Node(actor, pipe, group, placement)
            links.append(link)
        return links

    def _package_ref(self):
        if self._package is None:
            from .ssh import package_zip  # the same importable zip the ssh backend copies

            self._package = self.ray.put(package_zip()[0])
        return self._package

    def _actor(self, group, index: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if self._actor_class is None:
            from . import ray_actor

            # By value: the nodes have no lepton_magic to import it from until the actor unpacks it.
            self.ray.cloudpickle.register_pickle_by_value(ray_actor)
            self._actor_class = self.ray.remote(ray_actor.AgentActor)
        return self._actor_class.options(
            num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=0, max_concurrency=64,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index),
            # No runtime_env: an actor with one needs a worker process of its own (seconds), one
            # without takes a worker Ray started ahead. The agent's GPUs are set in the actor.
        ).remote()

    def _note_where(self, log_dir: str, name: str, placement: dict) -> None:
        """The kernel-side log of a node says where its agent's own log is (on the Ray node)."""
        with private.open_file(os.path.join(log_dir, f"agent-{name}.log"), "ab") as f:
            f.write((f"ray node {placement['ray_node_id']} at {placement['ip']}, GPUs "
                     f"{placement['gpu_ids'] or 'none'}: the agent's log is {placement['log']} there\n").encode())

    def master_addr(self, link: NodeLink) -> str:
        return self._nodes[link.name].placement["ip"]

    def master_port(self, link: NodeLink) -> int | None:
        """A port free on rank 0's Ray node, found there."""
        try:
            return self.ray.get(self._nodes[link.name].actor.free_port.remote(), timeout=10)
        except Exception:
            return None  # (the default choice; a dead node fails the run on its own)

    def placement(self, name: str) -> dict | None:
        node = self._nodes.get(name)
        return dict(node.placement) if node else None

    def stop_node(self, link: NodeLink, wait: float = 5.0) -> None:
        with self._lock:
            node = self._nodes.pop(link.name, None)
        if node is None:
            return
        # The agent stops its ranks as on every backend (ray.cancel would not interrupt a call
        # on the actor, ray #23443); then the actor goes, and with the last of its group, the group.
        link.send({"t": "shutdown"})
        node.pipe.finish(wait)
        _kill(self.ray, node.actor)
        node.pipe.close()
        with self._lock:
            entry = self._groups.get(id(node.group))
            if entry is not None:
                entry.members.discard(link.name)
                last = not entry.members
                if last:
                    del self._groups[id(node.group)]
        if entry is not None and last:
            self._remove_group(node.group)

    def _remove_group(self, group) -> None:
        from ray.util import remove_placement_group

        try:
            remove_placement_group(group)
        except Exception:
            pass  # the cluster is gone: nothing is reserved there any more

    def close(self) -> None:
        with self._lock:
            groups = [entry.group for entry in self._groups.values()]
            self._groups.clear()
        for group in groups:
            self._remove_group(group)
        if self._connected:
            self._connected = False
            ray_cluster.disconnect()


def _kill(ray, actor) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:
        pass
