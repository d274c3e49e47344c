"""Several hosts on one machine: a Linux network namespace per host, each with its own address
on a private bridge, its own hostname (a UTS namespace) and its own ``/etc/hosts``.

Everything is named after the run's prefix (``mofi-c``: bridge ``mofi-c-br``, namespaces
``mofi-c-head``, ...), so :func:`cleanup` can remove what an earlier, interrupted run left
behind before a new one starts, and a trap removes what this one made. Needs root (these
machines and CI run as root).

The hosts share the machine's filesystem (the installed software, like one image on every
host); what each one writes goes to its own working folder, and the run shows that no host
reads another's (see ``run``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import time

PREFIX = "mofi-c"
SUBNET = "10.231.7"  # a private /24 that only this run uses
UTS_DIR = "/run/mofi-cluster/uts"
NETNS_ETC = "/etc/netns"


class HostError(RuntimeError):
    pass


def sh(*argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, input=input)
    if check and proc.returncode != 0:
        raise HostError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@dataclasses.dataclass(frozen=True)
class Host:
    """One host: its name (also its hostname), address and working folder."""

    name: str
    address: str
    work: str
    prefix: str = PREFIX

    @property
    def netns(self) -> str:
        return f"{self.prefix}-{self.name}"

    @property
    def tmp(self) -> str:
        """The host's temporary folder: short, as Unix socket paths must be (multiprocessing
        puts its sockets there); removed by :func:`cleanup`."""
        return f"/tmp/{self.netns}"

    @property
    def uts(self) -> str:
        return os.path.join(UTS_DIR, self.netns)

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` run on this host: its network namespace (``ip netns exec`` also binds
        ``/etc/netns/NS/hosts`` over ``/etc/hosts``) and its hostname."""
        return ["ip", "netns", "exec", self.netns, "nsenter", f"--uts={self.uts}", "--", *argv]

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(argv), **kw)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(argv), **kw)

    def pids(self) -> list[int]:
        """Every process in this host's network namespace."""
        out = sh("ip", "netns", "pids", self.netns, check=False).stdout
        return sorted(int(p) for p in out.split() if p.strip().isdigit())

    def send_signal(self, sig: int, pids: list[int] | None = None) -> list[int]:
        """Send ``sig`` to ``pids`` (default: every process of this host now); those pids."""
        pids = self.pids() if pids is None else pids
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def kill_all(self, sig: int = signal.SIGKILL, wait_s: float = 20.0) -> list[int]:
        """Kill every process of this host; the pids killed. Raises when any survives."""
        killed: list[int] = []
        deadline = time.time() + wait_s
        while True:
            pids = self.send_signal(sig)
            if not pids:
                return killed
            killed += [pid for pid in pids if pid not in killed]
            if time.time() > deadline:
                raise HostError(f"{self.name}: processes {pids} survive {sig!r}")
            time.sleep(0.2)


def make_hosts(names: list[str], root: str, prefix: str = PREFIX) -> list[Host]:
    return [
        Host(name, f"{SUBNET}.{10 + i}", os.path.join(root, "hosts", name), prefix)
        for i, name in enumerate(names)
    ]


def up(hosts: list[Host], aliases: dict[str, list[str]]) -> None:
    """Bridge, a veth pair and a namespace per host, addresses, hostnames and each host's
    ``/etc/hosts`` (every host's name and the service ``aliases`` of each)."""
    prefix = hosts[0].prefix
    bridge = f"{prefix}-br"
    sh("ip", "link", "add", bridge, "type", "bridge")
    sh("ip", "addr", "add", f"{SUBNET}.1/24", "dev", bridge)
    sh("ip", "link", "set", bridge, "up")
    os.makedirs(UTS_DIR, exist_ok=True)
    lines = ["127.0.0.1 localhost"]
    for h in hosts:
        lines.append(" ".join([h.address, h.name, *aliases.get(h.name, [])]))
    for i, h in enumerate(hosts):
        os.makedirs(h.work, exist_ok=True)
        os.makedirs(h.tmp, exist_ok=True)
        sh("ip", "netns", "add", h.netns)
        a, b = f"{prefix}-v{i}a", f"{prefix}-v{i}b"
        sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        sh("ip", "link", "set", a, "master", bridge)
        sh("ip", "link", "set", a, "up")
        sh("ip", "link", "set", b, "netns", h.netns)
        sh("ip", "netns", "exec", h.netns, "ip", "link", "set", "lo", "up")
        sh("ip", "netns", "exec", h.netns, "ip", "link", "set", b, "name", "eth0")
        sh("ip", "netns", "exec", h.netns, "ip", "addr", "add", f"{h.address}/24", "dev", "eth0")
        sh("ip", "netns", "exec", h.netns, "ip", "link", "set", "eth0", "up")
        sh("ip", "netns", "exec", h.netns, "ip", "route", "add", "default", "via", f"{SUBNET}.1")
        etc = os.path.join(NETNS_ETC, h.netns)
        os.makedirs(etc, exist_ok=True)
        with open(os.path.join(etc, "hosts"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(h.uts, "w"):
            pass
        sh("unshare", f"--uts={h.uts}", "hostname", h.name)


def pg_dir(prefix: str = PREFIX) -> str:
    """The head's Postgres files (a folder the postgres user can enter)."""
    return f"/var/tmp/{prefix}-postgres"


def cleanup(prefix: str = PREFIX) -> list[str]:
    """Kill every process in the run's namespaces, remove them, their veths, the bridge,
    the hostnames and the hosts files; what was removed. Safe to call any time."""
    removed = []
    listing = sh("ip", "netns", "list", check=False).stdout.split("\n")
    for ns in [line.split()[0] for line in listing if line.strip()]:
        if not ns.startswith(prefix + "-"):
            continue
        pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        deadline = time.time() + 15
        while sh("ip", "netns", "pids", ns, check=False).stdout.strip() and time.time() < deadline:
            time.sleep(0.2)
        sh("ip", "netns", "del", ns, check=False)
        removed.append(ns)
        shutil.rmtree(f"/tmp/{ns}", ignore_errors=True)
        uts = os.path.join(UTS_DIR, ns)
        if os.path.exists(uts):
            sh("umount", uts, check=False)
            with contextlib.suppress(OSError):
                os.remove(uts)
        etc = os.path.join(NETNS_ETC, ns)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(etc, "hosts"))
        with contextlib.suppress(OSError):
            os.rmdir(etc)
    if os.path.isdir(pg_dir(prefix)):
        shutil.rmtree(pg_dir(prefix), ignore_errors=True)
        removed.append(pg_dir(prefix))
    links = sh("ip", "-o", "link", "show", check=False).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith(prefix + "-"):
            sh("ip", "link", "del", name, check=False)
            removed.append(name)
    return removed
