"""`mofi train`: check everything that can fail before compute, then launch torchrun.

The resolved config is saved to ``OUT/train.request.json`` and passed to every process with
``--config-file``, so all ranks (and all nodes) train with byte-identical settings.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from typing import Any

from .config import TrainConfig
from .core import storage
from .core.config import ConfigError
from .core.lease import Lease
from .core.process import die_with_parent
from .layout import REQUEST_FILE, TrainLayout
from .plan import preflight

log = logging.getLogger(__name__)


def _local_addresses() -> set[str]:
    names = {"localhost", "127.0.0.1", "::1", "0.0.0.0", socket.gethostname()}
    try:
        names.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    return names


def check_rendezvous(endpoint: str, wait_s: float | None = None, timeout_s: float = 5.0) -> None:
    """A remote HOST:PORT must resolve and accept a TCP connection within ``wait_s`` (default
    ``MOFI_RDZV_WAIT_S``, 300 s: the node that hosts it may start a little later, the nodes'
    tasks start independently); a local one is hosted here."""
    if wait_s is None:
        wait_s = float(os.environ.get("MOFI_RDZV_WAIT_S", "300"))
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"rendezvous endpoint {endpoint!r} is not HOST:PORT")
    try:
        addrs = {a[4][0] for a in socket.getaddrinfo(host, int(port), proto=socket.IPPROTO_TCP)}
    except OSError as exc:
        raise ConfigError(f"rendezvous host {host!r} does not resolve: {exc}") from exc
    if host in _local_addresses() or addrs & _local_addresses():
        return  # this node hosts the c10d store
    deadline = time.time() + wait_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=timeout_s):
                return
        except OSError as exc:
            if time.time() >= deadline:
                raise ConfigError(
                    f"rendezvous endpoint {endpoint} is unreachable after {wait_s:.0f}s ({exc}); "
                    "start the node that hosts it, or check dist.rdzv_endpoint"
                ) from exc
            time.sleep(2.0)


def torchrun_command(config: TrainConfig, i2e: str, out: str, config_file: str) -> list[str]:
    d = config.dist
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={d.nproc_per_node}"]
    if d.nnodes == 1 and not d.rdzv_endpoint:
        cmd.append("--standalone")
    else:
        cmd += [
            f"--nnodes={d.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={d.rdzv_endpoint}",
            f"--rdzv-id={d.rdzv_id}",
        ]
    cmd += ["-m", "training.train", "--i2e", i2e, "--out", out, "--config-file", config_file]
    return cmd


def launch(config: TrainConfig, i2e: str, out: str, dry_run: bool = False) -> dict[str, Any]:
    info = preflight(config, i2e, out)
    if config.dist.nnodes > 1 or config.dist.rdzv_endpoint:
        check_rendezvous(config.dist.rdzv_endpoint)
    storage.makedirs(out)
    layout = TrainLayout(out)
    config_file = config.save(out, REQUEST_FILE)  # every rank reads it (local or s3://)
    cmd = torchrun_command(config, i2e, out, config_file)
    m = info["manifest"]
    print(
        f"train: {m.num_samples} samples, {m.num_classes} classes, {info['steps']} steps "
        f"({info['epochs']} epoch(s)), {config.dist.nnodes} node(s) x {config.dist.nproc_per_node} "
        f"process(es)"
        + (f", resuming at step {info['resume_from']}" if info["resume_from"] else ""),
        flush=True,
    )
    if dry_run:
        print(" ".join(cmd))
        return {"rc": 0, "command": cmd}
    # One run per --out (per node and --out for a multi-node run: every node's launcher holds
    # its own): a second launcher is refused, naming this one; a dead launcher's lease
    # expires. torchrun dies with this process, each rank with torchrun, each loader with its
    # rank: a killed launcher never leaves ranks writing into --out.
    node = socket.gethostname() if config.dist.nnodes > 1 else None
    with Lease(layout.lease_of(node), what="mofi train").acquire():
        rc = subprocess.call(cmd, preexec_fn=die_with_parent)
    return {"rc": rc, "command": cmd, "model": layout.model}
