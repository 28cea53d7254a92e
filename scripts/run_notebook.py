#!/usr/bin/env python3
"""Run a notebook headless and print its result table.

    python scripts/run_notebook.py notebooks/01-quickstart.ipynb [--output executed.ipynb]

The notebook runs top to bottom in a fresh ``python3`` kernel whose working directory is the
notebook's folder (timeout 600 s per cell). If a cell raises, the error is printed and the exit
status is 1. Otherwise the text/plain output of the last cell that has one (for the quickstart:
its result DataFrame) is printed. The notebook file itself is left untouched unless ``--output``
names where to save the executed copy (it may be the notebook itself).

LEPTON_HOME is passed through as it is: runs go to the usual store unless it is set.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

CELL_TIMEOUT = 600
KERNEL = "python3"


def execute(path: Path) -> nbformat.NotebookNode:
    """Execute the notebook at ``path`` in place in memory; raises on the first failing cell."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(path.parent)}},
        coalesce_streams=True,  # merge the stream pieces and apply \r, as a notebook frontend shows them
    )
    client.execute()
    return nb


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def result_text(nb: nbformat.NotebookNode) -> str | None:
    """The text/plain output(s) of the last code cell that has any, or None."""
    for cell in reversed(nb.cells):
        if cell.cell_type != "code":
            continue
        texts = [_text(out["data"]["text/plain"]) for out in cell.get("outputs", [])
                 if out.get("output_type") in ("execute_result", "display_data")
                 and "text/plain" in out.get("data", {})]
        if texts:
            return "\n".join(texts)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", type=Path, help="the .ipynb file to run")
    parser.add_argument("--output", "-o", type=Path, default=None,
                        help="also save the executed notebook here (may be the notebook itself)")
    args = parser.parse_args(argv)

    path = args.notebook.resolve()
    if not path.is_file():
        print(f"run_notebook: no notebook at {args.notebook}", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        nb = execute(path)
    except CellExecutionError as e:
        print(f"run_notebook: {args.notebook} failed:\n{e}", file=sys.stderr)
        return 1
    except (CellTimeoutError, DeadKernelError) as e:
        print(f"run_notebook: {args.notebook} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    took = time.monotonic() - started
    if args.output is not None:
        nbformat.write(nb, args.output)

    text = result_text(nb)
    print(f"{args.notebook}: ran {sum(c.cell_type == 'code' for c in nb.cells)} code cells in {took:.1f} s")
    if text is None:
        print("(no cell produced a text/plain result)")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
