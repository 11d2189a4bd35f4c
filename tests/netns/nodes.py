"""Two simulated cluster nodes on one machine: network namespaces joined by a veth, sshd in each.

    node1 (netns zf<id>n1)  10.77.0.1/24 on zf0  <-- veth -->  zf0 10.77.0.2/24  node2 (zf<id>n2)

Each namespace has its own loopback (brought up) and runs its own `sshd` (Debian
`openssh-server`) listening on its private address, with a host key, an authorized key for root
and a pid file, all in a work directory. The addresses exist only inside these namespaces.
Both "nodes" share the file system (like a cluster's shared FS): same venv, same repo, and the
same PID namespace, so a process's node is told by its network namespace (`ip netns pids`).

The client side is an ssh config file (`Host node1` -> 10.77.0.1, key, no host-key checking)
that pdsh uses through `PDSH_SSH_ARGS_APPEND="-F <config>"`: the user's ~/.ssh is never read or
written. Commands that must reach both addresses (pdsh, the DeepSpeed runner) run inside node1's
namespace: `nodes.exec_prefix("node1") + [...]`.

Needs root, iproute2, openssh-server and pdsh. From a shell (the work dir is kept):

    python -m tests.netns.nodes up /tmp/zfnodes     # prints the hostfile / ssh config paths
    ip netns exec zf<id>n1 pdsh -w node1,node2 hostname   # with the PDSH_* variables it prints
    python -m tests.netns.nodes down /tmp/zfnodes

`SimNodes.down()` kills every process left in either namespace (by pid), then deletes the
namespaces, which also deletes the veth pair. It is safe to call after a partial `up()`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

IFNAME = "zf0"  # the same name inside both namespaces, so one GLOO_SOCKET_IFNAME fits both
SUBNET = "10.77.0"
SSHD = "/usr/sbin/sshd"
NODE_NAMES = ("node1", "node2")
REQUIRED_TOOLS = ("ip", "ssh", "ssh-keygen", "pdsh", SSHD)


class NodesUnavailable(RuntimeError):
    """Root, network namespaces or a required tool is missing (tests skip with this message)."""


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def missing_tools() -> list[str]:
    return [t for t in REQUIRED_TOOLS if shutil.which(t) is None and not os.path.exists(t)]


def check_available() -> None:
    """Raise NodesUnavailable naming what is missing (root, `ip netns add`, ssh tools)."""
    if os.geteuid() != 0:
        raise NodesUnavailable("needs root (network namespaces)")
    missing = missing_tools()
    if missing:
        raise NodesUnavailable(f"missing {', '.join(missing)} (apt-get install -y iproute2 "
                               "openssh-server openssh-client pdsh)")
    probe = f"zfprobe{os.getpid()}"
    res = _run(["ip", "netns", "add", probe], check=False)
    if res.returncode != 0:
        raise NodesUnavailable(f"`ip netns add` failed: {res.stderr.strip()}")
    _run(["ip", "netns", "del", probe], check=False)


@dataclass
class SimNodes:
    """Handle on the two nodes; `up()` builds them, `down()` removes everything it built."""

    workdir: Path
    tag: str = field(default_factory=lambda: f"zf{os.getpid() % 100000}")
    sshd: dict[str, subprocess.Popen] = field(default_factory=dict)

    # ------------------------------------------------------------------ names and paths
    def netns(self, node: str) -> str:
        return f"{self.tag}n{NODE_NAMES.index(node) + 1}"

    @staticmethod
    def addr(node: str) -> str:
        return f"{SUBNET}.{NODE_NAMES.index(node) + 1}"

    @property
    def ssh_config(self) -> Path:
        return self.workdir / "ssh_config"

    @property
    def hostfile(self) -> Path:
        return self.workdir / "hostfile"

    def exec_prefix(self, node: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns(node)]

    @property
    def pdsh_env(self) -> dict[str, str]:
        """What pdsh needs to reach the nodes with this harness's key and ssh config."""
        return {"PDSH_RCMD_TYPE": "ssh", "PDSH_SSH_ARGS_APPEND": f"-F {self.ssh_config}"}

    # ------------------------------------------------------------------ build
    def up(self) -> SimNodes:
        check_available()
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "state.json").write_text(json.dumps({"tag": self.tag}))
        try:
            self._network()
            self._keys()
            for node in NODE_NAMES:
                self._start_sshd(node)
            self._write_client_files()
            self._wait_ssh()
        except BaseException:
            self.down()
            raise
        return self

    def _network(self) -> None:
        n1, n2 = (self.netns(n) for n in NODE_NAMES)
        for ns in (n1, n2):
            _run(["ip", "netns", "add", ns])
        # Create the pair directly inside the namespaces: nothing appears in the root namespace.
        _run(["ip", "link", "add", "zfa", "netns", n1, "type", "veth", "peer", "name", "zfb",
              "netns", n2])
        for node, ns, dev in (("node1", n1, "zfa"), ("node2", n2, "zfb")):
            _run(["ip", "-n", ns, "link", "set", dev, "name", IFNAME])
            _run(["ip", "-n", ns, "addr", "add", f"{self.addr(node)}/24", "dev", IFNAME])
            _run(["ip", "-n", ns, "link", "set", IFNAME, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def _keys(self) -> None:
        for name in ("host_key", "id_client"):
            key = self.workdir / name
            if not key.exists():
                _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"zeroforge-{name}",
                      "-f", str(key)])
        pub = (self.workdir / "id_client.pub").read_text()
        (self.workdir / "authorized_keys").write_text(pub)
        # sshd's privilege-separation directory (normally made by the init system).
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)

    def _start_sshd(self, node: str) -> None:
        conf = self.workdir / f"sshd_{node}.conf"
        conf.write_text("\n".join([
            f"ListenAddress {self.addr(node)}",
            "Port 22",
            f"HostKey {self.workdir / 'host_key'}",
            f"AuthorizedKeysFile {self.workdir / 'authorized_keys'}",
            f"PidFile {self.workdir / f'sshd_{node}.pid'}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            # The work dir lives under a world-readable tmp dir; sshd would refuse the key file.
            "StrictModes no",
            "PrintMotd no",
            "LogLevel ERROR",
            "MaxStartups 100",
            "",
        ]))
        log = open(self.workdir / f"sshd_{node}.log", "w")  # noqa: SIM115 -- sshd owns it
        self.sshd[node] = subprocess.Popen(
            [*self.exec_prefix(node), SSHD, "-D", "-e", "-f", str(conf)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()

    def _write_client_files(self) -> None:
        lines = []
        for node in NODE_NAMES:
            lines += [f"Host {node}", f"  HostName {self.addr(node)}"]
        lines += [
            "Host *",
            "  User root",
            f"  IdentityFile {self.workdir / 'id_client'}",
            "  IdentitiesOnly yes",
            "  StrictHostKeyChecking no",
            "  UserKnownHostsFile /dev/null",
            "  BatchMode yes",
            "  ConnectTimeout 5",
            "  LogLevel ERROR",
            "",
        ]
        self.ssh_config.write_text("\n".join(lines))
        self.hostfile.write_text("".join(f"{n} slots=1\n" for n in NODE_NAMES))

    def _wait_ssh(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for node in NODE_NAMES:
            while True:
                proc = self.sshd[node]
                if proc.poll() is not None:
                    log = (self.workdir / f"sshd_{node}.log").read_text()
                    raise RuntimeError(f"sshd on {node} exited ({proc.returncode}): {log}")
                res = _run([*self.exec_prefix("node1"), "ssh", "-F", str(self.ssh_config),
                            node, "true"], check=False)
                if res.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ssh to {node} failed: {res.stderr.strip()}")
                time.sleep(0.2)

    # ------------------------------------------------------------------ inspect / tear down
    def pids(self, node: str) -> list[int]:
        """Every process whose network namespace is `node`'s (sshd included)."""
        res = _run(["ip", "netns", "pids", self.netns(node)], check=False)
        return [int(p) for p in res.stdout.split()] if res.returncode == 0 else []

    def stray_pids(self, node: str) -> list[int]:
        """Processes in `node` other than its sshd listener (job leftovers)."""
        listener = self.sshd.get(node)
        return [p for p in self.pids(node) if listener is None or p != listener.pid]

    @staticmethod
    def describe(pids: list[int]) -> list[str]:
        out = []
        for pid in pids:
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                out.append(f"{pid}: {cmd.decode(errors='replace').strip()}")
        return out

    def kill_strays(self) -> None:
        for node in NODE_NAMES:
            for pid in self.stray_pids(node):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def down(self) -> None:
        """Kill what runs in the namespaces (by pid), delete them (and with them the veth)."""
        for node in NODE_NAMES:
            ns = self.netns(node)
            for _ in range(3):
                pids = self.pids(node)
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.2)
            proc = self.sshd.pop(node, None)
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
            _run(["ip", "netns", "del", ns], check=False)

    @contextlib.contextmanager
    def running(self) -> Iterator[SimNodes]:
        self.up()
        try:
            yield self
        finally:
            self.down()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print("usage: python -m tests.netns.nodes up|down WORKDIR", file=sys.stderr)
        return 2
    workdir = Path(argv[1]).resolve()
    if argv[0] == "up":
        nodes = SimNodes(workdir).up()
        # The sshd processes outlive this command; `down` finds them through the namespaces.
        print(f"namespaces: {nodes.netns('node1')} {nodes.netns('node2')}")
        print(f"hostfile:   {nodes.hostfile}")
        print(f"ssh config: {nodes.ssh_config}")
        print(f"export PDSH_RCMD_TYPE=ssh PDSH_SSH_ARGS_APPEND='-F {nodes.ssh_config}' "
              f"GLOO_SOCKET_IFNAME={IFNAME}")
        return 0
    state = workdir / "state.json"
    if not state.exists():
        print(f"{state}: not found (nothing to take down)", file=sys.stderr)
        return 1
    SimNodes(workdir, tag=json.loads(state.read_text())["tag"]).down()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
