"""Emulated cluster nodes on one Linux machine, for trying and testing multi-node launches.

    python -m hipscale.tools.local_cluster up 2        # node1, node2 with sshd; prints the hostfile
    python -m hipscale.tools.local_cluster exec node1 -- deepspeed --hostfile ... --module hipscale.train ...
    python -m hipscale.tools.local_cluster link node2 down   # pull node2's cable (and `up` to plug it in)
    python -m hipscale.tools.local_cluster kill node2        # SIGKILL every process on node2 (a lost node)
    python -m hipscale.tools.local_cluster boot node2        # bring it back (its sshd starts again)
    python -m hipscale.tools.local_cluster down

Each node is a network namespace (`<name>-node<i>`) with its own address 198.18.0.<i>/24 on `eth0`,
its own host name (a UTS namespace: `hostname` says node<i>), its own /etc/hosts and /etc/ssh (bind
mounted by `ip netns exec` from /etc/netns/<namespace>/), and an sshd that accepts root with a key
generated for this cluster. The nodes' cables meet in a bridge inside one more namespace
(`<name>-switch`), so no interface or route is added to the machine's own network: traffic goes only
between the namespaces this tool made. The file system, /dev/shm and the processes' view of each other
are shared, as a cluster's shared file system is. 198.18.0.0/15 is reserved for network tests (RFC 2544).

Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN), iproute2, util-linux (nsenter, unshare), openssh-server,
openssh-client and pdsh. `down` removes everything `up` made, also after a failed `up` or a crashed test.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SUBNET = "198.18.0"
DEFAULT_NAME = "hipscale"
DEFAULT_STATE = Path("/tmp/hipscale-cluster")
SSHD = "/usr/sbin/sshd"

_SSHD_CONFIG = """\
Port 22
ListenAddress {address}
HostKey {state}/ssh_host_ed25519_key
PidFile {state}/{node}.sshd.pid
AuthorizedKeysFile {state}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
MaxStartups 64
ClientAliveInterval 5
ClientAliveCountMax 3
LogLevel ERROR
"""

# Read by every ssh client on the nodes (pdsh, mpirun's rsh agent, the deepspeed launcher's checks).
_SSH_CONFIG = """\
Host *
  IdentityFile {state}/id_ed25519
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
  BatchMode yes
  ConnectTimeout 10
  ServerAliveInterval 5
  ServerAliveCountMax 3
"""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def unavailable_reason() -> Optional[str]:
    """Why emulated nodes cannot be made here, or None when they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "nsenter", "unshare", "ssh", "ssh-keygen", "pdsh", SSHD)
               if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (make system-deps installs them)"
    probe = f"hipscale-probe-{os.getpid()}"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _run("ip", "netns", "delete", probe, check=False)
    return None


@dataclass
class Cluster:
    """N emulated nodes named node1..nodeN; `state` holds keys, configs, sshd pid files and cluster.json."""

    name: str = DEFAULT_NAME
    state: Path = DEFAULT_STATE
    nodes: int = 0

    @property
    def hostfile(self) -> Path:
        return self.state / "hostfile"

    def namespace(self, node: str) -> str:
        return f"{self.name}-{node}"

    def node_names(self) -> list[str]:
        return [f"node{i}" for i in range(1, self.nodes + 1)]

    def address(self, node: str) -> str:
        return f"{SUBNET}.{int(node.removeprefix('node'))}"

    @classmethod
    def load(cls, name: str = DEFAULT_NAME, state: Path = DEFAULT_STATE) -> "Cluster":
        info = json.loads((state / "cluster.json").read_text())
        return cls(name=info["name"], state=state, nodes=info["nodes"])

    # ---- up / down -------------------------------------------------------------------------------------
    def up(self, nodes: int, slots: int = 2) -> None:
        """Make `nodes` nodes (after removing any leftovers of a cluster of the same name)."""
        if not 1 <= nodes <= 250:
            raise ValueError(f"nodes must be between 1 and 250, got {nodes}")
        self.down()
        self.nodes = nodes
        self.state.mkdir(parents=True, exist_ok=True)
        try:
            self._make_keys()
            switch = self.namespace("switch")
            _run("ip", "netns", "add", switch)
            _run("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", switch, "link", "set", "br0", "up")
            hosts = "127.0.0.1 localhost\n" + "".join(f"{self.address(n)} {n}\n" for n in self.node_names())
            for node in self.node_names():
                self._make_node(node, hosts)
            self.hostfile.write_text("".join(f"{n} slots={slots}\n" for n in self.node_names()))
            (self.state / "cluster.json").write_text(json.dumps({"name": self.name, "nodes": nodes}))
        except BaseException:
            self.down()
            raise

    def _make_keys(self) -> None:
        for key in ("id_ed25519", "ssh_host_ed25519_key"):
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{self.name}-cluster", "-f",
                 str(self.state / key))
        shutil.copy(self.state / "id_ed25519.pub", self.state / "authorized_keys")

    def _make_node(self, node: str, hosts: str) -> None:
        ns, switch, address = self.namespace(node), self.namespace("switch"), self.address(node)
        _run("ip", "netns", "add", ns)
        # The cable: eth0 on the node, <node> on the switch's bridge; created inside the namespaces.
        _run("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", node, "netns", switch)
        _run("ip", "-n", switch, "link", "set", node, "master", "br0", "up")
        _run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        etc = Path("/etc/netns") / ns
        (etc / "ssh").mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(hosts)
        (etc / "hostname").write_text(node + "\n")
        # No name server is reachable from the nodes: an empty resolv.conf makes look-ups of unknown names
        # fail at once (instead of waiting for the machine's name server) and /etc/hosts answer the rest.
        (etc / "resolv.conf").write_text("")
        (etc / "ssh" / "sshd_config").write_text(_SSHD_CONFIG.format(address=address, state=self.state, node=node))
        (etc / "ssh" / "ssh_config").write_text(_SSH_CONFIG.format(state=self.state))
        self.boot(node)

    def boot(self, node: str) -> None:
        """Start the node's sshd, the process every command on the node descends from: after `up`, or to bring
        back a node that `kill` took down (as a node that reboots)."""
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        (self.state / f"{node}.sshd.pid").unlink(missing_ok=True)  # a killed sshd's: the new one writes its own
        # sshd daemonises; the mount namespace `ip netns exec` made (with /etc/netns/<ns> bound over /etc)
        # and the UTS namespace with the node's host name stay with it and every process it starts.
        _run("ip", "netns", "exec", self.namespace(node), "unshare", "--uts", "sh", "-c",
             f"hostname {node} && exec {SSHD}")
        self._wait_for_ssh(node)

    def _wait_for_ssh(self, node: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:  # the pid file appears when sshd has daemonised
                probe = subprocess.run(self.exec_prefix(node) + ["ssh", node, "hostname"], capture_output=True,
                                       text=True, timeout=timeout)
                answer, error = probe.returncode == 0 and probe.stdout.strip() == node, probe.stderr.strip()
            except (OSError, ValueError) as e:
                answer, error = False, f"no sshd pid yet ({e})"
            if answer:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"ssh on {node} to itself does not work: {error}")
            time.sleep(0.2)

    def down(self) -> None:
        """Kill every process on the nodes and delete the namespaces, /etc/netns entries and state."""
        prefix = f"{self.name}-"
        listed = _run("ip", "netns", "list", check=False).stdout.split("\n")
        for ns in (line.split()[0] for line in listed if line.startswith(prefix)):
            for pid in self._namespace_pids(ns):
                _kill(pid, signal.SIGKILL)
            _run("ip", "netns", "delete", ns, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        shutil.rmtree(self.state, ignore_errors=True)

    # ---- using the nodes -------------------------------------------------------------------------------
    def sshd_pid(self, node: str) -> int:
        return int((self.state / f"{node}.sshd.pid").read_text())

    def exec_prefix(self, node: str) -> list[str]:
        """Prefix a command with this to run it on `node` (its network, host name and /etc)."""
        return ["nsenter", f"--target={self.sshd_pid(node)}", "--net", "--uts", "--mount", "--wd=" + os.getcwd(),
                "--"]

    @staticmethod
    def _namespace_pids(ns: str) -> list[int]:
        return [int(p) for p in _run("ip", "netns", "pids", ns, check=False).stdout.split()]

    def processes(self, node: str) -> list[int]:
        """PIDs of every process on `node` but its sshd daemon (jobs, ssh sessions, their children)."""
        return [p for p in self._namespace_pids(self.namespace(node)) if p != self.sshd_pid(node)]

    def kill(self, node: str, sig: int = signal.SIGKILL) -> list[int]:
        """Send `sig` to every process on `node`, sshd included when it is SIGKILL (the node is lost)."""
        pids = self._namespace_pids(self.namespace(node))
        if sig != signal.SIGKILL:
            pids = [p for p in pids if not _is_sshd(p)]
        for pid in pids:
            _kill(pid, sig)
        return pids

    def link(self, node: str, up: bool) -> None:
        """Plug in or pull `node`'s cable at the switch: the node's own interface stays up, as it does when a
        switch port or a link fails, so its connections hang instead of failing."""
        _run("ip", "-n", self.namespace("switch"), "link", "set", node, "up" if up else "down")


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _is_sshd(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/exe").resolve().name == "sshd"
    except OSError:
        return False


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hipscale.tools.local_cluster", description=__doc__.split("\n")[0])
    parser.add_argument("--name", default=DEFAULT_NAME, help="prefix of the namespaces (default %(default)s)")
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE, help="keys, configs, hostfile (default %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="make N nodes")
    up.add_argument("nodes", type=int)
    up.add_argument("--slots", type=int, default=2, help="processes per node in the hostfile (default %(default)s)")
    sub.add_parser("down", help="remove the nodes")
    run = sub.add_parser("exec", help="run a command on a node")
    run.add_argument("node")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    link = sub.add_parser("link", help="pull (down) or plug in (up) a node's cable")
    link.add_argument("node")
    link.add_argument("state_", choices=("up", "down"), metavar="up|down")
    kill = sub.add_parser("kill", help="SIGKILL every process on a node (the node is lost)")
    kill.add_argument("node")
    boot = sub.add_parser("boot", help="bring back a node that `kill` took down (its sshd starts again)")
    boot.add_argument("node")
    args = parser.parse_args(argv)

    cluster = Cluster(name=args.name, state=args.state)
    if args.command == "down":
        cluster.down()
        return
    if args.command == "up":
        reason = unavailable_reason()
        if reason:
            parser.error(f"cannot make nodes here: {reason}")
        cluster.up(args.nodes, args.slots)
        print(f"{args.nodes} nodes up: " + ", ".join(f"{n} {cluster.address(n)}" for n in cluster.node_names()))
        print(f"hostfile: {cluster.hostfile}")
        print("run on a node: python -m hipscale.tools.local_cluster exec node1 -- COMMAND")
        return
    cluster = Cluster.load(args.name, args.state)
    if args.node not in cluster.node_names():
        parser.error(f"no node {args.node!r}: the cluster has {', '.join(cluster.node_names())}")
    if args.command == "exec":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        os.execvp("nsenter", cluster.exec_prefix(args.node) + (cmd or [os.environ.get("SHELL", "sh")]))
    elif args.command == "link":
        cluster.link(args.node, args.state_ == "up")
    elif args.command == "kill":
        print(f"killed {len(cluster.kill(args.node))} processes on {args.node}")
    elif args.command == "boot":
        cluster.boot(args.node)


if __name__ == "__main__":
    main()
