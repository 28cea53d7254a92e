"""The Python API behind the magics: pools, runs, settings. Usable without IPython."""

from __future__ import annotations

import atexit
import dataclasses
import os
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from . import backends, cellcode, compat, kernel_shutdown, owners, values
from . import workdir as travel
from .config import Config
from .inputs import Inputs
from .errors import LeptonError
from .liverun import LiveRun
from .scheduler import RunSpec, ScheduledRun
from .pool import Pool, PoolBusy
from .run import Run
from .store import Store

if TYPE_CHECKING:
    from .sweeps.driver import SweepRun
    from .sweeps.space import SweepSpec


class Session:
    """One per kernel (or script): owns the pools it started and the runs it submitted."""

    def __init__(self, config: Config | None = None, store: Store | None = None):
        self.config = config or Config.load()
        self.store = store or Store()
        self.pools: dict[str, Pool] = {}
        self.live: dict[str, ScheduledRun] = {}
        self.last_seq: int | None = None
        self._last_live: ScheduledRun | None = None  # kept, so lm.last_run() stays cheap
        self._to_bind: list[tuple[dict, dict]] = []
        self._binders: dict[int, threading.Thread] = {}  # runs followed through the store
        self._poller: threading.Thread | None = None
        self._closed = False
        self._lock = threading.RLock()
        self.store.reconcile()  # what kernels that died (killed, crashed) left open
        atexit.register(self.close)

    # --- pools -----------------------------------------------------------------------------
    def pool(self, backend: str | None = None) -> Pool | None:
        pool = self.pools.get(backend or self.config["backend"])
        return pool if pool is not None and not pool.closed else None

    def up(self, backend: str | None = None, nodes: int | None = None, **settings: Any) -> Pool:
        """Start (or grow) the pool of ``backend`` to ``nodes`` warm nodes (0: a pool that starts
        nodes as runs need them, ``%lepton up --min 0``)."""
        backend = backend or self.config["backend"]
        nodes = nodes if nodes is not None else self.config["nodes"]
        self._check_node_count(max(nodes, settings.get("max_nodes") or 0))
        with self._lock:
            pool = self.pool(backend)
            if pool is None:
                merged = self.pool_settings(backend)
                merged.update({k: v for k, v in settings.items() if v is not None})
                pool = Pool(self.store, backend, merged)
                self.pools[backend] = pool
                self._start_command_poller()
            else:
                given = {k: v for k, v in settings.items() if v is not None}
                if backend == "ec2":
                    from .backends.ec2 import refuse_other_machines

                    refuse_other_machines(pool.id, pool.settings, given)
                if given:  # (a run's own up() gives none: no store write on every cell)
                    pool.settings.update(given)
                    self.store.set_pool_settings(pool.id, {k: v for k, v in pool.settings.items() if k != "secret"})
        pool.ensure(nodes)
        return pool

    def pool_settings(self, backend: str) -> dict:
        """What a new pool of ``backend`` starts with: its settings if this session has one up,
        else the settings that shape a pool (the keeper of a detached run gets the same)."""
        pool = self.pool(backend)
        if pool is not None:
            return {k: v for k, v in pool.settings.items() if k != "secret"}
        return {k: self.config[k] for k in self.config.values
                if k in ("idle_timeout", "preload", "heartbeat_timeout", "retry_spare")
                or k.startswith(("ssh_", "ec2_", "spot_", "ray_"))}

    def _check_node_count(self, nodes: int) -> None:
        most = self.config["max_nodes"]
        if nodes > most:
            raise LeptonError(f"{nodes} nodes is more than max_nodes ({most}); "
                              f"raise it with %lepton config max_nodes={nodes} if you mean it")

    def down(self, backend: str | None = None, reason: str = "the pool was released") -> int:
        """Release pools (one backend, or all), cancelling their runs with ``reason``; returns how
        many nodes were stopped."""
        with self._lock:
            names = [backend] if backend else list(self.pools)
            pools = [self.pools[n] for n in names if n in self.pools and not self.pools[n].closed]
            going = [live for live in self.live.values() if live.pool in pools]
        # Every run on those pools ends with that reason: running ones, queued ones waiting for
        # nodes, sweeps (which would otherwise start their next trial on a pool that is gone).
        for live in going:
            live.cancel(reason=reason)
        stopped = 0
        for pool in pools:
            stopped += len(pool.live_nodes)
            pool.down(reason)
        return stopped

    def cost(self):
        """$/h and dollars so far per pool of this session (free backends cost 0)."""
        import pandas as pd

        rows = []
        for pool in self.pools.values():
            rows.append({"pool": pool.id, "backend": pool.backend_name, "nodes": len(pool.live_nodes),
                         "status": "down" if pool.closed else "up",
                         "dollars_per_hour": pool.backend.price_per_hour() or 0.0,
                         "cost_so_far": round(pool.backend.cost_so_far() or 0.0, 4),
                         "price_note": getattr(pool.backend, "price_note", lambda: "")()})
        return pd.DataFrame(rows, columns=["pool", "backend", "nodes", "status", "dollars_per_hour", "cost_so_far",
                                           "price_note"])

    def gc(self, terminate: bool = False) -> list[dict]:
        """Every EC2 instance and pool security group this tool made, each with what gc does to
        it and why (the "action" and "why" keys): only yours whose pool is alive nowhere (not up
        here, heartbeat stale) are terminated or deleted, and only with ``terminate``. See aws/gc.py."""
        import boto3

        from .aws import gc

        client = boto3.client("ec2", region_name=self.config["ec2_region"],
                              endpoint_url=self.config["ec2_endpoint_url"] or None)
        live = {p.id for p in self.pools.values() if not p.closed}
        return gc.collect(client, live, terminate=terminate)

    def close(self, reason: str = kernel_shutdown.EXITED) -> None:
        """The process is going (exit, kernel restart or shutdown): end every run, saying why."""
        self._closed = True
        try:
            self.down(reason=reason)
        except Exception:
            pass

    # --- commands from other processes -----------------------------------------------------------
    def _start_command_poller(self) -> None:
        """Actions taken elsewhere (the JupyterLab sidebar) arrive as rows in the store's command
        table, addressed to this process; a thread takes them within COMMAND_POLL_SECONDS.
        Polling the store needs no port, no socket file and no registry: the store is shared
        by every kernel and the server already, and a command outlives a busy kernel."""
        if self._poller is not None:
            return
        self._poller = threading.Thread(target=self._poll_commands, daemon=True, name="lepton-commands")
        self._poller.start()

    def _poll_commands(self) -> None:
        """Also renews the leases of this session's pools and runs (readers on other machines
        take an expired lease for a dead kernel)."""
        renewed = 0.0
        while not self._closed:
            time.sleep(COMMAND_POLL_SECONDS)
            try:
                with self._lock:
                    runs = list(self.live)
                    pools = [p.id for p in self.pools.values() if not p.closed]
                for command in self.store.take_commands(os.getpid(), runs + pools):
                    self.store.finish_command(command["id"], self._execute(command))
                if time.monotonic() - renewed > owners.LEASE_SECONDS / 4:
                    self.store.renew_leases(pools, runs)
                    renewed = time.monotonic()
            except Exception:  # a locked or closed store: try again next time
                continue

    def _execute(self, command: dict) -> str:
        action, target = command["action"], command["target"]
        if action == "cancel_run":
            live = self.live.get(target)
            if live is None:
                return f"run {target} is not running here"
            # (a cancel's node column says where it came from: another process's Run.cancel)
            live.cancel(reason=f"cancelled from {command.get('node') or 'the sidebar'}")
            return f"cancelling {live.name}"
        pool = next((p for p in self.pools.values() if p.id == target and not p.closed), None)
        if pool is None:
            return f"pool {target} is not up here"
        if action == "release_pool":
            self.down(pool.backend_name)
            return f"released pool {target}"
        if action == "release_node":
            return pool.release_node(command["node"])
        return f"unknown action {action!r}"

    # --- runs ------------------------------------------------------------------------------
    def submit(
        self,
        code: str,
        namespace: dict | None = None,
        *,
        nodes: int | None = None,
        gpus: int | None = None,
        backend: str | None = None,
        name: str | None = None,
        inputs: list[str] | None = None,
        outputs: list[str] | None = None,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        retries: int | None = None,
        retry_on_error: bool = False,
        line_offset: int = cellcode.MAGIC_LINE_OFFSET,
        bind: bool = True,
        detach: bool = False,
        sweep: "SweepSpec | None" = None,
        on_done: Callable[[LiveRun], None] | None = None,
        workdir: str | None = None,
        pip: str | None = None,
    ) -> Run:
        """Run ``code`` on ``nodes`` nodes; returns at once with the Run (see ``Run.wait``).

        Inputs default to the free names of the code found in ``namespace``; outputs default to
        the names it assigns at top level, bound back into ``namespace`` when the run succeeds.
        A run that loses a node or a rank starts again up to ``retries`` times (see scheduler.py).
        A ``detach``ed run is kept by a process of its own (keeper.py): it goes on when this
        process ends, and any later one follows it through the store.
        Raises ``CellSyntaxError`` or ``LeptonError`` before any node is used.
        """
        namespace = {} if namespace is None else namespace
        tree = cellcode.check_syntax(code, line_offset)
        backend = backend or self.config["backend"]
        nodes_given = nodes
        nodes = nodes or self.config["nodes"]
        self._check_node_count(nodes)
        gpus = gpus if gpus is not None else self.config["gpus"]
        pool = self.pool(backend)
        if gpus is None and pool is not None:
            gpus = pool.settings.get("gpus")
        timeout = timeout if timeout is not None else self.config["timeout"]
        retries = retries if retries is not None else self.config["retries"]
        if inputs is None:
            swept = set(sweep.names) if sweep is not None else set()  # each trial's own values win
            input_names = [n for n in cellcode.free_names(tree) if n in namespace and n not in swept]
        else:
            missing = [n for n in inputs if n not in namespace]
            if missing:
                raise LeptonError(f"--in names {', '.join(missing)}, which the notebook does not define")
            input_names = inputs
        shipped = _pickle_inputs(namespace, input_names)
        # A cell of plain Python over plain values runs in a light rank: no torch to fork.
        light = cellcode.needs_only_stdlib(tree) and all(
            type(namespace[n]) in _PLAIN_TYPES for n in input_names
        )
        explicit = outputs is not None
        output_names = outputs if explicit else cellcode.assigned_names(tree)
        # The folder and packages remote nodes need (the notebook's folder mirrored, --pip).
        remote = backends.ranks_elsewhere(backend)
        plan = travel.plan_run(self.config, remote, tree, namespace, input_names, workdir=workdir, pip=pip)
        spec = RunSpec(code=code, line_offset=line_offset, inputs=shipped, outputs=output_names,
                       explicit_outputs=explicit, nodes=nodes, gpus=gpus, env=env or {}, preload=not light,
                       local=backend == "local", retries=retries, retry_on_error=retry_on_error,
                       timeout=timeout, plan=plan)
        run_id = f"r-{secrets.token_hex(4)}"
        record = dict(backend=backend, nodes=nodes, gpus=gpus, code=code, inputs=input_names, timeout=timeout,
                      env=env or {}, retries=retries)
        if detach:
            return self._submit_detached(run_id, name, spec, record, namespace if bind else None, sweep,
                                         nodes_given)
        if sweep is not None:
            return self._submit_sweep(run_id, name, spec, record, sweep, nodes_given,
                                      namespace if bind else None, on_done)

        # The run's acquire starts the nodes it lacks, saying why. A Ray pool reserves its nodes'
        # GPUs when it is made: a first cell's --gpus shapes it (other pools take any node).
        first_gpus = {"gpus": gpus} if backend == "ray" and gpus and self.pool(backend) is None else {}
        pool = self.up(backend, 0, **first_gpus)
        seq, name = self.store.add_run(run_id, name, pool=pool.id, **record)
        callbacks: list[Callable[[LiveRun], None]] = [self._forget]
        if bind:
            callbacks.append(lambda live: self._queue_binding(namespace, live))
        if on_done is not None:
            callbacks.append(on_done)
        spec.on_done = callbacks
        live = self._start(pool, seq, run_id, name, spec)
        return Run(self.store, seq, live, self)

    def _start(self, pool: Pool, seq: int, run_id: str, name: str, spec: RunSpec, last: bool = True,
               scheduled: Callable[[ScheduledRun], None] | None = None) -> ScheduledRun:
        """Nodes for a recorded run, checked, and its first attempt dispatched; or, when every
        node the pool may hold is busy, the run queued for the next free ones. ``scheduled``
        hears of the run as soon as it exists (before its nodes are made ready)."""
        try:
            links = pool.acquire(spec.nodes, run_id)
            compat.check(links, needs_torch=spec.preload, gpus=spec.gpus, local=spec.local)
        except PoolBusy as busy:
            live = self._scheduled(pool, seq, run_id, name, spec, last, scheduled)
            live.start_queued(str(busy))
            return live
        except LeptonError as e:
            if "links" in locals():
                pool.release_run(run_id)
            self.store.update_run(seq, status="failed", ended=time.time(),
                                  error={"type": "LeptonError", "message": str(e)})
            raise
        live = self._scheduled(pool, seq, run_id, name, spec, last, scheduled)
        try:
            live.start(links)
        except travel.Stopped as e:  # cancelled while its nodes were made ready: it ended so
            live.abort(e)
        except BaseException as e:  # a bad placement, or Ctrl-C half-way through dispatch
            live.abort(e)
            raise
        return live

    def _scheduled(self, pool: Pool, seq: int, run_id: str, name: str, spec: RunSpec,
                   last: bool = True, scheduled: Callable[[ScheduledRun], None] | None = None) -> ScheduledRun:
        live = ScheduledRun(store=self.store, pool=pool, seq=seq, run_id=run_id, name=name, spec=spec)
        with self._lock:
            self.live[run_id] = live
            if last:
                self._last_live = live
                self.last_seq = seq
        if scheduled is not None:
            scheduled(live)
        return live

    def _submit_sweep(self, run_id: str, name: str | None, spec: RunSpec, record: dict, sweep: "SweepSpec",
                      nodes_given: int | None, namespace: dict | None, on_done) -> Run:
        """A sweep: its own row, and a driver that runs each trial as a run under it (sweeps/)."""
        self._check_node_count(sweep.nodes_per_trial)
        pool = self.up(record["backend"], 0)
        self._plan_sweep(pool, sweep, nodes_given)
        seq, name = self.store.add_run(run_id, name, pool=pool.id,
                                       **{**record, "nodes": sweep.parallel * sweep.nodes_per_trial},
                                       sweep=sweep.describe())
        callbacks: list[Callable] = [self._forget]
        if namespace is not None:  # the best trial's outputs
            callbacks.append(lambda live: self._queue_binding(namespace, live))
        if on_done is not None:
            callbacks.append(on_done)
        return Run(self.store, seq, self._start_sweep(pool, seq, run_id, name, spec, sweep, callbacks), self)

    def _plan_sweep(self, pool: Pool, sweep: "SweepSpec", nodes_given: int | None) -> None:
        """How many trials run at once (``sweep.parallel``): as asked, else the nodes given, else
        the pool's free ones, shared out among trials; never past the pool's --max."""
        per_trial = sweep.nodes_per_trial
        if sweep.parallel:
            parallel = sweep.parallel
        else:
            budget = nodes_given or max(len(pool.live_nodes) - len(pool.busy), self.config["nodes"])
            parallel = max(1, budget // per_trial)
        if pool.max_nodes:
            parallel = min(parallel, max(1, pool.max_nodes // per_trial))
        parallel = min(parallel, sweep.trials)
        self._check_node_count(parallel * per_trial)
        sweep.parallel = parallel  # what the sweep runs with (the store and the pruner see it)

    def _start_sweep(self, pool: Pool, seq: int, run_id: str, name: str, spec: RunSpec, sweep: "SweepSpec",
                     callbacks: list[Callable]) -> "SweepRun":
        from .sweeps.driver import SweepRun

        pool.ensure(sweep.parallel * sweep.nodes_per_trial)  # the nodes start together, not trial by trial
        base = dataclasses.replace(spec, nodes=sweep.nodes_per_trial, owns_inputs=False)  # the sweep frees them
        live = SweepRun(session=self, pool=pool, seq=seq, run_id=run_id, name=name, spec=sweep, base=base,
                        parallel=sweep.parallel, on_done=callbacks)
        with self._lock:
            self.live[run_id] = live
            self._last_live = live
            self.last_seq = seq
        try:
            live.start()
        except Exception as e:
            self.store.update_run(seq, status="failed", ended=time.time(),
                                  error={"type": "LeptonError", "message": str(e)})
            with self._lock:
                self.live.pop(run_id, None)
            raise
        return live

    def start_trial(self, pool: Pool, seq: int, run_id: str, name: str, spec: RunSpec,
                    scheduled: Callable[[ScheduledRun], None] | None = None) -> ScheduledRun:
        """One trial of a sweep: an ordinary run (queued when the pool is busy), not the last run."""
        spec.on_done = [self._forget, *spec.on_done]
        return self._start(pool, seq, run_id, name, spec, last=False, scheduled=scheduled)

    def _submit_detached(self, run_id: str, name: str | None, spec: RunSpec, record: dict,
                         namespace: dict | None, sweep: "SweepSpec | None" = None,
                         nodes_given: int | None = None) -> Run:
        from . import keeper

        if sweep is not None:
            self._check_node_count(sweep.nodes_per_trial)
        seq, name = self.store.add_run(run_id, name, detached=1, **record,
                                       **({"sweep": sweep.describe()} if sweep is not None else {}))
        keeper.launch(self.store, seq=seq, run_id=run_id, name=name, backend=record["backend"], spec=spec,
                      config=dict(self.config.values), settings=self.pool_settings(record["backend"]),
                      sweep=sweep, nodes_given=nodes_given)
        with self._lock:
            self.last_seq = seq
        run = Run(self.store, seq, None, self)
        if namespace is not None:
            self.bind_when_done(run, namespace)
        return run

    def start_prepared(self, seq: int, run_id: str, name: str, backend: str, spec: RunSpec,
                       settings: dict) -> Run:
        """The keeper's side of a detached run: a pool of this process's own, then the run as
        ``submit`` would start it. A run that cannot start is recorded as failed."""
        try:
            pool = self.up(backend, 0, **settings)
            self.store.update_run(seq, pool=pool.id)
        except Exception as e:
            self.store.update_run(seq, status="failed", ended=time.time(),
                                  error={"type": "LeptonError", "message": str(e)})
            raise
        spec.on_done = [self._forget]
        return Run(self.store, seq, self._start(pool, seq, run_id, name, spec), self)

    def start_prepared_sweep(self, seq: int, run_id: str, name: str, backend: str, spec: RunSpec,
                             sweep: "SweepSpec", nodes_given: int | None, settings: dict) -> Run:
        """The keeper's side of a detached sweep: as ``start_prepared``, then the sweep as
        ``submit`` would start it, planned on the keeper's own pool."""
        try:
            pool = self.up(backend, 0, **settings)
            self._plan_sweep(pool, sweep, nodes_given)
            self.store.update_run(seq, pool=pool.id, nodes=sweep.parallel * sweep.nodes_per_trial,
                                  sweep=sweep.describe())
        except Exception as e:
            self.store.update_run(seq, status="failed", ended=time.time(),
                                  error={"type": "LeptonError", "message": str(e)})
            raise
        return Run(self.store, seq, self._start_sweep(pool, seq, run_id, name, spec, sweep, [self._forget]),
                   self)

    # --- binding outputs -------------------------------------------------------------------
    def _queue_binding(self, namespace: dict, live: LiveRun) -> None:
        """Outputs are bound by the thread that waits for the run (or, for --async runs, before
        the next cell runs), never from a reader thread in the middle of another cell."""
        if live.status == "succeeded" and live.outputs:
            with self._lock:
                self._to_bind.append((namespace, live.outputs))

    def bind_when_done(self, run: Run, namespace: dict) -> threading.Thread:
        """Bind the outputs of a run this process does not run (detached, or attached to) when
        it ends, before the next cell or at ``run.wait()``."""

        with self._lock:
            binder = self._binders.get(run.seq)
        if binder is not None and binder.is_alive():
            return binder  # (the cell that detached it follows it already)

        def wait() -> None:
            run.wait_done()
            if run.status == "succeeded":
                outputs = run.outputs
                if outputs:
                    with self._lock:
                        self._to_bind.append((namespace, outputs))

        thread = threading.Thread(target=wait, daemon=True, name=f"lepton-bind-{run.name}")
        with self._lock:
            self._binders[run.seq] = thread
        thread.start()
        return thread

    def bind_pending(self, seq: int | None = None) -> None:
        """Bind what ended runs brought back; with ``seq``, first wait for that run's outputs
        to be read (a run that just ended, followed through the store)."""
        with self._lock:
            binder = self._binders.pop(seq, None) if seq is not None else None
        if binder is not None:
            binder.join()
        with self._lock:
            pending, self._to_bind = self._to_bind, []
            self._binders = {k: t for k, t in self._binders.items() if t.is_alive()}
        for namespace, outputs in pending:
            namespace.update(outputs)

    def _forget(self, live: LiveRun) -> None:
        """A finished run lives on in the store; drop it here so its data can be freed."""
        with self._lock:
            self.live.pop(live.run_id, None)

    def get_run(self, key: str | int) -> Run:
        row = self.store.run_row(key)
        if row is None:
            raise LeptonError(f"no run called {key!r} in {self.store.path}")
        return Run(self.store, row["seq"], self._live_run(row["id"]), self)

    def _live_run(self, run_id: str) -> ScheduledRun | None:
        live = self.live.get(run_id)
        if live is None and self._last_live is not None and self._last_live.id == run_id:
            live = self._last_live
        return live

    def last_run(self) -> Run | None:
        seq = self.last_seq
        if seq is None:
            rows = self.store.execute("SELECT MAX(seq) FROM runs")
            seq = rows[0][0] if rows else None
        if seq is None:
            return None
        row = self.store.run_row(seq)
        return Run(self.store, seq, self._live_run(row["id"]), self)

    def runs(self):
        """Every run in the store, newest first."""
        import pandas as pd

        df = self.store.frame(
            "SELECT r.id, r.name, r.status, r.backend, r.nodes, r.world_size, r.created, r.started, r.ended, "
            "r.reason, r.detached, p.name AS sweep, r.trial, r.owner_pid FROM runs r "
            "LEFT JOIN runs p ON p.seq = r.parent ORDER BY r.seq DESC"
        )
        for _i, row in df.iterrows():
            if row["status"] not in ("succeeded", "failed", "cancelled") and row["id"] not in self.live:
                df.loc[_i, "status"] = Run(self.store, self.store.run_row(row["id"])["seq"]).status
        df["duration"] = df["ended"].fillna(pd.Timestamp.now().timestamp()) - df["started"]
        df["created"] = pd.to_datetime(df["created"], unit="s", utc=True)
        df["detached"] = df["detached"].astype(bool)
        return df.drop(columns=["started", "ended"]).set_index("id")

    def nodes(self):
        """The nodes of the live pools, with their last telemetry."""
        ids = [p.id for p in self.pools.values() if not p.closed]
        if not ids:
            import pandas as pd

            return pd.DataFrame(columns=["pool", "node", "host", "status", "gpus", "cpu_percent"])
        marks = ",".join("?" for _ in ids)
        return self.store.frame(
            f"SELECT pool, node, host, place, status, cpus, memory, gpus, gpu_name, python, torch, cpu_percent, "
            f"mem_used, last_seen FROM nodes WHERE pool IN ({marks}) ORDER BY node", ids
        )


def _pickle_inputs(namespace: dict, names: list[str]) -> Inputs | None:
    """The inputs as one pickle, so objects sharing state (a model and its optimizer) still
    share it on the node, large buffers out of band (inputs.py). When that fails, find the
    variable to blame."""
    if not names:
        return None
    try:
        return Inputs.pickle({n: namespace[n] for n in names})
    except Exception:
        pass
    for n in names:
        try:  # modules pickle by name: the node imports them
            values.dumps(namespace[n])
        except Exception as e:
            raise LeptonError(
                f"cannot send {n!r} (a {values.describe(namespace[n])}) to the nodes: {type(e).__name__}: "
                f"{e}. Create it inside the cell, or list what to send with --in"
            ) from None
    raise LeptonError(f"cannot send the inputs {', '.join(names)} together; try fewer with --in")


#: How often a session looks for commands from the sidebar (actions take effect within 1 s).
COMMAND_POLL_SECONDS = 0.25

_PLAIN_TYPES = frozenset({int, float, complex, bool, str, bytes, type(None), list, tuple, dict, set, frozenset})

_default: Session | None = None
_default_lock = threading.Lock()


def default_session(defaults: bool = False) -> Session:
    """The session of this process. Bad settings raise a LeptonError naming the source; with
    ``defaults`` the settings files and variables are ignored instead."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Session(Config.defaults() if defaults else None)
        return _default
