"""``lepton-magic``: the few things worth doing outside a notebook."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lepton-magic")
    sub = parser.add_subparsers(dest="command", required=True)
    gc = sub.add_parser("gc", help="find (and with --yes terminate) EC2 instances no live pool owns")
    gc.add_argument("--yes", action="store_true", help="terminate them (otherwise only list)")
    sub.add_parser("runs", help="list the runs in the store")
    args = parser.parse_args(argv)
    from .errors import LeptonError
    from .session import Session

    try:
        session = Session()
        if args.command == "runs":
            print(session.runs().to_string())
            return 0
        orphans = session.gc(terminate=args.yes)
    except LeptonError as e:
        print(f"lepton-magic: {e}", file=sys.stderr)
        return 2
    if not orphans:
        print("no instance of this tool is running without a pool")
        return 0
    for o in orphans:
        print(f"{o['id']}  {o['type']:<14} pool {o['pool']}  owner {o['owner']}  launched {o['launched']}")
    print(f"{len(orphans)} instance(s) " + ("terminated" if args.yes else "found; run with --yes to terminate them"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
