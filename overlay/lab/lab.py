"""`overlayctl lab up|status|down`: build, describe and remove a lab (see topology.py).

A lab is namespaces (router, external host, nodes, pods), processes (one overlay-agent per
node, optionally one etcd in the router namespace) and a directory
`/run/overlay-lab/<name>/` holding state.json, the datastore file and per-node dirs (agent
log, CNI socket, mtu file, conflist). `down` finds what to remove from state.json AND from
the namespace names, so a lab whose `up` crashed half way is still removed completely.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from overlay.lab import httpwait, netns
from overlay.lab.netns import NetnsError
from overlay.lab.topology import (
    EXTERNAL_HOST,
    EXTERNAL_HOST6,
    EXTERNAL_NET,
    EXTERNAL_NET6,
    EXTERNAL_ROUTER,
    EXTERNAL_ROUTER6,
    LabNode,
    LabOptions,
    Topology,
    build,
    host6,
    pod_families,
    pool_manifests,
)

LAB_ROOT = Path(os.environ.get("OVERLAY_LAB_ROOT", "/run/overlay-lab"))
METRICS_ADDR = "127.0.0.1:9099"
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
CNI_NETWORK = "overlay-lab"
AGENT_SYNC_TIMEOUT = 60.0
CNI_TIMEOUT = 60.0
PARALLEL = 8
# How every lab agent finds its underlay address(es): on the node's one underlay link.
AUTODETECT_UNDERLAY = "interface=eth0"

Log = Callable[[str], None]


class LabError(RuntimeError):
    """A lab operation failed; the message says what and what to do, `detail` holds
    supporting lines (log tails) for a person to read."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


@dataclass
class NodeState:
    name: str
    netns: str
    underlay_ip: str
    subnet: str
    cni_conflist: str
    dir: str
    agent_pid: int | None = None
    underlay_ip6: str | None = None  # with prefix; --ipv6-underlay labs only

    @property
    def socket(self) -> str:
        return f"{self.dir}/cni.sock"

    @property
    def log(self) -> str:
        return f"{self.dir}/agent.log"


@dataclass
class PodState:
    name: str
    netns: str
    node: str
    ip: str | None = None  # None in an IPv6-only lab (--ipv6-only)
    ip6: str | None = None  # dual-stack and IPv6-only labs (--ipv6, --ipv6-only)


@dataclass
class LabState:
    name: str
    options: dict[str, Any]
    dir: str
    router_netns: str
    external_netns: str
    datastore: str  # the URL the agents use
    nodes: list[NodeState]
    pods: list[PodState] = field(default_factory=list)
    etcd_pid: int | None = None
    ready: bool = False  # `up` finished

    def save(self) -> None:
        path = Path(self.dir) / "state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabState:
        d = dict(d)
        d["nodes"] = [NodeState(**n) for n in d.get("nodes", [])]
        d["pods"] = [PodState(**p) for p in d.get("pods", [])]
        return cls(**d)

    def node(self, name: str) -> NodeState:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)


# ------------------------------------------------------------------------ pure helpers


def lab_dir(name: str) -> Path:
    return LAB_ROOT / name


def ns_pattern(name: str) -> re.Pattern[str]:
    """Exactly the namespace names topology.build() gives lab `name`: another lab whose
    name merely starts with `name-` never matches (its suffixes contain no '-')."""
    return re.compile(rf"{re.escape(name)}-(router|ext|node\d+|n\d+p\d+)")


def ns_order(names: set[str], name: str) -> list[str]:
    """Deletion order: pods, then nodes, then the external host and the router."""
    rank = {"n": 0, "node": 1, "ext": 2, "router": 3}

    def key(ns: str) -> tuple[int, str]:
        suffix = ns[len(name) + 1 :]
        kind = "router" if suffix == "router" else "ext" if suffix == "ext" else "node"
        if re.fullmatch(r"n\d+p\d+", suffix):
            kind = "n"
        return rank[kind], ns

    return sorted(names, key=key)


def conflist(socket: str, families: tuple[int, ...] = (4,)) -> dict[str, Any]:
    """The node's CNI network configuration list (what a runtime would read from disk),
    asking for an address of each IP version in `families` (the plugin's default is IPv4
    alone, so only a departure from it is written)."""
    ipam: dict[str, Any] = {"type": "overlay-ipam"}
    if 4 not in families:
        ipam["assignIPv4"] = False
    if 6 in families:
        ipam["assignIPv6"] = True
    return {
        "cniVersion": "1.1.0",
        "name": CNI_NETWORK,
        "plugins": [{"type": "overlay-cni", "agentSocket": socket, "mtu": 0, "ipam": ipam}],
    }


def datastore_urls(opts: LabOptions, topo: Topology, directory: Path) -> tuple[str, str]:
    """(URL the agents use, URL the router namespace uses to seed the datastore)."""
    if opts.datastore == "etcd":
        gw = topo.nodes[0].gateway
        return f"etcd://{gw}:{ETCD_CLIENT_PORT}", f"etcd://127.0.0.1:{ETCD_CLIENT_PORT}"
    url = f"sqlite://{directory}/datastore.db"
    return url, url


def bin_path(name: str) -> str:
    """Our console scripts sit beside the interpreter in the virtualenv."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise LabError(f"{name}: not found beside {sys.executable} nor on PATH (pip install -e .)")
    return found


def log_tail(path: str | Path, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _quiet(_msg: str) -> None:
    pass


# ------------------------------------------------------------------------------- up


def up(opts: LabOptions, log: Log = _quiet) -> LabState:
    """Build the whole lab; on any failure remove everything made and raise LabError."""
    topo = build(opts)
    directory = lab_dir(opts.name)
    leftovers = existing_namespaces(opts.name)
    if directory.exists() or leftovers:
        found = ([str(directory)] if directory.exists() else []) + leftovers
        raise LabError(
            f"a lab named {opts.name!r} already exists ({', '.join(found)}); "
            f"remove it first with `overlayctl lab down --name {opts.name}`"
        )
    LAB_ROOT.mkdir(parents=True, exist_ok=True)
    try:
        directory.mkdir()  # exclusive: two concurrent `up` of one name cannot both pass
    except FileExistsError:
        raise LabError(f"a lab named {opts.name!r} is being created by another process") from None
    try:
        state = _initial_state(opts, topo, directory)
        state.save()
        _build(state, topo, log)
        state.ready = True
        state.save()
        return state
    except BaseException as e:
        log("lab up failed: removing everything it made")
        detail = e.detail if isinstance(e, LabError) else ""
        try:
            down(opts.name)
        except Exception as cleanup:  # keep the original error, mention the cleanup one
            raise LabError(f"{e}; cleanup also failed: {cleanup}", detail) from e
        if isinstance(e, LabError | NetnsError):
            raise LabError(f"lab up failed: {e}", detail) from e
        raise


def _initial_state(opts: LabOptions, topo: Topology, directory: Path) -> LabState:
    agent_url, _ = datastore_urls(opts, topo, directory)
    nodes = []
    for n in topo.nodes:
        d = directory / n.name
        nodes.append(
            NodeState(
                name=n.name,
                netns=n.netns,
                underlay_ip=n.underlay_ip,
                subnet=n.subnet,
                cni_conflist=str(d / "10-overlay.conflist"),
                dir=str(d),
                underlay_ip6=n.underlay_ip6,
            )
        )
    pods = [PodState(name=p.name, netns=p.netns, node=p.node) for p in topo.pods]
    return LabState(
        name=opts.name,
        options=asdict(opts),
        dir=str(directory),
        router_netns=topo.router_netns,
        external_netns=topo.external_netns,
        datastore=agent_url,
        nodes=nodes,
        pods=pods,
    )


def _build(state: LabState, topo: Topology, log: Log) -> None:
    t0 = time.monotonic()
    _make_router_and_external(topo)
    for n in topo.nodes:
        _make_node(topo, n)
    log(f"namespaces: router, external and {len(topo.nodes)} nodes ({time.monotonic() - t0:.1f}s)")

    t0 = time.monotonic()
    _seed_datastore(state, topo)
    log(f"datastore {state.datastore} seeded with the pools ({time.monotonic() - t0:.1f}s)")

    t0 = time.monotonic()
    _start_agents(state)
    _wait_agents(state, peers=None)
    log(f"{len(state.nodes)} agents synced ({time.monotonic() - t0:.1f}s)")

    t0 = time.monotonic()
    _make_pods(state)
    # Every agent must have programmed every remote block before the lab is usable.
    _wait_agents(state, peers=len(state.nodes) - 1)
    log(f"{len(state.pods)} pods made through the CNI plugin ({time.monotonic() - t0:.1f}s)")


def _make_router_and_external(topo: Topology) -> None:
    r, ext = topo.router_netns, topo.external_netns
    netns.add(r)
    cmds = ["link set lo up"]
    v6 = topo.options.ipv6_underlay
    for k, subnet in enumerate(topo.subnets, start=1):
        gw = subnet.rsplit(".", 1)[0] + ".1"
        cmds += [f"link add br{k} type bridge", f"addr add {gw}/24 dev br{k}"]
        # nodad: usable at once, not after duplicate address detection (~2 s).
        cmds += [f"addr add {host6(k, 1)}/64 dev br{k} nodad"] if v6 else []
        cmds.append(f"link set br{k} up")
    netns.batch(r, cmds)
    netns.sysctl(r, "net.ipv4.ip_forward", "1")
    if v6:
        netns.sysctl(r, "net.ipv6.conf.all.forwarding", "1")
    if topo.options.encap == "ipip":
        _require_ipip(r)

    netns.add(ext)
    netns.run(["ip", "-n", r, "link", "add", "ext0", "type", "veth", "peer", "name", "eth0",
               "netns", ext])  # fmt: skip
    router_cmds, ext_cmds = external_commands(v6)
    netns.batch(r, router_cmds)
    netns.batch(ext, ext_cmds)


def external_commands(ipv6: bool) -> tuple[list[str], list[str]]:
    """`ip` commands for the link router ext0 <-> external eth0: (router side, external
    side). With `ipv6` (an IPv6 underlay) both ends get IPv6 too, so NAT66 has somewhere
    to go."""
    v4, v6 = EXTERNAL_NET.prefixlen, EXTERNAL_NET6.prefixlen
    router = [f"addr add {EXTERNAL_ROUTER}/{v4} dev ext0"]
    # nodad: usable at once, not after duplicate address detection (~2 s).
    router += [f"addr add {EXTERNAL_ROUTER6}/{v6} dev ext0 nodad"] if ipv6 else []
    router.append("link set ext0 up")
    ext = ["link set lo up", f"addr add {EXTERNAL_HOST}/{v4} dev eth0"]
    ext += [f"addr add {EXTERNAL_HOST6}/{v6} dev eth0 nodad"] if ipv6 else []
    ext += ["link set eth0 up", f"route add default via {EXTERNAL_ROUTER}"]
    # The family follows the gateway: this is the IPv6 default route.
    ext += [f"route add default via {EXTERNAL_ROUTER6}"] if ipv6 else []
    return router, ext


def _require_ipip(ns: str) -> None:
    """Fail in a second, not after the agents' timeout, on a kernel without IP-in-IP."""
    try:
        # Addressed: a second wildcard ipip device clashes with the fallback tunl0 that
        # loading the module puts in every namespace ("File exists").
        netns.batch(
            ns,
            [
                "link add ovl-ipip-probe type ipip local 192.0.2.1 remote 192.0.2.2",
                "link del ovl-ipip-probe",
            ],
        )
    except NetnsError as e:
        raise LabError(
            f"--encap ipip: this kernel cannot make IP-in-IP devices ({e}); use --encap vxlan, "
            "or run the lab in the micro-VM (netns_tests/vm/) on a distribution kernel"
        ) from None


def _make_node(topo: Topology, n: LabNode) -> None:
    k = topo.subnets.index(n.subnet) + 1
    ns, port = n.netns, n.router_port
    netns.add(ns)
    # Created from the router side straight into the node: nothing touches the root ns.
    netns.run(["ip", "-n", topo.router_netns, "link", "add", port, "type", "veth", "peer",
               "name", "eth0", "netns", ns])  # fmt: skip
    netns.batch(topo.router_netns, [f"link set {port} master br{k}", f"link set {port} up"])
    netns.batch(ns, node_underlay_commands(n))
    netns.sysctl(ns, "net.ipv4.ip_forward", "1")


def node_underlay_commands(n: LabNode) -> list[str]:
    """`ip` commands giving a node's eth0 its underlay address(es) and default route(s)."""
    cmds = ["link set lo up", f"addr add {n.underlay_ip} dev eth0"]
    if n.underlay_ip6:
        cmds.append(f"addr add {n.underlay_ip6} dev eth0 nodad")  # usable at once, no DAD
    cmds += ["link set eth0 up", f"route add default via {n.gateway}"]
    if n.gateway6:
        cmds.append(f"route add default via {n.gateway6}")  # the family follows the gateway
    return cmds


def _seed_datastore(state: LabState, topo: Topology) -> None:
    opts = topo.options
    _, seed_url = datastore_urls(opts, topo, Path(state.dir))
    if opts.datastore == "etcd":
        _start_etcd(state, topo)
    for doc in pool_manifests(opts):
        manifest = Path(state.dir) / f"{doc['metadata']['name']}.json"
        manifest.write_text(json.dumps(doc, indent=2) + "\n")
        # The real CLI, from the router namespace: the only place an in-lab etcd is reachable.
        argv = [bin_path("overlayctl"), "--datastore", seed_url, "apply", "-f", str(manifest)]
        netns.run_in(state.router_netns, argv, timeout=60)


def _start_etcd(state: LabState, topo: Topology) -> None:
    gw = topo.nodes[0].gateway
    data = Path(state.dir) / "etcd"
    log_path = Path(state.dir) / "etcd.log"
    peer = f"http://127.0.0.1:{ETCD_PEER_PORT}"
    argv = [
        "etcd", "--name", "lab", "--data-dir", str(data),
        "--listen-client-urls", f"http://127.0.0.1:{ETCD_CLIENT_PORT},http://{gw}:{ETCD_CLIENT_PORT}",
        "--advertise-client-urls", f"http://{gw}:{ETCD_CLIENT_PORT}",
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"lab={peer}", "--initial-cluster-state", "new",
        "--logger", "zap", "--log-outputs", "stderr",
    ]  # fmt: skip
    if shutil.which("etcd") is None:
        raise LabError("--datastore etcd: the etcd binary is not installed (Debian etcd-server)")
    proc = _spawn(state.router_netns, argv, log_path)
    state.etcd_pid = proc.pid
    state.save()
    url = f"http://127.0.0.1:{ETCD_CLIENT_PORT}/health"
    outcome, last = _wait_http(state.router_netns, url, "etcd", None, 30.0, proc.pid)
    if outcome != "ok":
        raise LabError(
            f"etcd in {state.router_netns} (pid {proc.pid}) {outcome}: {last}; log {log_path}",
            f"--- {log_path}:\n{log_tail(log_path)}",
        )


def _spawn(ns: str, argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """A long-lived process inside `ns`; `ip netns exec` execs it, so the PID is its own."""
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            netns.exec_argv(ns, argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # outlives `lab up`; a Ctrl-C in the shell does not hit it
        )


def _wait_http(
    ns: str, url: str, condition: str, arg: int | None, timeout: float, pid: int
) -> tuple[str, str]:
    """Poll `url` from inside `ns` (see httpwait) while process `pid` lives.

    Returns (outcome, last answer): outcome is ok, "timed out", "gave up" (the process
    reports it keeps failing) or exited (no point waiting for a dead process)."""
    argv = [sys.executable, "-m", "overlay.lab.httpwait", url, str(timeout), condition]
    if arg is not None:
        argv.append(str(arg))
    # A file, not a pipe: a big /status must not block the waiter on a full pipe.
    with tempfile.TemporaryFile("w+") as out:
        waiter = subprocess.Popen(netns.exec_argv(ns, argv), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout + 15
        try:
            while waiter.poll() is None:
                if not netns.alive(pid):
                    return "exited", ""
                if time.monotonic() > deadline:
                    return "timed out", ""
                time.sleep(0.05)
        finally:
            if waiter.poll() is None:
                waiter.kill()
            waiter.wait(timeout=10)
        out.seek(0)
        last = out.read().strip()
    outcomes = {httpwait.EXIT_OK: "ok", httpwait.EXIT_HOPELESS: "gave up"}
    return outcomes.get(waiter.returncode, "timed out"), last


def describe_agent(last: str) -> str:
    """The part of an agent's /status that explains why it is not ready, in one line."""
    try:
        doc = json.loads(last)
    except ValueError:
        return last[:300]
    if not isinstance(doc, dict):
        return last[:300]
    if "error" in doc:
        return str(doc["error"])
    reconciler = doc.get("reconciler") or {}
    failed = reconciler.get("last_failed") or []
    if failed:
        return "failing: " + "; ".join(str(f) for f in failed[:2])
    datastore = doc.get("datastore") or {}
    if datastore.get("error"):
        return f"datastore {datastore.get('url')}: {datastore['error']}"
    return (
        f"datastore synced={datastore.get('synced')} "
        f"dataplane_synced={doc.get('dataplane_synced')} "
        f"dirty={reconciler.get('dirty')} peers={len(doc.get('peers') or [])}"
    )


def _start_agents(state: LabState) -> None:
    agent = bin_path("overlay-agent")
    for n in state.nodes:
        Path(n.dir).mkdir(parents=True, exist_ok=True)
        doc = conflist(n.socket, pod_families(state.options))
        Path(n.cni_conflist).write_text(json.dumps(doc, indent=2) + "\n")
        argv = agent_argv(agent, state, n)
        n.agent_pid = _spawn(n.netns, argv, Path(n.log)).pid
        state.save()


def agent_argv(agent: str, state: LabState, n: NodeState) -> list[str]:
    """The command line of node `n`'s agent (`agent`: the executable)."""
    return [
        agent, "--node-name", n.name, "--datastore", state.datastore,
        "--state-dir", n.dir, "--socket", n.socket, "--metrics-addr", METRICS_ADDR,
        *agent_address_args(state.options),
    ]  # fmt: skip


def agent_address_args(options: dict[str, Any]) -> list[str]:
    """The flags telling the agent which underlay addresses to register. IPv4: eth0's, or
    none in an IPv6-only lab (Calico's IP=none: no IPv4 address registered, so no
    vxlan.calico or tunl0, although eth0 has one). IPv6: eth0's with an IPv6 underlay;
    without one the flag is left out, so such a lab still runs agents that predate it."""
    ipv4 = "none" if options.get("ipv6_only") else AUTODETECT_UNDERLAY
    args = ["--ip-autodetection", ipv4]
    if options.get("ipv6_underlay"):
        args += ["--ip6-autodetection", AUTODETECT_UNDERLAY]
    return args


def _wait_agents(state: LabState, peers: int | None) -> None:
    """Wait (in parallel, bounded) until every agent's /status says synced."""
    url = f"http://{METRICS_ADDR}/status"

    def one(n: NodeState) -> tuple[str, str] | None:
        assert n.agent_pid is not None
        outcome, last = _wait_http(n.netns, url, "agent", peers, AGENT_SYNC_TIMEOUT, n.agent_pid)
        if outcome == "ok":
            return None
        want = f" (waiting for {peers} peers)" if peers is not None else ""
        why = f": {describe_agent(last)}" if last else ""
        return (
            f"agent of {n.name} (pid {n.agent_pid}) {outcome}{want}{why}; log {n.log}",
            f"--- {n.log}:\n{log_tail(n.log)}",
        )

    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        errors = [e for e in pool.map(one, state.nodes) if e]
    if errors:
        # The first agent's log is enough to act on; the message names every agent.
        raise LabError(" | ".join(msg for msg, _ in errors), errors[0][1])


def cni(
    verb: str,
    state: LabState,
    pod: PodState,
    timeout: float = CNI_TIMEOUT,
    runtime_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Exec the real plugin inside the pod's node namespace, as a runtime on that node would
    (`runtime_config`: what a runtime passes as capabilities, e.g. {"ips": [...]})."""
    from cni.spec import plugin_config

    node = state.node(pod.node)
    plugin = bin_path("overlay-cni")
    config = plugin_config(json.loads(Path(node.cni_conflist).read_text()), 0, {})
    if runtime_config is not None:
        config["runtimeConfig"] = runtime_config
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": verb,
        "CNI_CONTAINERID": pod.name,
        "CNI_NETNS": str(netns.NETNS_DIR / pod.netns),
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(Path(plugin).parent),
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=lab;K8S_POD_NAME={pod.name}",
    }
    try:
        res = subprocess.run(
            netns.exec_argv(node.netns, [plugin]),
            input=json.dumps(config),
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise LabError(
            f"CNI {verb} of {pod.name} on {node.name}: no answer in {timeout:g}s"
        ) from None
    try:
        out = json.loads(res.stdout) if res.stdout.strip() else {}
    except ValueError:
        out = {"msg": res.stdout.strip()}
    if res.returncode != 0:
        msg = out.get("msg") or res.stderr.strip() or f"exit status {res.returncode}"
        details = f" ({out['details']})" if out.get("details") else ""
        raise LabError(f"CNI {verb} of {pod.name} on {node.name} failed: {msg}{details}")
    return out if isinstance(out, dict) else {}


def pod_ip(result: dict[str, Any], version: int = 4) -> str:
    """The first address of `version` in an ADD result, without its prefix."""
    for entry in result.get("ips", []):
        address = str(entry.get("address", ""))
        if ("." if version == 4 else ":") in address:
            return address.split("/")[0]
    raise LabError(f"CNI ADD result has no IPv{version} address: {json.dumps(result)}")


def _make_pods(state: LabState) -> None:
    for p in state.pods:
        netns.add(p.netns)
        netns.batch(p.netns, ["link set lo up"])

    families = pod_families(state.options)

    def add(p: PodState) -> None:
        result = cni("ADD", state, p)
        p.ip = pod_ip(result) if 4 in families else None
        p.ip6 = pod_ip(result, 6) if 6 in families else None

    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        list(pool.map(add, state.pods))  # re-raises the first failure
    state.save()


# ---------------------------------------------------------------------------- state


def existing_namespaces(name: str) -> list[str]:
    pattern = ns_pattern(name)
    return [ns for ns in netns.list_all() if pattern.fullmatch(ns)]


def load(name: str) -> LabState:
    path = lab_dir(name) / "state.json"
    try:
        return LabState.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise LabError(
            f"no lab named {name!r} ({path} not found); create one with `overlayctl lab up`"
        ) from None
    except (ValueError, TypeError, KeyError) as e:
        raise LabError(f"{path}: unreadable lab state ({e}); `lab down --name {name}`") from e


def status(name: str) -> dict[str, Any]:
    state = load(name)
    return {
        "name": state.name,
        "ready": state.ready,
        "options": state.options,
        "router_netns": state.router_netns,
        "external_netns": state.external_netns,
        "external_ip": str(EXTERNAL_HOST),
        **({"external_ip6": str(EXTERNAL_HOST6)} if state.options.get("ipv6_underlay") else {}),
        "datastore": state.datastore,
        "etcd": None
        if state.etcd_pid is None
        else {"pid": state.etcd_pid, "alive": netns.alive(state.etcd_pid)},
        "nodes": [
            {
                "name": n.name,
                "netns": n.netns,
                "underlay_ip": n.underlay_ip.split("/")[0],
                "underlay_cidr": n.underlay_ip,
                "subnet": n.subnet,
                "cni_conflist": n.cni_conflist,
                "cni_socket": n.socket,
                "agent_log": n.log,
                "agent_pid": n.agent_pid,
                "agent_alive": n.agent_pid is not None and netns.alive(n.agent_pid),
                "metrics": f"http://{METRICS_ADDR} (inside {n.netns})",
            }
            | ({"underlay_ip6": n.underlay_ip6.split("/")[0]} if n.underlay_ip6 else {})
            for n in state.nodes
        ],
        "pods": [
            {"name": p.name, "netns": p.netns, "node": p.node, "ip": p.ip}
            | ({"ip6": p.ip6} if p.ip6 else {})
            for p in state.pods
        ],
    }


# ----------------------------------------------------------------------------- down


@dataclass
class DownReport:
    namespaces: list[str] = field(default_factory=list)
    processes: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    dir_removed: bool = False


def _owned(pid: int, marker: str) -> bool:
    """PID reuse guard: only signal a recorded PID whose command line is still ours."""
    return any(marker in arg for arg in netns.cmdline(pid))


def down(name: str, log: Log = _quiet) -> DownReport:
    """Remove everything of lab `name`. Idempotent; best effort, but every namespace and
    process that matches the lab goes, whatever state.json says (or if it is missing)."""
    report = DownReport()
    directory = lab_dir(name)
    state: LabState | None = None
    try:
        state = load(name)
    except LabError as e:
        if directory.exists():
            report.problems.append(str(e))

    names = set(existing_namespaces(name))
    if state is not None:
        _delete_pods(state, report)
        names |= {state.router_netns, state.external_netns}
        names |= {n.netns for n in state.nodes} | {p.netns for p in state.pods}
        names = {ns for ns in names if netns.exists(ns)}

    victims: set[int] = set()
    if state is not None:
        victims |= {n.agent_pid for n in state.nodes if n.agent_pid and _owned(n.agent_pid, n.name)}
        if state.etcd_pid and _owned(state.etcd_pid, state.dir):
            victims.add(state.etcd_pid)
    for ns in names:  # whatever still lives in our namespaces is ours too
        victims |= set(netns.pids(ns))
    if victims:
        survivors = netns.stop(sorted(victims))
        report.processes = sorted(victims)
        if survivors:
            report.problems.append(f"processes survived SIGKILL: {survivors}")
        log(f"stopped {len(victims)} processes")

    for ns in ns_order(names, name):
        try:
            netns.delete(ns)
            report.namespaces.append(ns)
        except NetnsError as e:
            report.problems.append(str(e))
    if names:
        log(f"deleted {len(report.namespaces)} namespaces")

    if directory.exists():
        shutil.rmtree(directory, ignore_errors=True)
        report.dir_removed = not directory.exists()
        if not report.dir_removed:
            report.problems.append(f"{directory}: could not be removed")
    return report


def _delete_pods(state: LabState, report: DownReport) -> None:
    """CNI DEL each pod whose agent still runs (releases its address); best effort."""

    def one(p: PodState) -> None:
        try:
            node = state.node(p.node)
        except KeyError:
            return
        if not (node.agent_pid and netns.alive(node.agent_pid)) or not netns.exists(p.netns):
            return
        try:
            cni("DEL", state, p, timeout=10.0)
        except (LabError, OSError, ValueError) as e:
            report.problems.append(f"{e} (ignored)")

    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        list(pool.map(one, state.pods))
