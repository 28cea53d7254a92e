"""Settings: defaults, then ``~/.config/lepton_magic/config.toml``, then ``LEPTON_*`` environment
variables, then ``%lepton config key=value`` (DESIGN.md §4). Each layer overrides the one before.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import LeptonError

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, from PyPI, before it joined the standard library
    import tomli as tomllib

BACKENDS = ("local", "ssh", "ec2", "ray")
PLANNED_BACKENDS: tuple[str, ...] = ()


def parse_duration(text: str | float | int | None) -> float | None:
    """``"90s"``, ``"30m"``, ``"2h"``, ``"1.5"`` (seconds) → seconds; ``none``/``off`` → None.
    A TOML ``true`` is not one second, and nothing lasts zero or fewer seconds."""
    if text is None:
        return None
    if isinstance(text, bool):
        raise ValueError(f"expected a duration like 90s, 30m or 2h, got {str(text).lower()}")
    if isinstance(text, (int, float)):
        if not text > 0:  # NaN too
            raise ValueError(f"expected a positive duration like 90s, 30m or 2h, got {text!r}")
        return float(text)
    raw = str(text).strip().lower()
    if raw in ("", "none", "off", "never"):
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?", raw)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"expected a duration like 90s, 30m or 2h, got {text!r}")
    scale = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return float(match.group(1)) * scale


def parse_count(text: str | int, what: str, minimum: int = 1) -> int:
    try:
        value = None if isinstance(text, (bool, float)) else int(str(text).strip())
    except ValueError:
        value = None
    if value is None or value < minimum:
        kind = "a positive whole number" if minimum >= 1 else "a whole number ≥ 0"
        raise ValueError(f"{what} takes {kind}, got {text!r}")
    return value


def parse_backend(text: str) -> str:
    name = str(text).strip().lower()
    if name in BACKENDS:
        return name
    if name in PLANNED_BACKENDS:
        raise ValueError(f"the {name} backend is not available in this version; accepted: {', '.join(BACKENDS)}")
    raise ValueError(f"unknown backend {text!r}; accepted: {', '.join(BACKENDS)}")


def _parse_bool(text: Any) -> bool:
    if isinstance(text, bool):
        return text
    raw = str(text).strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_bytes(text: Any, what: str = "a size") -> int:
    """``200MB``, ``1.5GB``, ``4096`` (bytes) → bytes."""
    raw = str(text).strip().upper().replace(" ", "").removesuffix("B").replace("I", "")
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)", raw) if not isinstance(text, bool) else None
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{what} takes a size like 200MB or 2GB, got {text!r}")
    return int(float(match.group(1)) * 1000 ** " KMGT".index(match.group(2) or " "))


class ConfigError(LeptonError, ValueError):
    """A setting in the config file or the environment is not valid."""


def _parse_hosts(text: Any) -> str:
    from .backends.ssh import parse_hosts

    parse_hosts(str(text))  # raises ValueError with the accepted form
    return str(text)


def _parse_ray_address(text: Any) -> str:
    from .backends.ray_cluster import parse_address

    return parse_address(text)


def _parse_choice(*accepted: str) -> Callable[[Any], str]:
    def parse(text: Any) -> str:
        value = str(text).strip().lower()
        if value not in accepted:
            raise ValueError(f"expected {' or '.join(accepted)}, got {text!r}")
        return value

    return parse


def _parse_policy(text: Any) -> str:
    value = str(text).strip().lower()
    if value not in ("strict", "accept-new"):
        raise ValueError(f"expected strict or accept-new, got {text!r}")
    return value


def _parse_spare(text: Any) -> str:
    value = str(text).strip().lower()
    if value in ("auto", "on", "off"):
        return value
    try:
        return "on" if _parse_bool(text) else "off"
    except ValueError:
        raise ValueError(f"expected auto, on or off, got {text!r}") from None


@dataclass(frozen=True)
class Setting:
    default: Any
    parse: Callable[[Any], Any]
    help: str


SETTINGS: dict[str, Setting] = {
    "backend": Setting("local", parse_backend, "where nodes come from: " + ", ".join(BACKENDS)),
    "nodes": Setting(1, lambda v: parse_count(v, "nodes"), "nodes per run when --nodes is not given"),
    "gpus": Setting(None, lambda v: None if str(v).lower() in ("", "none") else parse_count(v, "gpus", 0),
                    "GPUs (rank processes) per node; none = every GPU the node has"),
    "idle_timeout": Setting(1800.0, parse_duration, "release a pool's idle nodes (above its --min) after this long (off to keep them)"),
    "timeout": Setting(None, parse_duration, "default run timeout (none for no limit)"),
    "retries": Setting(0, lambda v: parse_count(v, "retries", 0),
                       "times a run starts again when it loses a node or a rank (from its last checkpoint)"),
    "max_nodes": Setting(64, lambda v: parse_count(v, "max_nodes"), "most nodes one run or pool may ask for"),
    "heartbeat_timeout": Setting(10.0, parse_duration,
                                 "a node silent this long (it beats every 2 s) is lost: hung, or its link half-open"),
    "spot_watch": Setting(False, _parse_bool,
                          "nodes poll the instance metadata for spot notices (always on for ec2 spot)"),
    "spot_metadata_url": Setting("http://169.254.169.254", str,
                                 "where nodes read spot notices (IMDSv2; tests: a local server)"),
    "preload": Setting("torch,torch._dynamo,numpy,pandas", str,
                       "modules each node imports ahead of runs (comma-separated; torch._dynamo: DDP imports it, 2.6 s)"),
    "progress": Setting(True, _parse_bool, "print the text progress line while a blocking cell runs"),
    "workdir": Setting("", str, "folder mirrored to remote nodes, where their ranks run (empty: the notebook's "
                       "current directory; none: no folder travels)"),
    "workdir_exclude": Setting(".venv/,venv/,node_modules/,__pycache__/,*.pyc,.ipynb_checkpoints/", str,
                               "patterns (.gitignore syntax, comma-separated) the mirror leaves out, besides .gitignore"),
    "workdir_max_bytes": Setting(200_000_000, lambda v: parse_bytes(v, "workdir_max_bytes"),
                                 "most bytes the working directory may hold to be mirrored (e.g. 200MB)"),
    "node_requirements": Setting("", str, "packages every run installs on its nodes (pip syntax, space-separated), "
                                 "into an environment cached per Python and requirements"),
    "retry_spare": Setting("auto", _parse_spare,
                           "keep one warm spare node while runs with --retries go, so a retry starts at once: "
                           "auto (on where nodes are free: local, ssh), on, off"),
    "ssh_hosts": Setting("", _parse_hosts, "ssh backend: user@host:port,... (node i runs on host i)"),
    "ssh_key": Setting("", str, "ssh backend: private key file (default: your SSH agent and ~/.ssh keys)"),
    "ssh_known_hosts": Setting("", str, "ssh backend: known_hosts file (default ~/.ssh/known_hosts)"),
    "ssh_host_keys": Setting("strict", _parse_policy, "ssh backend: strict, or accept-new (trust on first use)"),
    "ssh_python": Setting("python3", str, "ssh backend: the Python that runs the agent on the hosts"),
    "ec2_region": Setting("us-east-1", str, "ec2 backend: AWS region"),
    "ec2_instance_type": Setting("g5.xlarge", str, "ec2 backend: instance type"),
    "ec2_fallback_types": Setting("", str, "ec2 backend: types to try when AWS has no capacity (comma-separated)"),
    "ec2_spot": Setting(False, _parse_bool, "ec2 backend: spot instances"),
    "ec2_ami": Setting("", str, "ec2 backend: AMI (default: the Deep Learning AMI via SSM)"),
    "ec2_ssh_user": Setting("ubuntu", str, "ec2 backend: SSH user of the AMI"),
    "ec2_ssh_cidr": Setting("", str, "ec2 backend: who may SSH in (default: this machine's public /32)"),
    "ec2_endpoint_url": Setting("", str, "ec2 backend: AWS endpoint (tests: a moto server)"),
    "ec2_ssh_target": Setting("", str, "ec2 backend: reach every instance at this host:port, or instance i at "
                              "the i-th of host:port,host:port (tests)"),
    "ec2_ssh_wait": Setting(300.0, parse_duration, "ec2 backend: how long a new instance may take to answer SSH "
                            "(then every instance of its request is terminated)"),
    "ec2_s3_bucket": Setting("", str, "ec2 backend: bucket for large inputs/outputs (default lepton-magic-ACCOUNT-REGION)"),
    "ray_address": Setting("auto", _parse_ray_address,
                           "ray backend: auto, local (a throwaway cluster), HOST:6379 or ray://HOST:10001"),
    "ray_strategy": Setting("spread", _parse_choice("spread", "pack"),
                            "ray backend: spread (one node per machine when it can) or pack"),
    "ray_cpus_per_node": Setting(1, lambda v: parse_count(v, "ray_cpus_per_node"),
                                 "ray backend: CPUs each node reserves on the cluster"),
    "ray_placement_timeout": Setting(60.0, parse_duration,
                                     "ray backend: give up when Ray has not placed the nodes by then"),
    "ec2_s3_threshold": Setting(8 << 20, lambda v: parse_count(v, "ec2_s3_threshold"),
                                "ec2 backend: values from this many bytes travel through S3"),
}


def config_file() -> Path:
    explicit = os.environ.get("LEPTON_CONFIG")
    if explicit:
        return Path(explicit)
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "lepton_magic" / "config.toml"


@dataclass
class Config:
    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    @classmethod
    def defaults(cls) -> "Config":
        return cls({k: s.default for k, s in SETTINGS.items()}, {k: "default" for k in SETTINGS})

    @classmethod
    def load(cls) -> "Config":
        """Defaults, then the file, then the environment. A bad value raises a ValueError (a
        LeptonError) that names where it came from."""
        config = cls.defaults()
        path = config_file()
        if path.exists():
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{path} is not valid TOML: {e}") from None
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}): TOML files are UTF-8") from None
            except OSError as e:
                raise ConfigError(f"{path} cannot be read: {e.strerror or e}") from None
            for key, value in data.items():
                config._set_from(key, value, str(path))
        for key in SETTINGS:
            env = os.environ.get("LEPTON_" + key.upper())
            if env is not None:
                config._set_from(key, env, "LEPTON_" + key.upper())
        return config

    def _set_from(self, key: str, value: Any, source: str) -> None:
        try:
            self.set(key, value, source=source)
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None

    def set(self, key: str, value: Any, source: str = "%lepton config") -> None:
        name = key.strip().replace("-", "_")
        if name not in SETTINGS:
            raise ValueError(f"unknown setting {key!r}; accepted: {', '.join(SETTINGS)}")
        try:
            self.values[name] = SETTINGS[name].parse(value)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        self.sources[name] = source

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def rows(self) -> list[dict]:
        return [
            {"key": k, "value": self.values[k], "source": self.sources[k], "help": SETTINGS[k].help}
            for k in SETTINGS
        ]
