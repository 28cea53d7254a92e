"""Where nodes come from. A backend only (a) provides nodes and (b) starts
``python -m lepton_magic.agent`` on each with a byte pipe to it; the rest is shared."""

from .base import Backend, NodeLink


def create(name: str, settings: dict) -> Backend:
    if name == "local":
        from .local import LocalBackend

        return LocalBackend(settings)
    if name == "ssh":
        from .ssh import SSHBackend

        return SSHBackend(settings)
    if name == "ec2":
        from .ec2 import Ec2Backend

        return Ec2Backend(settings)
    if name == "ray":
        from .ray import RayBackend

        return RayBackend(settings)
    raise ValueError(f"unknown backend {name!r}")


def ranks_elsewhere(name: str) -> bool:
    """The backend's ranks do not run in the notebook's folder (every backend but local's): the
    folder is mirrored to them (workdir.py). Known by name: a detached run has no pool here."""
    return name != "local"


__all__ = ["Backend", "NodeLink", "create", "ranks_elsewhere"]
