"""``lepton-magic``: the few things worth doing outside a notebook."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lepton-magic")
    sub = parser.add_subparsers(dest="command", required=True)
    gc = sub.add_parser("gc", help="list the EC2 instances this tool launched, what gc would do to each and why; "
                                   "--yes terminates yours whose pool is alive nowhere")
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
        rows = session.gc(terminate=args.yes)
    except LeptonError as e:
        print(f"lepton-magic: {e}", file=sys.stderr)
        return 2
    from .aws import gc as aws_gc

    for line in aws_gc.lines(rows):
        print(line)
    print(aws_gc.summary(rows, acted=args.yes, how_to_act="run lepton-magic gc --yes"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
