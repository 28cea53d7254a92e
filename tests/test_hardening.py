"""Shared machines, the smaller items: ranks listen on loopback only, hung nodes are noticed,
bounds on --nodes, settings files that are wrong in odd ways, what dead kernels leave behind."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

import lepton_magic as lm


def test_local_ranks_listen_on_loopback_only(ip, run_cell):
    """Regression: the torch rendezvous (and gloo) of a local run listened on every interface
    (`::`, or the machine's address) for the length of the run."""
    result, out = run_cell(
        "%%lepton --nodes 2\n"
        "import ipaddress, psutil\n"
        "dist = lepton.init_distributed()\n"
        "me = psutil.Process()\n"
        "mine = [c.laddr.ip for c in me.net_connections('tcp') if c.status == 'LISTEN']\n"
        "dist.barrier()\n"
        "gathered = [None] * lepton.world_size\n"
        "dist.all_gather_object(gathered, mine)\n"
        "listening = gathered\n"
    )
    assert result.success, out
    listening = ip.user_ns["listening"]
    assert listening[0], "rank 0 listens nowhere?"
    for rank, addresses in enumerate(listening):
        assert all(a.startswith("127.") or a == "::1" for a in addresses), (rank, addresses)
