"""A real agent under a long random churn of its cluster keeps the real kernel exact.

The agent computes incrementally (overlay/compute.py ComputeCache, changes found by object
identity) and plans against the state it believes it left (overlay/plan.py settled()), not a
fresh kernel read. This test checks that shortcut end to end: node1's agent of a small lab
(node1 on 192.168.1.0/24, node2 on 192.168.2.0/24, cross-subnet) gets ~200 synthetic peers
written straight into the lab's datastore, then a seeded sequence of mutations (peers added
and removed, underlays moved across subnets, VTEP MACs changed, a duplicate tunnel address
made and fixed, addresses borrowed across peers and released). After every step, node1's
kernel must equal a FRESH compute() of a FRESH listing of the datastore: plan(fresh desired,
kernel read) == [] names every stale or missing route, nexthop, neighbour or FDB entry.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field

import netaddr
import pytest

from ipam.block import Block, nth_block
from ipam.datastore import Datastore, open_datastore
from ipam.model import IPPool, Node
from ipam.records import BLOCKS_PREFIX, block_key
from ipam.store import ResourceStore, encode, resource_key
from netns_tests.lab_fixtures import LAB_TEST_MARKS, VXLAN_DEV, Lab, _reaped, poll, running_lab
from overlay.compute import compute, local_node_from
from overlay.kernel.apply import Kernel, describe
from overlay.kernel.batch import open_rtnl
from overlay.lab import netns
from overlay.model import Op
from overlay.plan import plan
from overlay.view import ClusterView
from overlay.watch import ClusterWatcher

pytestmark = LAB_TEST_MARKS

INITIAL_PEERS = 200
STEPS = 30
CONVERGE_TIMEOUT_S = 10.0
# node1's subnet (direct path) minus the router (.1) and the lab's nodes (.11, .12).
DIRECT_HOSTS = [f"192.168.1.{i}/24" for i in range(20, 251)]
# Any other subnet is across the router (VXLAN path); addresses need not be reachable.
OTHER_HOSTS = [f"172.20.{i // 250}.{i % 250 + 1}/24" for i in range(2000)]


@dataclass
class Peer:
    name: str
    block: Block
    tunnel: netaddr.IPAddress  # its own VXLAN tunnel address, allocated in its block
    underlay: str
    mac: str | None = None
    tunnel_override: netaddr.IPAddress | None = None  # set: a duplicate VTEP address

    def node(self) -> Node:
        return Node(
            name=self.name,
            ipv4_address=netaddr.IPNetwork(self.underlay),
            ipv4_vxlan_tunnel_addr=self.tunnel_override or self.tunnel,
            vxlan_tunnel_mac=self.mac,
        )


@dataclass
class Cluster:
    """The synthetic peers as the test wrote them, and what it writes next."""

    ds: Datastore
    pool: IPPool
    prefix: str
    rng: random.Random
    free_blocks: list[netaddr.IPNetwork]
    peers: dict[str, Peer] = field(default_factory=dict)
    # Borrowed /32s: (owner of the block, address, hosting peer).
    borrows: list[tuple[str, netaddr.IPAddress, str]] = field(default_factory=list)
    used_underlays: set[str] = field(default_factory=set)
    serial: int = 0
    direct_share: float = 0.5  # of the peers added, those in node1's subnet

    # --- raw datastore writes (compare-and-swap on the current revision) ---------------

    def _put(self, key: str, value: str) -> None:
        kv = self.ds.get(key)
        if kv is None:
            self.ds.create(key, value)
        else:
            self.ds.update(key, value, kv.mod_revision)

    def _drop(self, key: str) -> None:
        kv = self.ds.get(key)
        if kv is not None:
            self.ds.delete(key, kv.mod_revision)

    def write_node(self, p: Peer) -> None:
        self._put(resource_key("Node", p.name), encode(p.node()))

    def write_block(self, p: Peer) -> None:
        self._put(block_key(p.block.cidr), p.block.to_json())

    # --- mutations -----------------------------------------------------------------------

    def _underlay(self, direct: bool) -> str:
        hosts = DIRECT_HOSTS if direct else OTHER_HOSTS
        choice = self.rng.choice([h for h in hosts if h not in self.used_underlays])
        self.used_underlays.add(choice)
        return choice

    def _mac(self) -> str:
        return "02:" + ":".join(f"{self.rng.randrange(256):02x}" for _ in range(5))

    def add(self) -> str:
        self.serial += 1
        name = f"{self.prefix}-{self.serial:04d}"
        cidr = self.free_blocks.pop(self.rng.randrange(len(self.free_blocks)))
        block = Block.new(cidr, affinity=f"host:{name}", sequence_number=1)
        tunnel = cidr.network
        attrs = {"node": name, "type": "vxlanTunnelAddress"}
        block.assign(tunnel, f"vxlan-tunnel-addr-{name}", attrs)
        p = Peer(name, block, tunnel, self._underlay(self.rng.random() < self.direct_share))
        self.peers[name] = p
        # Either order: the agent may see a block before its Node or the other way round.
        if self.rng.random() < 0.5:
            self.write_node(p)
            self.write_block(p)
        else:
            self.write_block(p)
            self.write_node(p)
        return f"add {name} {p.underlay}"

    def remove(self) -> str:
        p = self.peers.pop(self.rng.choice(sorted(self.peers)))
        self._drop(block_key(p.block.cidr))
        self._drop(resource_key("Node", p.name))
        self.free_blocks.append(p.block.cidr)
        self.used_underlays.discard(p.underlay)
        # Its block held the addresses it lent: they went with it.
        self.borrows = [b for b in self.borrows if b[0] != p.name]
        return f"remove {p.name}"

    def move(self) -> str:
        p = self.peers[self.rng.choice(sorted(self.peers))]
        was = p.underlay
        self.used_underlays.discard(was)
        p.underlay = self._underlay(not was.startswith("192.168.1."))
        self.write_node(p)
        return f"move {p.name} {was} -> {p.underlay}"

    def change_mac(self) -> str:
        p = self.peers[self.rng.choice(sorted(self.peers))]
        p.mac = self._mac()
        self.write_node(p)
        return f"mac {p.name} {p.mac}"

    def duplicate(self) -> str:
        a, b = self.rng.sample(sorted(self.peers), 2)
        pa = self.peers[a]
        pa.tunnel_override = self.peers[b].tunnel
        self.write_node(pa)
        return f"dup {a} takes tunnel {pa.tunnel_override} of {b}"

    def fix_duplicate(self) -> str:
        dups = sorted(n for n, p in self.peers.items() if p.tunnel_override is not None)
        if not dups:
            return self.duplicate()
        p = self.peers[self.rng.choice(dups)]
        p.tunnel_override = None
        self.write_node(p)
        return f"fix dup {p.name}"

    def borrow(self) -> str:
        a, b = self.rng.sample(sorted(self.peers), 2)
        owner = self.peers[a]
        ordinal = self.rng.choice(owner.block.unallocated)
        ip = owner.block.address(ordinal)
        owner.block.assign(ip, f"pod-{b}-{ip}", {"node": b, "pod": f"pod-{ip}"})
        self.write_block(owner)
        self.borrows.append((a, ip, b))
        return f"borrow {ip} of {a} by {b}"

    def release(self) -> str:
        if not self.borrows:
            return self.borrow()
        a, ip, b = self.borrows.pop(self.rng.randrange(len(self.borrows)))
        owner = self.peers[a]
        owner.block.release([ip])
        self.write_block(owner)
        return f"release {ip} of {a} (was on {b})"

    def step(self) -> list[str]:
        """A few random mutations, written one after the other (no wait in between)."""
        kinds = [
            (self.add, 3),
            (self.remove, 3),
            (self.move, 3),
            (self.change_mac, 2),
            (self.duplicate, 1),
            (self.fix_duplicate, 1),
            (self.borrow, 2),
            (self.release, 2),
        ]
        actions, weights = zip(*kinds, strict=True)
        picks = self.rng.choices(actions, weights, k=self.rng.randint(1, 4))
        return [action() for action in picks]

    def remove_all(self) -> None:
        for p in self.peers.values():
            self._drop(block_key(p.block.cidr))
            self._drop(resource_key("Node", p.name))
        self.peers.clear()
        self.borrows.clear()


# ------------------------------------------------------------------------- the oracle


def fresh_view(ds: Datastore) -> ClusterView:
    """The cluster from a fresh listing, decoded the way the agent's watch decodes it."""
    views: list[ClusterView] = []
    ClusterWatcher(ds, views.append).resync()
    return views[-1]


def pending_ops(ds: Datastore, kernel: Kernel, me: str) -> list[Op]:
    """What a fresh computation would still change in the kernel (empty: converged)."""
    view = fresh_view(ds)
    local = local_node_from(view.nodes[me], "eth0")
    desired = compute(view, local)
    return plan(desired, kernel.read(), nexthops_supported=kernel.supports_nexthops())


def assert_converges(ds: Datastore, kernel: Kernel, me: str, what: str) -> float:
    """Seconds until node `me`'s kernel matches a fresh computation; fails with what is
    still stale or missing after CONVERGE_TIMEOUT_S."""
    pending: list[Op] = []

    def converged() -> bool:
        pending[:] = pending_ops(ds, kernel, me)
        return not pending

    done, waited = poll(converged, CONVERGE_TIMEOUT_S, interval=0.05)
    if not done:
        shown = "\n  ".join(describe(op) for op in pending[:20])
        raise AssertionError(
            f"kernel of {me} not converged {CONVERGE_TIMEOUT_S}s after {what}: "
            f"{len(pending)} ops pending, first 20:\n  {shown}"
        )
    return waited


# ---------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def lab2() -> Iterator[Lab]:
    with running_lab(nodes=2, subnets=2, mode="cross-subnet", pods_per_node=0) as lab:
        yield lab


def free_blocks(ds: Datastore, pool: IPPool, count: int) -> list[netaddr.IPNetwork]:
    """`count` blocks of the pool that no block record uses (the lab nodes' are taken)."""
    taken = {kv.key for kv in ds.list(BLOCKS_PREFIX).items}
    blocks = (nth_block(pool, i) for i in range(1, pool.cidr.size >> (32 - pool.block_size)))
    return [b for b in blocks if block_key(b) not in taken][:count]


@pytest.mark.parametrize("seed", [1, 2])
def test_kernel_tracks_a_fresh_computation_through_churn(lab2: Lab, seed: int) -> None:
    me = lab2.node(1)
    ds = open_datastore(lab2.state.datastore)
    kernel = Kernel(netns=me.netns)
    (pool,) = ResourceStore(ds).list_pools()
    rng = random.Random(seed)
    cluster = Cluster(ds, pool, f"churn{seed}", rng, free_blocks(ds, pool, 400))
    reads_before = lab2.metrics(me)["overlay_kernel_reads_total"]
    try:
        assert_converges(ds, kernel, me.name, "lab start")
        baseline = kernel.read().routes
        for _ in range(INITIAL_PEERS):
            cluster.add()
        assert_converges(ds, kernel, me.name, f"{INITIAL_PEERS} peers added")
        # The oracle really covers the peers: each has a route (one per block) in the kernel.
        routes = {str(r.dst) for r in kernel.read().routes}
        missing = [p.name for p in cluster.peers.values() if str(p.block.cidr) not in routes]
        assert missing == [], f"peers without a route: {missing[:10]}"

        waits = []
        for i in range(STEPS):
            done = cluster.step()
            waits.append(assert_converges(ds, kernel, me.name, f"step {i}: {'; '.join(done)}"))

        # Undo what is still odd, then remove every synthetic peer at once.
        while cluster.borrows:
            cluster.release()
        for p in cluster.peers.values():
            if p.tunnel_override is not None:
                p.tunnel_override = None
                cluster.write_node(p)
        assert_converges(ds, kernel, me.name, "duplicates fixed and borrows released")
        cluster.remove_all()
        assert_converges(ds, kernel, me.name, "all synthetic peers removed")
        assert kernel.read().routes == baseline, "routes differ from before the churn"

        # Incremental: the agent trusted its settled state instead of re-reading the kernel
        # after each change (reads come from resyncs and drift only).
        reads = lab2.metrics(me)["overlay_kernel_reads_total"] - reads_before
        print(f"seed {seed}: {STEPS} steps, max wait {max(waits):.2f}s, {reads:.0f} kernel reads")
        assert reads < STEPS / 2, f"{reads} kernel re-reads over {STEPS} steps"
    finally:
        cluster.remove_all()
        kernel.close()
        ds.close()


RTMGRP_NEIGH = 0x4
CRASH_PEERS = 800  # the lab pool holds 1024 blocks: 800 + the 80 replaced


def test_an_agent_killed_in_its_first_pass_restarts_to_the_exact_kernel(lab2: Lab) -> None:
    """SIGKILL while the first pass of 800 peers is being written (some objects in the
    kernel, others not), then peers removed and added while the agent is dead: the restarted
    agent reads the kernel first and leaves exactly a fresh computation (no orphan nexthop,
    no stale neighbour, FDB entry or route of a removed peer, nothing missing)."""
    me = lab2.node(1)
    ds = open_datastore(lab2.state.datastore)
    kernel = Kernel(netns=me.netns)
    (pool,) = ResourceStore(ds).list_pools()
    blocks = free_blocks(ds, pool, CRASH_PEERS + CRASH_PEERS // 10)
    cluster = Cluster(ds, pool, "crash", random.Random(7), blocks, direct_share=0.05)
    try:
        argv = lab2.stop_agent(me)
        for _ in range(CRASH_PEERS):
            cluster.add()
        # Killed at the kernel's first neighbour notification: the agent writes neighbours,
        # FDB entries, nexthops, then routes, so the rest is not written yet.
        with contextlib.closing(open_rtnl(me.netns, groups=RTMGRP_NEIGH)) as events:
            events.settimeout(30.0)
            pid = lab2.start_agent(me, argv)
            events.recv(65536)
            os.kill(pid, signal.SIGKILL)
        gone, _ = poll(lambda: _reaped(pid), 10.0, interval=0.01)
        assert gone
        left = kernel.read()
        partial = (len(left.neighbours), len(left.fdb), len(left.nexthops), len(left.routes))
        print(f"killed with (neighbours, fdb, nexthops, routes) = {partial} in the kernel")
        assert any(partial), "the agent was killed before it wrote anything"
        # While it is dead: a tenth of the peers leave, as many new ones come.
        for _ in range(CRASH_PEERS // 10):
            cluster.remove()
            cluster.add()
        lab2.start_agent(me, argv)
        assert_converges(ds, kernel, me.name, "restart after SIGKILL")
        routes = {str(r.dst) for r in kernel.read().routes}
        missing = [p.name for p in cluster.peers.values() if str(p.block.cidr) not in routes]
        assert missing == [], f"peers without a route: {missing[:10]}"
    finally:
        cluster.remove_all()
        if me.agent_pid is not None and not netns.alive(me.agent_pid):
            lab2.start_agent(me, argv)  # the module's other tests want it running
        kernel.close()
        ds.close()


# ------------------------------------------------------------------------- cold start

COLD_PEERS = 300
OURS = re.compile(
    r"event=(route|nexthop|neighbour|fdb|device|nat6?|tunnel_filter6?(_hosts)?)_(set|deleted)\b"
)


def empty_kernel(lab: Lab, node_ns: str) -> None:
    """node's kernel as after a reboot: nothing of ours (the device takes its neighbours,
    FDB entries, nexthops and routes; our blackholes and direct nexthops go by protocol)."""
    lab.run(node_ns, "ip", "link", "del", "vxlan.calico")
    lab.run(node_ns, "ip", "nexthop", "flush", "protocol", "80")  # with the routes using them
    lab.run(node_ns, "ip", "route", "flush", "proto", "80")
    for table in ("overlay-filter", "overlay-nat"):  # the nftables tables too
        lab.run(node_ns, "nft", "delete", "table", "ip", table)
    assert Kernel(netns=node_ns).holds_ours() is False


def restart_and_converge(lab: Lab, ds: Datastore, kernel: Kernel, argv: list[str]) -> str:
    """Start node1's agent; its log once it converged and its first pass is over."""
    me = lab.node(1)
    offset = lab.log_size(me)
    lab.start_agent(me, argv)
    assert_converges(ds, kernel, me.name, "start")
    lab.wait_agent(me)  # the first pass is over (and logged)
    return lab.log_since(me, offset)


@dataclass
class Stopped:
    """node1 with its agent stopped, and synthetic peers to write before it starts again."""

    ds: Datastore
    kernel: Kernel
    cluster: Cluster
    argv: list[str]


@contextlib.contextmanager
def node1_stopped(
    lab: Lab, prefix: str, seed: int, peers: int, direct_share: float = 0.5
) -> Iterator[Stopped]:
    """Whatever happens: the synthetic peers removed and node1's agent running again."""
    me = lab.node(1)
    ds = open_datastore(lab.state.datastore)
    kernel = Kernel(netns=me.netns)
    (pool,) = ResourceStore(ds).list_pools()
    blocks = free_blocks(ds, pool, peers)
    cluster = Cluster(ds, pool, prefix, random.Random(seed), blocks, direct_share=direct_share)
    argv = lab.stop_agent(me)
    try:
        yield Stopped(ds, kernel, cluster, argv)
    finally:
        cluster.remove_all()
        if me.agent_pid is None or not netns.alive(me.agent_pid):
            lab.start_agent(me, argv)
        kernel.close()
        ds.close()


def test_an_agent_on_an_empty_kernel_programs_it_straight_from_the_records(lab2: Lab) -> None:
    """cold_start.py on a real kernel: a node that boots with 300+ peers in the datastore
    gets the whole dataplane from the cold plan (direct and VXLAN peers, our blackhole, the
    tunnel filter and NAT), and the normal first pass after it finds no route, nexthop,
    neighbour, FDB entry, device or table to change. A restart on a kernel that holds our
    objects takes the normal path."""
    me = lab2.node(1)
    with node1_stopped(lab2, "cold", 3, COLD_PEERS, direct_share=0.3) as node1:
        cluster, kernel = node1.cluster, node1.kernel
        for _ in range(COLD_PEERS):
            cluster.add()
        for _ in range(3):  # lent addresses and VTEP MACs of their own: the cold path too
            cluster.borrow()
            cluster.change_mac()
        empty_kernel(lab2, me.netns)
        log = restart_and_converge(lab2, node1.ds, kernel, node1.argv)
        lines = log.splitlines()
        (cold,) = [i for i, line in enumerate(lines) if "event=cold_start " in line]
        dp = kernel.read()
        assert dp.tunnel_filter is not None and dp.nat is not None  # the lab's pool: NAT
        written = len(dp.neighbours) + len(dp.fdb) + len(dp.nexthops) + len(dp.routes)
        written += 3  # the device and both tables
        assert f"changes={written} failed=0" in lines[cold], lines[cold]
        assert sum(1 for line in lines[:cold] if OURS.search(line)) == written
        after = [line for line in lines[cold:] if OURS.search(line)]
        assert after == [], f"the normal pass changed what the cold plan wrote: {after[:5]}"
        paths = {r.nexthop.dev if r.nexthop else "blackhole" for r in dp.routes}
        assert paths == {"eth0", VXLAN_DEV, "blackhole"}, paths
        routes = {str(r.dst) for r in dp.routes}
        assert all(f"{ip}/32" in routes for _, ip, _ in cluster.borrows), cluster.borrows

        lab2.stop_agent(me)
        log = restart_and_converge(lab2, node1.ds, kernel, node1.argv)
        assert "event=cold_start" not in log, "a restart on our objects went the cold way"


def test_a_cluster_the_cold_plan_does_not_cover_takes_the_normal_path(lab2: Lab) -> None:
    """Two peers claiming one VXLAN tunnel address: the cold plan declines, says why, and the
    normal first pass programs everything (the first by name keeps the VTEP)."""
    with node1_stopped(lab2, "decl", 4, 20) as node1:
        for _ in range(10):
            node1.cluster.add()
        node1.cluster.duplicate()
        empty_kernel(lab2, lab2.node(1).netns)
        log = restart_and_converge(lab2, node1.ds, node1.kernel, node1.argv)
        assert "event=cold_start_declined reason=" in log and "not its own" in log, log[-2000:]
        assert "event=cold_start " not in log  # (and the kernel is exact: restart_and_converge)
