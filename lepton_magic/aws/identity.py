"""Who is acting in the account: the AWS account (from STS, never guessed), and this machine's
user, under names that do not collide with other machines' (key pairs, owner tags)."""

from __future__ import annotations

import getpass
import hashlib
import re
import socket
from pathlib import Path

from ..errors import LeptonError

TAG_POOL = "lepton:pool"
TAG_OWNER = "lepton:owner"
#: Epoch seconds, refreshed by the kernel that owns the pool while it lives (see gc.py).
TAG_HEARTBEAT = "lepton:heartbeat"
#: On key pairs: which private-key holder created the pair (only that holder may replace it).
TAG_KEY_HOLDER = "lepton:key-holder"


def owner() -> str:
    """``user@host``: the owner tag of everything this machine's user launches."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


def _machine_id() -> str:
    try:
        return Path("/etc/machine-id").read_text().strip()
    except OSError:
        return ""


def key_holder(key_dir: Path | str) -> str:
    """A short hash naming where a private key lives: this user, this machine, this folder.
    Two machines (or two LEPTON_HOMEs) never share one, so none replaces another's key pair."""
    text = "\0".join([getpass.getuser(), socket.gethostname(), _machine_id(), str(Path(key_dir).resolve())])
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def key_pair_name(region: str, key_dir: Path | str) -> str:
    user = re.sub(r"[^A-Za-z0-9_.-]", "-", getpass.getuser())[:32]
    return f"lepton-{user}-{key_holder(key_dir)}-{region}"


def account_id(sts) -> str:
    """The account id from STS. Buckets are named after it and S3 calls expect it as the owner:
    without it there is no safe default, so this fails instead of guessing."""
    try:
        return sts.get_caller_identity()["Account"]
    except Exception as e:
        raise LeptonError(f"cannot read your AWS account id (STS GetCallerIdentity failed: {e}); "
                          "the ec2 backend needs working AWS credentials (aws configure, or AWS_PROFILE)") from None
