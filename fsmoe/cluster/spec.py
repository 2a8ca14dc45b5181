"""What an emulated cluster looks like: nodes, ranks per node, and the shaped link of each node.

Pure: nothing here touches the network. :mod:`fsmoe.cluster.netns` turns a spec into namespaces.

Link model (what ``tc tbf`` can do on these machines; ``netem`` is not available, so there is no
propagation delay and no loss model):

* every node has one uplink (node -> bridge) and one downlink (bridge -> node), each a token bucket
  of ``rate`` bits/s. Traffic between two nodes crosses the sender's uplink and the receiver's
  downlink; traffic between two ranks of one node never leaves the node (loopback, unshaped).
* ``latency_ms`` is tbf's *queue* bound (how long a packet may wait in the shaper before it is
  dropped), not a delay added to every packet. Below ~50 ms large messages see drops and TCP
  retransmits, so 50 ms is the default and the floor we recommend.
* rates are written in tc's units and read by :func:`fsmoe.config.parse_rate` (re-exported here).
* what gloo gets out of a link (measured with ``benchmarks/cluster_links.py``): one direction alone
  ~95% of the rate; an AlltoAll, which sends both ways at once over one TCP connection per rank pair,
  between ~50% and ~95% per direction (samples switch between the two regimes; plain TCP over one
  socket gets ~95% both ways, so the shaper itself is not the limit). Treat ``link`` as a ceiling;
  fsmoe's profiler measures the real groups anyway.
* ``burst`` is the bucket depth: at least 64 KiB (one GSO super-packet) and 1 ms of line rate. A
  deeper bucket lets the first ``burst`` bytes of every message through at once (at 1 Gbit/s a 500 KB
  bucket made a 1 MiB AlltoAll look 1.4 Gbit/s fast); a shallower one costs steady-state rate.
"""

from __future__ import annotations

from dataclasses import dataclass

from fsmoe.config import UNSHAPED_WORDS, JobConfig, format_rate, parse_rate

__all__ = ["MAX_NODES", "UNSHAPED_WORDS", "EmulatedClusterSpec", "TbfParams", "format_rate", "parse_rate"]

_MIN_BURST_BYTES = 64 * 1024
_BURST_SECONDS = 0.001
MAX_NODES = 250  # node n gets host address n + 1 in a /24


@dataclass(frozen=True)
class TbfParams:
    """Arguments of one ``tc qdisc add ... tbf`` (rate in bits/s, burst in bytes, latency in ms)."""

    rate_bits: int
    burst_bytes: int
    latency_ms: float

    def tc_args(self) -> list[str]:
        return [
            "tbf",
            "rate",
            f"{self.rate_bits}bit",
            "burst",
            str(self.burst_bytes),
            "latency",
            f"{self.latency_ms:g}ms",
        ]


@dataclass(kw_only=True, frozen=True)
class EmulatedClusterSpec:
    """``nodes`` emulated nodes with ``procs_per_node`` ranks each; ranks are numbered node-major
    (node n holds ranks ``n*procs_per_node ..``), as :class:`fsmoe.parallel.dims.ParallelDims` assumes.

    ``link``: each node's uplink and downlink rate (see :func:`parse_rate`), or ``"unshaped"`` for
    namespaces without shaping. ``latency_ms``: tbf's queue bound (see the module doc).
    ``burst_bytes``: the token bucket; None picks max(64 KiB, 1 ms of line rate)."""

    nodes: int
    procs_per_node: int
    link: str = "1gbit"
    latency_ms: float = 50.0
    burst_bytes: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= MAX_NODES:
            raise ValueError(f"EmulatedClusterSpec: nodes={self.nodes} must be in 1..{MAX_NODES}")
        if self.procs_per_node < 1:
            raise ValueError(f"EmulatedClusterSpec: procs_per_node={self.procs_per_node} must be >= 1")
        if not self.latency_ms > 0:
            raise ValueError(f"EmulatedClusterSpec: latency_ms={self.latency_ms} must be > 0 (50 avoids drops)")
        if self.burst_bytes is not None and self.burst_bytes < 2048:
            raise ValueError(f"EmulatedClusterSpec: burst_bytes={self.burst_bytes} must be >= 2048 (one packet)")
        parse_rate(self.link)  # raises ValueError naming the accepted forms

    @classmethod
    def from_job(cls, job: JobConfig) -> EmulatedClusterSpec:
        """The emulated nodes of a job: ``parallel.num_nodes`` × ``parallel.ppn`` ranks, each node's link
        ``cluster.link`` with bucket ``cluster.burst_bytes``. ``ValueError`` naming the numbers."""
        par, cl = job.parallel, job.cluster
        return cls(nodes=par.num_nodes, procs_per_node=par.ppn, link=cl.link, burst_bytes=cl.burst_bytes)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def rate_bits(self) -> int | None:
        """The link rate in bits/s, or None when unshaped."""
        return parse_rate(self.link)

    @property
    def shaped(self) -> bool:
        return self.rate_bits is not None

    def tbf(self) -> TbfParams | None:
        """The shaper of every uplink and downlink, or None when unshaped."""
        rate = self.rate_bits
        if rate is None:
            return None
        burst = self.burst_bytes or max(_MIN_BURST_BYTES, int(rate / 8 * _BURST_SECONDS))
        return TbfParams(rate_bits=rate, burst_bytes=burst, latency_ms=self.latency_ms)

    def node_of(self, rank: int) -> int:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside 0..{self.world_size - 1}")
        return rank // self.procs_per_node

    def describe(self) -> str:
        """One line for logs: ``2 nodes x 2 ranks, links 1gbit (tbf queue 50 ms)``."""
        links = format_rate(self.rate_bits)
        queue = f" (tbf queue {self.latency_ms:g} ms)" if self.shaped else ""
        return f"{self.nodes} nodes x {self.procs_per_node} ranks, links {links}{queue}"
