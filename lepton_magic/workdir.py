"""The notebook's folder on remote nodes, and the packages a run asks for (the node's side is
agent/prepare.py, agent/mirror.py and agent/envs.py).

At submit, the folder (``--workdir``, setting ``workdir``; default the notebook's current
directory) becomes a manifest {relative path: [sha256, size, mode]} that honours .gitignore
files and ``workdir_exclude``, capped at ``workdir_max_bytes``. Modules the cell imports from
outside site-packages and outside that folder (a sibling .py of another folder, an editable
install) join it under ``.lepton_modules/``. Before each attempt starts, every node at once is
sent the manifest over its signed pipe, answers with the blobs it lacks, gets those, and builds
its mirror; then, where packages are asked for, it makes (or finds) their environment. The
answers come back through the run (``LiveRun.on_message`` hands them to ``Replies``).

Shipping the modules' files rather than pickling them by value (cloudpickle's
``register_pickle_by_value``) also covers ``import`` statements that run on the node, and a
module's own imports of its neighbours.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import queue
import secrets
import site
import socket
import stat
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import LeptonError

#: What the agents answer (the pool hands them to the run whose id they carry).
REPLIES = frozenset({"sync_need", "sync_done", "env_done", "pull_data", "pull_done"})
MODULES_DIR = ".lepton_modules"
#: Blobs travel in messages of at most this many bytes (a frame holds at most 16 MiB).
BATCH_BYTES = 8 << 20
#: A node that has not answered a sync step for this long is given up on.
SYNC_TIMEOUT = 120.0
#: Installing packages may take this long on a node.
INSTALL_TIMEOUT = 3600.0
#: Always left out, whatever .gitignore says.
ALWAYS_EXCLUDED = (".git/", MODULES_DIR + "/")


@dataclass
class Plan:
    """What a run's nodes need before its ranks start."""

    key: str                                                 # the mirror's name on the nodes
    root: Path | None                                        # the folder mirrored (None: only modules)
    files: dict[str, list] = field(default_factory=dict)      # rel -> [sha256, size, mode]
    sources: dict[str, Path] = field(default_factory=dict)    # blob name -> a local file with it
    requirements: list[str] = field(default_factory=list)

    @property
    def modules(self) -> bool:
        return any(rel.startswith(MODULES_DIR + "/") for rel in self.files)


# --- at submit: what travels ------------------------------------------------------------------
def plan_run(config, remote: bool, tree: ast.AST | None, namespace: dict, input_names: list[str],
             workdir: str | None = None, pip: str | None = None) -> Plan | None:
    """The run's plan, or None when nothing needs doing on the nodes. Raises one LeptonError
    for a folder that does not exist or is over the cap."""
    chosen = workdir if workdir is not None else (config["workdir"] or "")
    requirements = _split_requirements(config["node_requirements"]) + _split_requirements(pip)
    root: Path | None = None
    if remote and chosen.strip().lower() != "none":
        root = Path(os.path.expanduser(chosen or os.getcwd())).resolve()
        if not root.is_dir():
            raise LeptonError(f"--workdir {chosen!r} is not a folder; give a folder, or --workdir none")
        reqs = root / "requirements.txt"
        if reqs.is_file():
            requirements = _split_requirements(reqs.read_text()) + requirements
    plan = Plan(key=project_key(root or Path(os.getcwd())), root=root, requirements=_dedupe(requirements))
    if remote:
        extra = local_modules(tree, namespace, input_names, root)
        manifest(plan, root, extra, _patterns(config["workdir_exclude"]), int(config["workdir_max_bytes"]))
    if not plan.files and not plan.requirements:
        return None
    return plan


def project_key(root: Path) -> str:
    """The mirror's folder name: readable, and distinct per kernel machine and folder."""
    digest = hashlib.sha256(f"{socket.gethostname()}\0{root}".encode()).hexdigest()[:12]
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in root.name)[:40] or "root"
    return f"{name}-{digest}"


def manifest(plan: Plan, root: Path | None, extra: dict[str, Path], exclude: list[str], max_bytes: int) -> None:
    """Fill ``plan.files`` and ``plan.sources`` from the folder and the extra modules."""
    found: dict[str, Path] = dict(walk(root, exclude)) if root is not None else {}
    found.update(extra)
    sizes = []
    for rel, path in found.items():
        try:
            st = path.stat()
        except OSError:
            continue  # gone meanwhile, or a broken link
        if not stat.S_ISREG(st.st_mode):
            continue
        sizes.append((st.st_size, rel))
        mode = 0o755 if st.st_mode & 0o111 else 0o644
        sha = file_sha256(path, st)
        plan.files[rel] = [sha, st.st_size, mode]
        plan.sources[sha + (".x" if mode & 0o111 else "")] = path
    total = sum(size for size, _ in sizes)
    if total > max_bytes:
        largest = ", ".join(f"{rel} ({_size(size)})" for size, rel in sorted(sizes, reverse=True)[:5])
        raise LeptonError(
            f"the working directory {root} holds {_size(total)} to send, more than workdir_max_bytes "
            f"({_size(max_bytes)}); largest: {largest}. Leave files out with .gitignore or "
            f"%lepton config workdir_exclude=..., raise the cap, or pick another folder with --workdir PATH "
            f"(--workdir none sends none)")


def _home_inside(root: Path) -> list[str]:
    """LEPTON_HOME when it lies inside the folder: the store changes as the run goes (its bytes
    would not match their hash by the time they are sent), and it is private to this machine."""
    from .store import default_home

    home = default_home().resolve()
    return [f"/{home.relative_to(root).as_posix()}/"] if _inside(home, root) and home != root else []


def walk(root: Path, exclude: list[str]):
    """(relative path, path) of each file under ``root`` that no .gitignore there (nor
    ``exclude``, patterns in .gitignore syntax relative to ``root``) leaves out."""
    import pathspec

    base_spec = pathspec.GitIgnoreSpec.from_lines([*ALWAYS_EXCLUDED, *exclude, *_home_inside(root)])
    specs_of: dict[str, list[tuple[str, object]]] = {}
    for folder, dirnames, filenames in os.walk(root):
        rel_folder = os.path.relpath(folder, root)
        rel_folder = "" if rel_folder == "." else rel_folder.replace(os.sep, "/")
        specs = list(specs_of.get(rel_folder, [("", base_spec)]))
        if ".gitignore" in filenames:
            try:
                with open(os.path.join(folder, ".gitignore"), errors="replace") as f:
                    specs.append((rel_folder, pathspec.GitIgnoreSpec.from_lines(f)))
            except OSError:
                pass

        def ignored(rel: str, is_dir: bool) -> bool:
            for base, spec in specs:
                inside = rel[len(base) + 1:] if base else rel
                if spec.match_file(inside + ("/" if is_dir else "")):
                    return True
            return False

        kept = []
        for d in sorted(dirnames):
            rel = f"{rel_folder}/{d}" if rel_folder else d
            if not ignored(rel, True):
                kept.append(d)
                specs_of[rel] = specs
        dirnames[:] = kept
        for name in sorted(filenames):
            rel = f"{rel_folder}/{name}" if rel_folder else name
            if not ignored(rel, False):
                yield rel, Path(folder) / name


#: path -> ((inode, size, mtime_ns, ctime_ns), sha256): an unchanged file is not hashed again.
_hashes: dict[str, tuple[tuple, str]] = {}


def file_sha256(path: Path, st: os.stat_result | None = None) -> str:
    st = st or path.stat()
    sig = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    known = _hashes.get(str(path))
    if known is not None and known[0] == sig:
        return known[1]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    sha = digest.hexdigest()
    _hashes[str(path)] = (sig, sha)
    return sha


# --- modules from outside site-packages -----------------------------------------------------------
def local_modules(tree: ast.AST | None, namespace: dict, input_names: list[str], root: Path | None) -> dict[str, Path]:
    """Files of the modules the cell (or a value it reads) needs that live neither in
    site-packages nor in the mirrored folder, keyed by their path under .lepton_modules/;
    their own imports of such modules too."""
    names = set(_imported(tree)) if tree is not None else set()
    for n in input_names:
        value = namespace.get(n)
        for module in (getattr(value, "__module__", None), getattr(type(value), "__module__", None)):
            if isinstance(module, str):
                names.add(module.split(".")[0])
    files: dict[str, Path] = {}
    seen: set[str] = set()
    while names:
        name = names.pop()
        if name in seen or name in sys.builtin_module_names or name == "__main__":
            continue
        seen.add(name)
        where = _module_location(name)
        if where is None or _installed(where) or (root is not None and _inside(where, root)):
            continue
        if where.name == "__init__.py":
            folder = where.parent
            for path in sorted(folder.rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                    files[f"{MODULES_DIR}/{folder.name}/{path.relative_to(folder).as_posix()}"] = path
                    if path.suffix == ".py":
                        names.update(_imported_from(path))
        elif where.suffix == ".py":
            files[f"{MODULES_DIR}/{where.name}"] = where
            names.update(_imported_from(where))
    return files


def _imported(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def _imported_from(path: Path) -> list[str]:
    try:
        return list(_imported(ast.parse(path.read_text(errors="replace"))))
    except (OSError, SyntaxError, ValueError):
        return []


def _module_location(name: str) -> Path | None:
    module = sys.modules.get(name)
    origin = getattr(module, "__file__", None) if module is not None else None
    if origin is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        origin = spec.origin if spec is not None and spec.has_location else None
    return Path(origin).resolve() if origin else None


def _installed(path: Path) -> bool:
    """In the standard library or any site-packages: the node has (or installs) its own."""
    if "site-packages" in path.parts or "dist-packages" in path.parts:
        return True
    places = {sys.prefix, sys.base_prefix, sys.exec_prefix, *sysconfig.get_paths().values(),
              *site.getsitepackages(), site.getusersitepackages()}
    return any(_inside(path, Path(p).resolve()) for p in places if p)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


# --- before an attempt: the nodes made ready ---------------------------------------------------------
class Stopped(LeptonError):
    """The run was cancelled (or timed out) while its nodes were being made ready."""

    def __init__(self, reason: str, failure: bool):
        super().__init__(reason)
        self.reason, self.failure = reason, failure


_WAKE = {"t": "_stopped"}


class Replies:
    """The agents' answers to one run's requests, per node, in the order they came. A cancel
    stops every wait for them at once (``stop``)."""

    def __init__(self):
        self._queues: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()
        self.stopped: Stopped | None = None

    def _queue(self, name: str) -> queue.Queue:
        with self._lock:
            return self._queues.setdefault(name, queue.Queue())

    def put(self, link, message: dict) -> None:
        self._queue(link.name).put(message)

    def stop(self, reason: str, failure: bool) -> bool:
        """Wake every wait with ``Stopped``; False if it was stopped already."""
        with self._lock:
            if self.stopped is not None:
                return False
            self.stopped = Stopped(reason, failure)
            queues = list(self._queues.values())
        for q in queues:
            q.put(_WAKE)
        return True

    def check(self) -> None:
        if self.stopped is not None:
            raise self.stopped

    def get(self, link, kinds: tuple[str, ...], timeout: float) -> dict:
        """The node's next answer of one of ``kinds``; a node lost or silent raises, and so
        does a cancel (``Stopped``)."""
        q = self._queue(link.name)
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            if not link.alive:
                raise LeptonError("the node was lost")
            try:
                message = q.get(timeout=min(0.5, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise LeptonError(f"no answer within {timeout:g} s") from None
                continue
            if message.get("t") in kinds:
                return message


class NodeFailed(Exception):
    def __init__(self, what: str, why: str):
        super().__init__(why)
        self.what, self.why = what, why


def prepare(live, first_ranks: dict[str, int]) -> dict[str, dict]:
    """Every node of the attempt made ready at once: {node: {"cwd": ..., "paths": [...]}}.
    Raises one LeptonError naming each node that could not be."""
    plan = live.plan
    if plan is None:
        return {}
    results: dict[str, dict] = {}
    failures: dict[str, NodeFailed] = {}
    stats: dict[str, dict] = {}

    def one(link) -> None:
        try:
            results[link.name] = _prepare_node(live, link, plan, first_ranks.get(link.name, 0), stats)
        except NodeFailed as e:
            failures[link.name] = e
        except LeptonError as e:
            failures[link.name] = NodeFailed("(the sync)", str(e))
        except Exception as e:  # a file that vanished, a closed pipe: that node's row says it
            failures[link.name] = NodeFailed("(the sync)", f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=one, args=(link,), daemon=True, name=f"lepton-prepare-{link.name}")
               for link in live.nodes]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.2)  # short waits: Ctrl-C reaches the kernel's thread
    live.replies.check()  # a cancel came: that, not what it cut short, is the run's end
    if stats:
        first = live.nodes[0].name
        live.store.add_event("workdir", {
            "key": plan.key, "root": str(plan.root) if plan.root else None, "rank0_node": first,
            "rank0_root": stats.get(first, {}).get("mirror"), "nodes": stats,
            "files": len(plan.files), "bytes": sum(s[1] for s in plan.files.values()),
            "sent_bytes": sum(s.get("sent_bytes", 0) for s in stats.values()),
        }, run=live.seq)
    if failures:
        raise LeptonError(_failure_table(live, failures))
    return results


def _prepare_node(live, link, plan: Plan, first_rank: int, stats: dict) -> dict:
    out: dict = {}
    mine = stats.setdefault(link.name, {})
    root = None
    if plan.files:
        started = time.monotonic()
        link.send({"t": "sync", "run": live.id, "key": plan.key, "files": plan.files})
        answer = live.replies.get(link, ("sync_need", "sync_done"), SYNC_TIMEOUT)
        if answer.get("error"):
            raise NodeFailed("(the sync)", answer["error"])
        sent = 0
        root = answer.get("root")
        if answer["t"] == "sync_need" and answer["need"]:
            sent = _send_blobs(link, live.id, answer["need"], plan, live.replies.check)
            done = live.replies.get(link, ("sync_done",), SYNC_TIMEOUT)
            if done.get("error"):
                raise NodeFailed("(the sync)", done["error"] + " (did a file change while it was sent? run again)")
            root = done["root"]
        mine.update(mirror=root, sent_files=len(answer.get("need") or []), sent_bytes=sent,
                    seconds=round(time.monotonic() - started, 4))
        if plan.root is not None:
            out["cwd"] = root
        if plan.modules:
            out["paths"] = [f"{root}/{MODULES_DIR}"]
    if plan.requirements:
        started = time.monotonic()
        live.replies.check()  # (no install begun for a run cancelled meanwhile)
        link.send({"t": "env", "run": live.id, "requirements": plan.requirements, "rank": first_rank, "cwd": root})
        answer = live.replies.get(link, ("env_done",), INSTALL_TIMEOUT)
        if answer.get("error"):
            raise NodeFailed(answer.get("package") or "(the requirements)", answer["error"])
        mine.update(env=answer["site"], env_seconds=round(time.monotonic() - started, 4),
                    env_cached=bool(answer.get("cached")))
        out["paths"] = [answer["site"], *out.get("paths", [])]
    return out


def _send_blobs(link, run: str, need: list[str], plan: Plan, check: Callable[[], None]) -> int:
    """The blobs a node lacks, in messages of at most BATCH_BYTES; returns the bytes sent.
    ``check`` raises when the run was cancelled meanwhile."""
    parts: list = []
    buffers: list = []
    batch = sent = 0

    def flush() -> None:
        nonlocal parts, buffers, batch
        if parts:
            check()
            link.send({"t": "blobs", "run": run, "parts": parts, "_buffers": buffers})
        parts, buffers, batch = [], [], 0

    for name in need:
        source = plan.sources.get(name)
        if source is None:
            raise NodeFailed("(the sync)", f"the node asked for {name[:12]}, which this run does not have")
        with open(source, "rb") as f:
            offset = 0
            while True:
                data = f.read(BATCH_BYTES - batch)
                if data or offset == 0:  # an empty file is one empty chunk
                    parts.append([name, offset])
                    buffers.append(data)
                    batch, sent, offset = batch + len(data), sent + len(data), offset + len(data)
                if batch >= BATCH_BYTES:
                    flush()
                if not data:
                    break
    flush()
    return sent


def _failure_table(live, failures: dict[str, NodeFailed]) -> str:
    lines = [f"{len(failures)} of {len(live.nodes)} node(s) could not be made ready for {live.name}:",
             f"  {'node':<10} {'host':<18} {'package':<24} problem"]
    for link in live.nodes:
        f = failures.get(link.name)
        if f is not None:
            lines.append(f"  {link.name:<10} {str(link.host):<18} {f.what:<24} {f.why}")
    return "\n".join(lines)


# --- after a run: what rank 0 wrote, brought back ------------------------------------------------------
class _Puller:
    """Stands in for a run in the pool while a pull goes: the pool hands it the node's answers."""

    all_exited = True  # it has no ranks whose ends the pool would wait for

    def __init__(self, link, seq: int):
        self.id = f"pull-{secrets.token_hex(4)}"
        self.seq = seq
        self.nodes = [link]
        self.replies = Replies()
        self.done = threading.Event()

    def on_message(self, link, message: dict) -> None:
        if message.get("t") in REPLIES:
            self.replies.put(link, message)

    def on_node_lost(self, link, reason: str) -> None:
        pass  # Replies.get sees the link is not alive

    def cancel(self, reason: str = "") -> None:
        self.done.set()


def pull(session, run, path: str, into: str | os.PathLike | None = None) -> dict:
    """Bring the files under ``path`` of rank 0's mirror into ``into`` (default: the folder
    that was mirrored), sending only those whose hash differs from the local copy."""
    rows = session.store.query("SELECT data FROM events WHERE run=? AND kind='workdir' ORDER BY id DESC LIMIT 1",
                               (run.seq,))
    import json

    info = json.loads(rows[0]["data"]) if rows else None
    if not info or not info.get("rank0_root"):
        raise LeptonError(f"{run.name} ran without a mirrored folder (local nodes run in the notebook's folder); "
                          "there is nothing to pull")
    node = info["rank0_node"]
    pool_id = session.store.run_row(run.seq).get("pool")
    link = pool = None
    for candidate in session.pools.values():
        if candidate.closed or (pool_id and candidate.id != pool_id):
            continue
        link = next((n for n in candidate.live_nodes if n.name == node and n.alive), None)
        if link is not None:
            pool = candidate
            break
    if link is None:
        raise LeptonError(f"{node}, where rank 0 of {run.name} ran, is no longer up in this kernel; "
                          "pull before the pool is released (%lepton down, idle timeout)")
    dest = Path(into if into is not None else (info.get("root") or os.getcwd())).expanduser().resolve()
    rel = path.strip().strip("/") if path.strip() not in ("", ".", "/") else ""
    have = {}
    start = dest / rel if rel else dest
    if start.is_file():
        have[rel] = file_sha256(start)
    elif start.is_dir():
        for p in start.rglob("*"):
            if p.is_file():
                have[p.relative_to(dest).as_posix()] = file_sha256(p)
    puller = _Puller(link, run.seq)
    pool.attach_run(puller)
    written: dict[str, Path] = {}
    try:
        link.send({"t": "pull", "run": puller.id, "key": info["key"], "path": rel, "have": have})
        while True:
            message = puller.replies.get(link, ("pull_data", "pull_done"), SYNC_TIMEOUT)
            if message["t"] == "pull_done":
                break
            _write_chunk(dest, message, written)
    finally:
        pool.release_run(puller.id)
    if message.get("error"):
        for tmp in written.values():
            tmp.unlink(missing_ok=True)
        raise LeptonError(f"could not pull {path!r} from {node}: {message['error']}")
    for rel_path, tmp in written.items():
        os.replace(tmp, dest / rel_path)
    return {"files": message["files"], "bytes": message["bytes"], "unchanged": message["unchanged"],
            "into": str(dest), "node": node}


def _write_chunk(dest: Path, message: dict, written: dict[str, Path]) -> None:
    rel = message["path"]
    target = (dest / rel).resolve()
    if dest not in target.parents:
        raise LeptonError(f"the node sent a path outside {dest}: {rel!r}")
    tmp = written.get(rel)
    if tmp is None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = written[rel] = target.with_name(f".{target.name}.lepton-pull")
        with open(tmp, "wb"):
            pass
        if message.get("mode") is not None:
            os.chmod(tmp, message["mode"] | 0o200)
    with open(tmp, "r+b") as f:
        f.seek(message["offset"])
        for buffer in message.get("_buffers") or []:
            f.write(buffer)


# --- small helpers -------------------------------------------------------------------------------------
def _split_requirements(text: str | list | None) -> list[str]:
    if not text:
        return []
    if isinstance(text, (list, tuple)):
        text = "\n".join(text)
    out = []
    for line in str(text).splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        out.extend(line.split() if not line.startswith("-") else [line])
    return out


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _patterns(text: str | list | None) -> list[str]:
    if not text:
        return []
    if isinstance(text, (list, tuple)):
        return [str(t).strip() for t in text if str(t).strip()]
    return [p.strip() for p in str(text).split(",") if p.strip()]


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
