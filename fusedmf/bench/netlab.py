"""A network lab: ranks in Linux network namespaces joined by rate-limited links, a small cluster on one host.

    with NetLab(n=2, rate_gbps=1.0) as lab:        # needs root, `ip netns` and `tc`
        procs = [lab.spawn(r, [sys.executable, "worker.py"], env=lab.rank_env(r, port=29500)) for r in range(2)]
        lab.set_rate(0.3)                          # change every link's rate between runs

Topology (a star): one namespace per rank (``<prefix>-r<k>``) and one switch namespace (``<prefix>-sw``)
holding a bridge ``br0``; rank k's ``eth0`` is one end of a veth pair whose other end (``p<k>``) is a
port of the bridge. Each rank gets ``10.213.0.<k+1>/24`` on ``eth0`` (NOTE [lab isolation]). The rate of
a link is a ``tc qdisc tbf`` on both ends of its veth: on ``eth0`` (what the rank sends) and on ``p<k>``
(what it receives), so every rank has a full-duplex link of the asked rate per direction, the
bottleneck a ring allreduce sees (``B`` in fusedmf.bench.predictor). The kernel here has no ``netem``:
the lab adds rate, not latency; the latency is the veth/bridge path's own (tens of microseconds) plus
the scheduling of the ranks' processes.

NOTE [lab isolation]: nothing leaves the lab. Every interface is created inside a lab namespace (the
veth pair is made with both ends already in their namespaces, so not even a transient interface appears
in the host's namespace); the switch namespace has no address; no namespace has a default route, a NAT
rule or a link to any host interface, so a rank can reach only the other ranks' ``10.213.0.x`` and its
own loopback. GLOO_SOCKET_IFNAME=eth0 makes gloo use the lab link (its default would be the interface of
the hostname's address, which does not exist inside the namespace).

NOTE [lab teardown]: the lab is torn down (processes it started killed by pid, namespaces deleted, which
deletes their veths and the bridge) on leaving the ``with`` block normally or by an exception, on
SIGINT/SIGTERM (the handlers raise SystemExit inside the block, so the exit path runs; signals are
blocked while the lab is set up or torn down so that neither is left half done), and at interpreter exit
(atexit) if it is still up. Lab names carry the owning process id (``fmflab<pid>-...``): a new lab first
deletes the namespaces of labs whose owner no longer runs (a crash, SIGKILL), and never those of a lab
that is alive (another test or benchmark running at the same time).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from typing import Dict, List, Optional, Sequence

__all__ = ["NetLab", "LabUnavailable", "LabError", "lab_unavailable_reason", "lab_namespaces",
           "cleanup_stale", "PREFIX", "SUBNET", "rank_address"]

PREFIX = "fmflab"                   # every lab's namespace names start with this + the owner's pid
SUBNET = "10.213.0"                 # /24, private (RFC 1918); exists only inside the lab's namespaces
IFNAME = "eth0"                     # each rank's lab interface (the same name in every rank namespace)
MAX_RANKS = 16
_CMD_TIMEOUT_S = 30


class LabUnavailable(RuntimeError):
    """This machine cannot host the lab (not root, no ``ip netns``, no ``tc``/tbf, no veth/bridge)."""


class LabError(RuntimeError):
    """Setting up, using or tearing down the lab failed."""


def rank_address(rank: int) -> str:
    return f"{SUBNET}.{rank + 1}"


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = _CMD_TIMEOUT_S) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def lab_namespaces(prefix: str = PREFIX) -> List[str]:
    """Names of the network namespaces of every lab on this machine (alive or stale)."""
    if shutil.which("ip") is None:
        return []
    proc = _run(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    return [n for n in names if re.fullmatch(rf"{re.escape(prefix)}\d+-(sw|r\d+|probe)", n)]


def _owner(ns: str, prefix: str = PREFIX) -> int:
    return int(re.match(rf"{re.escape(prefix)}(\d+)-", ns).group(1))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace_pids(ns: str) -> None:
    """Kill (by pid) the processes still inside a lab namespace: only lab ranks ever run there."""
    proc = _run(["ip", "netns", "pids", ns], check=False)
    pids = [int(p) for p in proc.stdout.split() if p.isdigit() and int(p) != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = [p for p in pids if _alive(p)]
        for p in live:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 3.0
        while live and time.monotonic() < deadline:
            live = [p for p in live if _alive(p) and not _zombie(p)]
            time.sleep(0.05)
        if not live:
            return


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _delete_namespace(ns: str) -> None:
    _kill_namespace_pids(ns)
    _run(["ip", "netns", "delete", ns], check=False)


def cleanup_stale(prefix: str = PREFIX) -> List[str]:
    """Delete the namespaces of labs whose owning process no longer runs; returns their names."""
    stale = [ns for ns in lab_namespaces(prefix) if _owner(ns, prefix) != os.getpid() and not _alive(_owner(ns, prefix))]
    for ns in stale:
        _delete_namespace(ns)
    return stale


def lab_unavailable_reason() -> Optional[str]:
    """None when this machine can host the lab, else why not (checked by doing it: a probe namespace with
    a veth pair, a bridge and a tbf qdisc, deleted again)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the network lab needs root (network namespaces, veth, tc); run it as root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    steps = [["ip", "netns", "add", probe],
             ["ip", "-n", probe, "link", "add", "pa", "type", "veth", "peer", "name", "pb"],
             ["ip", "-n", probe, "link", "add", "br0", "type", "bridge"],
             ["ip", "-n", probe, "link", "set", "pb", "master", "br0"],
             ["tc", "-n", probe, "qdisc", "replace", "dev", "pa", "root", "tbf", "rate", "100mbit", "burst", "128kb",
              "latency", "50ms"]]
    try:
        for argv in steps:
            try:
                proc = _run(argv, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"`{' '.join(argv)}` could not run: {exc}"
            if proc.returncode != 0:
                return (f"`{' '.join(argv)}` failed (exit {proc.returncode}): "
                        f"{(proc.stderr or proc.stdout).strip()}")
    finally:
        _run(["ip", "netns", "delete", probe], check=False)
    return None


def _tbf_args(rate_gbps: float) -> List[str]:
    """tbf for ``rate_gbps`` Gb/s. The bucket holds at least 256 KiB (several of veth's 64 KiB GSO
    packets, so tbf never has to segment one, and the timer is not asked for sub-ms refills at 10 Gb/s)
    or 1 ms at the rate; 50 ms of queue before tail drop (the senders are TCP: they back off)."""
    rate_Bps = rate_gbps * 1e9 / 8
    burst = max(256 * 1024, int(rate_Bps * 1e-3))
    return ["tbf", "rate", f"{int(round(rate_gbps * 1e9))}bit", "burst", str(burst), "latency", "50ms"]


class NetLab:
    """N rank namespaces + a switch namespace, per-link tbf rate limits; a context manager.

    Args:
        n: number of ranks (namespaces), 2 by default; more ranks than cores is allowed and reported as
            ``oversubscribed`` (the ranks then also compete for the CPUs, which a real cluster does not).
        rate_gbps: per-link, per-direction rate in Gb/s (10^9 bit/s); None: no rate limit (veth speed).
        prefix: namespace name prefix (NOTE [lab teardown]); the owner's pid is appended.
    """

    def __init__(self, n: int = 2, rate_gbps: Optional[float] = 1.0, *, prefix: str = PREFIX):
        if not isinstance(n, int) or not 2 <= n <= MAX_RANKS:
            raise ValueError(f"n (ranks) must be an int in [2, {MAX_RANKS}], got {n!r}")
        if rate_gbps is not None and not (isinstance(rate_gbps, (int, float)) and rate_gbps > 0):
            raise ValueError(f"rate_gbps must be > 0 Gb/s or None, got {rate_gbps!r}")
        if not re.fullmatch(r"[a-z]{1,12}", prefix):
            raise ValueError(f"prefix must be 1-12 lowercase letters, got {prefix!r}")
        self.n = n
        self.rate_gbps = rate_gbps
        self.prefix = prefix
        self.tag = f"{prefix}{os.getpid()}"
        self.switch = f"{self.tag}-sw"
        self.namespaces = [f"{self.tag}-r{k}" for k in range(n)]
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.oversubscribed = n > self.cores
        self.stale_removed: List[str] = []
        self._up = False
        self._procs: List[subprocess.Popen] = []
        self._old_handlers: Dict[int, object] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "NetLab":
        self.setup()
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def setup(self) -> "NetLab":
        reason = lab_unavailable_reason()
        if reason is not None:
            raise LabUnavailable(f"network lab unavailable: {reason}")
        with _signals_blocked():
            self.stale_removed = cleanup_stale(self.prefix)
            if any(ns in lab_namespaces(self.prefix) for ns in [self.switch] + self.namespaces):
                raise LabError(f"lab namespaces {self.tag}-* already exist (a second lab in the same process?)")
            self._up = True                   # from here on, teardown has something to remove
            atexit.register(self.teardown)
            self._install_signal_handlers()
            try:
                self._build()
            except BaseException:
                self.teardown()
                raise
        return self

    def _build(self) -> None:
        _run(["ip", "netns", "add", self.switch])
        sw = ["ip", "-n", self.switch]
        _run(sw + ["link", "add", "br0", "type", "bridge"])
        _run(sw + ["link", "set", "lo", "up"])
        self._quiet(self.switch)
        for k, ns in enumerate(self.namespaces):
            _run(["ip", "netns", "add", ns])
            self._quiet(ns)
            # both ends created inside their namespaces (NOTE [lab isolation])
            _run(["ip", "-n", ns, "link", "add", IFNAME, "type", "veth", "peer", "name", f"p{k}", "netns", self.switch])
            _run(sw + ["link", "set", f"p{k}", "master", "br0"])
            _run(sw + ["link", "set", f"p{k}", "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{rank_address(k)}/24", "dev", IFNAME])
            _run(["ip", "-n", ns, "link", "set", IFNAME, "up"])
        _run(sw + ["link", "set", "br0", "up"])
        if self.rate_gbps is not None:
            self.set_rate(self.rate_gbps)
        self._wait_links()

    def _quiet(self, ns: str) -> None:
        """No IPv6 in the lab (no router solicitations, no duplicate-address-detection wait): IPv4 only."""
        for key in ("net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.default.disable_ipv6"):
            _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"{key}=1"], check=False)

    def _wait_links(self, timeout_s: float = 10.0) -> None:
        """Until every link is up at both ends (carrier) and every bridge port forwards."""
        deadline = time.monotonic() + timeout_s
        while True:
            down = []
            for k, ns in enumerate(self.namespaces):
                for where, dev in ((ns, IFNAME), (self.switch, f"p{k}")):
                    info = json.loads(_run(["ip", "-n", where, "-j", "link", "show", "dev", dev]).stdout or "[{}]")[0]
                    if info.get("operstate") not in ("UP", "UNKNOWN") or "LOWER_UP" not in info.get("flags", []):
                        down.append(f"{where}/{dev} ({info.get('operstate')})")
            ports = json.loads(_run(["bridge", "-n", self.switch, "-j", "link", "show"], check=False).stdout or "[]") \
                if shutil.which("bridge") else []
            down += [f"bridge port {p.get('ifname')} ({p.get('state')})" for p in ports
                     if p.get("state") not in (None, "forwarding")]
            if not down:
                return
            if time.monotonic() > deadline:
                raise LabError(f"lab links not up after {timeout_s:.0f} s: {', '.join(down)}")
            time.sleep(0.05)

    def teardown(self) -> None:
        """Kill the processes the lab started, delete its namespaces (and with them the veths and the bridge).
        Idempotent; safe from atexit and from a signal handler's exit path."""
        with self._lock, _signals_blocked():
            if not self._up:
                return
            for p in self._procs:
                if p.poll() is None:
                    p.kill()
            for p in self._procs:
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            for ns in self.namespaces + [self.switch]:
                _delete_namespace(ns)
            self._up = False
            self._restore_signal_handlers()
            try:
                atexit.unregister(self.teardown)
            except Exception:
                pass
        left = self.leftovers()
        if left:
            raise LabError(f"lab teardown left behind: {left}")

    def leftovers(self) -> List[str]:
        """This lab's namespaces that still exist (empty after a clean teardown)."""
        return [ns for ns in lab_namespaces(self.prefix) if ns.startswith(self.tag + "-")]

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return                                  # signal handlers can only live in the main thread

        def handler(signum, _frame):
            # an exception here unwinds through the `with` block, whose exit tears the lab down
            raise SystemExit(128 + signum)

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old_handlers.clear()

    # ------------------------------------------------------------------ links
    def set_rate(self, rate_gbps: Optional[float]) -> None:
        """Per-link, per-direction rate on every link (both veth ends); None removes the limit."""
        if rate_gbps is not None and not rate_gbps > 0:
            raise ValueError(f"rate_gbps must be > 0 Gb/s or None, got {rate_gbps!r}")
        self._require_up()
        for k, ns in enumerate(self.namespaces):
            for where, dev in ((ns, IFNAME), (self.switch, f"p{k}")):
                if rate_gbps is None:
                    _run(["tc", "-n", where, "qdisc", "del", "dev", dev, "root"], check=False)
                else:
                    _run(["tc", "-n", where, "qdisc", "replace", "dev", dev, "root"] + _tbf_args(rate_gbps))
        self.rate_gbps = rate_gbps

    def qdiscs(self, rank: int) -> Dict[str, dict]:
        """The root qdisc of rank ``rank``'s link as the kernel reports it (``tc -j qdisc show``), both ends:
        ``{"send": {...}, "receive": {...}}``; each has ``kind`` and, for tbf, ``rate_bps`` (bit/s)."""
        self._require_up()
        out = {}
        for side, where, dev in (("send", self.namespaces[rank], IFNAME), ("receive", self.switch, f"p{rank}")):
            proc = _run(["tc", "-n", where, "-j", "qdisc", "show", "dev", dev])
            roots = [q for q in json.loads(proc.stdout or "[]") if q.get("root")]
            q = roots[0] if roots else {}
            opts = q.get("options", {})
            out[side] = {"kind": q.get("kind"), "handle": q.get("handle"), "options": opts,
                         "rate_bps": 8 * opts["rate"] if "rate" in opts else None}
        return out

    def _require_up(self) -> None:
        if not self._up:
            raise LabError("the lab is not set up (use `with NetLab(...) as lab:` or lab.setup())")

    # ------------------------------------------------------------------ ranks
    def rank_env(self, rank: int, *, port: int, threads: Optional[int] = None) -> Dict[str, str]:
        """Environment of rank ``rank``: GLOO_SOCKET_IFNAME, the torch.distributed env:// variables (rank 0's
        lab address as MASTER_ADDR) and, with ``threads``, OMP_NUM_THREADS."""
        if not 0 <= rank < self.n:
            raise ValueError(f"rank must be in [0, {self.n}), got {rank!r}")
        env = dict(os.environ, GLOO_SOCKET_IFNAME=IFNAME, MASTER_ADDR=rank_address(0), MASTER_PORT=str(port),
                   RANK=str(rank), WORLD_SIZE=str(self.n), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   FUSEDMF_NETLAB=self.tag)
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        return env

    def command(self, rank: int, argv: Sequence[str]) -> List[str]:
        """``argv`` run inside rank ``rank``'s namespace (``ip netns exec``)."""
        return ["ip", "netns", "exec", self.namespaces[rank]] + list(argv)

    def spawn(self, rank: int, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
        """Start ``argv`` in rank ``rank``'s namespace; the lab kills it (by pid) at teardown if still running."""
        self._require_up()
        proc = subprocess.Popen(self.command(rank, argv), **popen_kwargs)
        self._procs.append(proc)
        return proc

    def describe(self) -> dict:
        return {"ranks": self.n, "namespaces": list(self.namespaces), "switch_namespace": self.switch,
                "topology": "star: one veth per rank to a bridge in the switch namespace",
                "addresses": {ns: rank_address(k) + "/24" for k, ns in enumerate(self.namespaces)},
                "interface": IFNAME, "rate_gbps_per_link_per_direction": self.rate_gbps,
                "shaper": (f"tc {' '.join(_tbf_args(self.rate_gbps))} on both veth ends" if self.rate_gbps else "none"),
                "cores": self.cores, "oversubscribed": self.oversubscribed,
                "latency": "not shaped (no netem in this kernel): the veth/bridge path's own"}


class _signals_blocked:
    """Block SIGINT/SIGTERM in this thread for the duration (delivered right after)."""

    _SIGS = {signal.SIGINT, signal.SIGTERM}

    def __enter__(self):
        self._old = signal.pthread_sigmask(signal.SIG_BLOCK, self._SIGS) if hasattr(signal, "pthread_sigmask") else None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._old)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m fusedmf.bench.netlab [--ranks N] [--rate GBPS] [--cleanup]``: check, set up and show a lab
    (held until Ctrl-C), or remove stale labs."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m fusedmf.bench.netlab", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--rate", type=float, default=1.0, help="Gb/s per link and direction")
    ap.add_argument("--check", action="store_true", help="only say whether the lab can run here")
    ap.add_argument("--cleanup", action="store_true", help="delete the namespaces of labs whose owner is gone")
    args = ap.parse_args(argv)
    if args.cleanup:
        print("removed:", cleanup_stale() or "nothing")
        return 0
    reason = lab_unavailable_reason()
    if args.check or reason:
        print("network lab: " + (f"unavailable: {reason}" if reason else "available"))
        return 0 if reason is None else 1
    with NetLab(args.ranks, args.rate) as lab:
        print(json.dumps(lab.describe(), indent=1))
        for k in range(lab.n):
            print(k, lab.qdiscs(k))
        print("lab up; Ctrl-C tears it down")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
