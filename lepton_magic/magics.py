"""``%%lepton`` and ``%lepton``: argument parsing and display only; the work is in Session.

One parser per (sub)command, built with IPython's ``magic_arguments``. Every mistake in what was
typed becomes a ``UsageError`` with one line saying what was wrong and what is accepted.
"""

from __future__ import annotations

import argparse
import copy
import shlex

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from . import cellcode
from .config import BACKENDS, parse_backend, parse_count, parse_duration
from .errors import LeptonError, RemoteError
from .run import Run
from .session import Session
from .ui import live
from .ui.progress import TextProgress

SUBCOMMANDS = ("up", "down", "status", "runs", "wait", "cancel", "logs", "attach", "config", "cost", "gc", "pull")


def _arg_type(parse, *extra):
    def convert(text):
        try:
            return parse(text, *extra)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


_nodes = _arg_type(parse_count, "--nodes")
_gpus = _arg_type(parse_count, "--gpus", 0)
_duration = _arg_type(parse_duration)
_backend = _arg_type(parse_backend)


def _names(option):
    return _arg_type(cellcode.parse_name_list, option)


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not key.strip().replace("_", "a").isalnum():
        raise argparse.ArgumentTypeError(f"--env takes KEY=VALUE (like OMP_NUM_THREADS=1), got {text!r}")
    return key.strip(), value


# --- parsers: one per magic -----------------------------------------------------------------
@magic_arguments()
@argument("--nodes", "-n", type=_nodes, default=None, help="nodes to run on (default: the nodes setting, 1)")
@argument("--gpus", "-g", type=_gpus, default=None, help="GPUs (one rank each) per node; CPU-only nodes run 1 rank")
@argument("--backend", "-b", type=_backend, default=None, help=f"where nodes come from: {', '.join(BACKENDS)}")
@argument("--name", default=None, help="a name for the run (default run-N)")
@argument("--in", dest="inputs", type=_names("--in"), default=None,
          help="comma-separated variables to send (default: the free names the cell reads)")
@argument("--out", dest="outputs", type=_names("--out"), default=None,
          help="comma-separated variables to bring back (default: every name the cell assigns)")
@argument("--async", dest="background", action="store_true", help="return at once; outputs bind when the run ends")
@argument("--detach", action="store_true",
          help="the run goes on when this kernel dies or restarts; %%lepton attach RUN follows it from any kernel")
@argument("--timeout", type=_duration, default=None, help="cancel the run after this long: 90s, 30m, 2h")
@argument("--env", type=_env_pair, action="append", default=[], help="KEY=VALUE set on every rank (repeatable)")
@argument("--retries", type=_arg_type(parse_count, "--retries", 0), default=None,
          help="start again on healthy nodes when a node or a rank is lost, up to N times (from the last checkpoint)")
@argument("--retry-on-error", action="store_true", help="retry when the cell itself raises, too")
@argument("--instance-type", default=None, help="ec2: the instance type of a new pool (e.g. g5.xlarge)")
@argument("--workdir", default=None,
          help="folder mirrored to remote nodes, where their ranks run (default: the current directory; none: no folder)")
@argument("--pip", default=None, help='packages installed on each node, cached: --pip "pkg==1.2 other"')
@argument("--sweep", default=None,
          help='a hyper-parameter sweep: "lr=[1e-3,1e-2]; width=choice(64,128); p=uniform(0,0.5)"')
@argument("--trials", type=_arg_type(parse_count, "--trials"), default=None,
          help="sweep: how many trials (a grid's size by default)")
@argument("--objective", default=None, help='sweep: "min val_loss" or "max acc" (default: min of the first metric)')
@argument("--sampler", default=None, help="sweep: tpe, random or grid")
@argument("--seed", type=_arg_type(parse_count, "--seed", 0), default=None, help="sweep: the sampler's seed")
@argument("--parallel", type=_arg_type(parse_count, "--parallel"), default=None,
          help="sweep: trials at once (default: the nodes ÷ nodes per trial)")
@argument("--nodes-per-trial", type=_arg_type(parse_count, "--nodes-per-trial"), default=None,
          help="sweep: nodes of each trial's world (default 1)")
@argument("--prune", default=None, help="sweep: median, asha or none")
@argument("--study", default=None, help="sweep: keep the study under this name; a later sweep continues it")
@argument("--fail-fast", action="store_true", help="sweep: stop at the first failed trial")
def _cell_args(line, cell):
    """%%lepton [options]: run this cell on N nodes as a torch.distributed job."""


@magic_arguments()
@argument("--backend", "-b", type=_backend, default=None)
@argument("--nodes", "-n", type=_nodes, default=None, help="nodes to start")
@argument("--min", dest="min_nodes", type=_arg_type(parse_count, "--min", 0), default=None,
          help="nodes to keep warm (0: every idle node goes)")
@argument("--max", dest="max_nodes", type=_arg_type(parse_count, "--max"), default=None,
          help="most nodes the pool may grow to")
@argument("--gpus", "-g", type=_gpus, default=None)
@argument("--idle-timeout", type=_duration, default=None,
          help="release a node above --min after this long idle")
@argument("--instance-type", default=None, help="ec2: instance type (e.g. g5.xlarge)")
@argument("--spot", action="store_true", help="ec2: spot instances")
@argument("--region", default=None, help="ec2: AWS region")
@argument("--address", default=None,
          help="ray: auto, local (a throwaway cluster), HOST:6379 or ray://HOST:10001")
def _up_args(line):
    """%lepton up: start (or grow) the pool of warm nodes."""


@magic_arguments()
@argument("--yes", action="store_true", help="terminate what was found (without it, only list)")
def _gc_args(line):
    """%lepton gc [--yes]: EC2 instances and security groups of this tool that no live pool owns."""


@magic_arguments()
@argument("run", help="run name or id")
@argument("--timeout", type=_duration, default=None)
def _wait_args(line):
    """%lepton wait RUN: block until the run ends."""


@magic_arguments()
@argument("run", help="run name or id")
def _cancel_args(line):
    """%lepton cancel RUN: stop every rank of the run."""


@magic_arguments()
@argument("run", help="run name or id")
@argument("--rank", "-r", type=_arg_type(parse_count, "--rank", 0), default=None)
def _logs_args(line):
    """%lepton logs RUN [--rank R]: what the ranks printed."""


@magic_arguments()
@argument("run", help="run name or id")
def _attach_args(line):
    """%lepton attach RUN: follow the run (live while it runs, also after a kernel restart, from any
    kernel); its outputs bind into this notebook when it ends."""


@magic_arguments()
@argument("run", help="run name or id")
@argument("path", nargs="?", default=".", help="file or folder in rank 0's mirror (default: all)")
def _pull_args(line):
    """%lepton pull RUN PATH: bring back what rank 0 wrote into its mirror (only files that differ)."""


@magic_arguments()
@argument("--backend", "-b", type=_backend, default=None)
def _down_args(line):
    """%lepton down: release every node of the pool."""


_cell_args.parser.prog = "%%lepton"
for _sub, _func in (("up", _up_args), ("down", _down_args), ("wait", _wait_args), ("cancel", _cancel_args),
                    ("logs", _logs_args), ("attach", _attach_args), ("gc", _gc_args), ("pull", _pull_args)):
    _func.parser.prog = f"%lepton {_sub}"


def _parse(parser_func, line: str):
    try:
        return parse_argstring(parser_func, line)
    except SystemExit:  # -h/--help printed the usage; argparse then wants to exit
        return None
    except ValueError as e:  # unbalanced quotes in the line
        raise UsageError(f"cannot read the options: {e}") from None
    except UsageError as e:
        if "unrecognized arguments" in str(e) or "the following arguments" in str(e):
            parser = parser_func.parser
            options = [a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"]
            positionals = [a.dest.upper() for a in parser._actions if not a.option_strings]
            accepted = " ".join(positionals + options)
            raise UsageError(f"{e}; {parser.prog} accepts: {accepted}") from None
        raise


_cell_lines: dict[str, argparse.Namespace] = {}


def _parse_cell_line(line: str) -> argparse.Namespace | None:
    """The %%lepton line's options; a line seen before is not parsed again (a notebook runs the
    same few lines over and over: argparse is a tenth of a short cell's time in the kernel)."""
    known = _cell_lines.get(line)
    if known is None:
        known = _parse(_cell_args, line)
        if known is None:
            return None
        if len(_cell_lines) < 256:
            _cell_lines[line] = known
    return copy.deepcopy(known)


SWEEP_OPTIONS = ("trials", "objective", "sampler", "seed", "parallel", "nodes_per_trial", "prune", "study", "fail_fast")


def _sweep_spec(args):
    """The sweep options read and checked together (before any node is used); None without --sweep."""
    given = [name for name in SWEEP_OPTIONS if getattr(args, name) not in (None, False)]
    if args.sweep is None:
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} goes with --sweep")
        return None
    if args.nodes and args.nodes_per_trial and args.nodes < args.nodes_per_trial:
        raise UsageError(f"--nodes {args.nodes} is fewer than --nodes-per-trial {args.nodes_per_trial}")
    from .sweeps.space import make_spec

    return make_spec(_unquoted(args.sweep), trials=args.trials, sampler=_unquoted(args.sampler),
                     objective=_unquoted(args.objective), seed=args.seed, parallel=args.parallel,
                     nodes_per_trial=args.nodes_per_trial, prune=_unquoted(args.prune), study=_unquoted(args.study),
                     fail_fast=args.fail_fast)


def _unquoted(text: str | None) -> str | None:
    """IPython's magic argument splitter keeps the quotes around a quoted value."""
    if text is not None and len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _travel(args) -> dict:
    """--workdir and --pip, passed on only when given (Session.submit has its own defaults)."""
    return {k: _unquoted(v) for k, v in (("workdir", args.workdir), ("pip", args.pip)) if v is not None}


def _no_options(command: str, rest: str) -> None:
    if rest.strip():
        raise UsageError(f"{command} takes no options")


async def _nothing():
    return None


@magics_class
class LeptonMagics(Magics):
    def __init__(self, shell, session: Session):
        super().__init__(shell)
        self.session = session

    @cell_magic
    def lepton_await(self, line: str, cell: str):
        """What a notebook runs for a %%lepton cell: the same, awaited (see ui.live)."""
        run = self._submit(line, cell)
        if run is None:
            return _nothing()
        return self._follow_awaiting(run)

    async def _follow_awaiting(self, run: Run):
        await live.follow_awaiting(run)
        self.session.bind_pending(run.seq)
        if run.status == "failed" and run.error is not None:
            raise run.error

    @line_cell_magic
    def lepton(self, line: str, cell: str | None = None):
        """Run a cell on remote nodes (%%lepton), or manage pools and runs (%lepton up|down|...)."""
        if cell is not None:
            return self._run_cell(line, cell)
        try:
            return self._subcommand(line)
        except RemoteError:
            raise
        except LeptonError as e:
            raise UsageError(str(e)) from None

    # --- %%lepton --------------------------------------------------------------------------
    def _run_cell(self, line: str, cell: str):
        run = self._submit(line, cell)
        return None if run is None else self._follow(run)

    def _submit(self, line: str, cell: str) -> Run | None:
        """Start the run; None when there is nothing to wait for (help printed, or --async)."""
        args = _parse_cell_line(line)
        if args is None:
            return None
        if not cell.strip():
            raise UsageError("the cell is empty: write the code to run under the %%lepton line")
        backend = args.backend or self.session.config["backend"]
        if args.instance_type and backend != "ec2":
            raise UsageError("--instance-type goes with --backend ec2")
        try:
            sweep = _sweep_spec(args)
            if args.instance_type:
                cellcode.check_syntax(cell)  # before any instance is launched
                self.session.up(backend, args.nodes, ec2_instance_type=args.instance_type)
            run = self.session.submit(
                cell, self.shell.user_ns, nodes=args.nodes, gpus=args.gpus, backend=args.backend,
                name=args.name, inputs=args.inputs, outputs=args.outputs, timeout=args.timeout,
                env=dict(args.env), retries=args.retries, retry_on_error=args.retry_on_error,
                detach=args.detach, sweep=sweep, **_travel(args),
            )
        except (cellcode.CellSyntaxError, LeptonError) as e:
            raise UsageError(str(e)) from None
        if args.detach:
            print(f"{run.name} detached: it goes on if this kernel stops · %lepton attach {run.name} "
                  f"follows it from any kernel, %lepton cancel {run.name} stops it")
        if args.background:
            if run.status == "queued":
                print(f"{run.name} is queued: every node the pool may hold is busy; it starts when enough "
                      f"are free · %lepton wait {run.name}, %lepton cancel {run.name}")
            elif not args.detach:
                print(f"{run.name} started on {len(run.nodes)} node(s) in the background · "
                      f"lm.get_run({run.name!r}).wait() or %lepton wait {run.name}")
            live.follow_in_background(run, self.shell)
            return None
        return run

    def _follow(self, run: Run):
        """Show the run until it ends (panel or text); Ctrl-C cancels it."""
        live.follow_blocking(run, status_line=self.session.config["progress"])
        self.session.bind_pending(run.seq)
        if run.status == "failed" and run.error is not None:
            raise run.error
        return None

    # --- %lepton ... -------------------------------------------------------------------------
    def _subcommand(self, line: str):
        words = line.strip().split(None, 1)
        if not words:
            raise UsageError(f"%lepton needs a subcommand; accepted: {', '.join(SUBCOMMANDS)}")
        command, rest = words[0], (words[1] if len(words) > 1 else "")
        handler = getattr(self, f"_cmd_{command}", None)
        if command not in SUBCOMMANDS or handler is None:
            raise UsageError(f"unknown subcommand {command!r}; accepted: {', '.join(SUBCOMMANDS)}")
        return handler(rest)

    def _cmd_up(self, rest: str):
        args = _parse(_up_args, rest)
        if args is None:
            return None
        if args.nodes and (args.min_nodes is not None or args.max_nodes):
            raise UsageError("give either --nodes N or --min N --max M, not both")
        if args.min_nodes is not None and args.max_nodes and args.min_nodes > args.max_nodes:
            raise UsageError(f"--min {args.min_nodes} is more than --max {args.max_nodes}")
        nodes = args.nodes or args.min_nodes
        ec2 = {"ec2_instance_type": args.instance_type, "ec2_spot": True if args.spot else None,
               "ec2_region": args.region}
        if any(v is not None for v in ec2.values()) and (args.backend or self.session.config["backend"]) != "ec2":
            raise UsageError("--instance-type, --spot and --region go with --backend ec2")
        if args.address is not None and (args.backend or self.session.config["backend"]) != "ray":
            raise UsageError("--address goes with --backend ray")
        pool = self.session.up(args.backend, nodes, idle_timeout=args.idle_timeout, min_nodes=args.min_nodes,
                               max_nodes=args.max_nodes, gpus=args.gpus, ray_address=args.address, **ec2)
        idle = pool.settings.get("idle_timeout")
        size = f" · {pool.limits}" if pool.limits else ""
        kept = f"nodes above {pool.min_nodes} " if pool.min_nodes else ""
        print(f"pool {pool.id} up: {len(pool.live_nodes)} {pool.backend_name} node(s){size}"
              + (f" · {kept}released after {idle:g} s idle" if idle else ""))
        return None

    def _cmd_down(self, rest: str):
        args = _parse(_down_args, rest)
        if args is None:
            return None
        stopped = self.session.down(args.backend)
        print(f"released {stopped} node(s)" if stopped else "no pool is up")

    def _cmd_status(self, rest: str):
        _no_options("%lepton status", rest)
        return live.show_pool(self.session, self.shell)

    def _cmd_runs(self, rest: str):
        _no_options("%lepton runs", rest)
        return self.session.runs()

    def _cmd_wait(self, rest: str):
        args = _parse(_wait_args, rest)
        if args is None:
            return None
        run = self.session.get_run(args.run)
        if run.is_live and args.timeout is None:
            return self._follow(run)
        try:
            run.wait(args.timeout)
        except TimeoutError as e:
            raise UsageError(str(e)) from None
        print(TextProgress(run).summary_text())

    def _cmd_cancel(self, rest: str):
        args = _parse(_cancel_args, rest)
        if args is None:
            return None
        run = self.session.get_run(args.run)
        run.cancel()
        print(f"cancelling {run.name}")

    def _cmd_cost(self, rest: str):
        _no_options("%lepton cost", rest)
        return self.session.cost()

    def _cmd_gc(self, rest: str):
        args = _parse(_gc_args, rest)
        if args is None:
            return None
        rows = self.session.gc(terminate=args.yes)
        from .aws import gc as aws_gc

        print(aws_gc.summary(rows, acted=args.yes, how_to_act="run %lepton gc --yes"))
        if not rows:
            return None
        import pandas as pd

        return pd.DataFrame(rows)

    def _cmd_attach(self, rest: str):
        args = _parse(_attach_args, rest)
        if args is None:
            return None
        run = self.session.get_run(args.run)
        if not run.is_live:  # a run of another process: its outputs bind here when it ends
            self.session.bind_when_done(run, self.shell.user_ns)
        live.show(run, self.shell)
        if run.done:
            self.session.bind_pending(run.seq)

    def _cmd_pull(self, rest: str):
        args = _parse(_pull_args, rest)
        if args is None:
            return None
        done = self.session.get_run(args.run).pull(args.path)
        print(f"pulled {done['files']} file(s), {done['bytes']} bytes from {done['node']} into {done['into']}"
              f" ({done['unchanged']} unchanged)")

    def _cmd_logs(self, rest: str):
        args = _parse(_logs_args, rest)
        if args is None:
            return None
        print(self.session.get_run(args.run).logs(args.rank))

    def _cmd_config(self, rest: str):
        try:
            pairs = shlex.split(rest)
        except ValueError as e:
            raise UsageError(f"cannot read the settings: {e}") from None
        if not pairs:
            import pandas as pd

            return pd.DataFrame(self.session.config.rows()).set_index("key")
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise UsageError(f"%lepton config takes key=value pairs, got {pair!r}")
            try:
                self.session.config.set(key, value)
            except ValueError as e:
                raise UsageError(str(e)) from None
        print(", ".join(f"{p.partition('=')[0].strip()} = {self.session.config[p.partition('=')[0].strip().replace('-', '_')]!r}"
                        for p in pairs))
