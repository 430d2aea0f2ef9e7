"""The lab's uplink switch: make the internet host (and so the package mirror) slow.

Real clusters sit behind slow uplinks (a reviewer reproduced bugs "on a lab
with a 4 Mbit/s uplink"), and every safety timer of homeclust has to survive a
download that takes longer than it.  ``Lab.set_uplink("4mbit", delay_ms=100)``
makes the lab's internet host that slow:

* **rate**: a ``tbf`` qdisc on both ends of the internet host's cable -- its
  ``eth0`` (everything the internet host sends to the institute network:
  packages, DNS and DHCP answers, the what-is-my-address page) and the
  switch's ``inet0`` port (everything sent to the internet host).  Both live
  in namespaces the lab owns; the machine's own namespace is never touched.
* **delay**: ``netem`` would be the tool, but kernels without
  ``CONFIG_NET_SCH_NETEM`` (this project's test machine is one) refuse it
  inside any namespace.  So the delay is added where it matters, by the
  archive relay (aptcache.py): every relayed response waits ``delay_ms``
  before its first byte, like a mirror that far away.  Pipelined requests
  each pay it, so this errs on the slow side -- which is the point.

The setting is recorded in the lab's ``run/uplink.json`` (read by the relay
for the delay and by ``lab status``); ``lab status`` also reads the qdiscs
back from the kernel, so a lost shaper shows.

Everything but :func:`apply_uplink` and :func:`read_shaping` is pure.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from homeclust.errors import LabError
from homeclust.lab.plan import INTERNET_SWITCH_PORT, LabPlan
from homeclust.lab.system import run

# tc's rate units (tc(8) "RATES"): bits or bytes per second, decimal or binary.
_RATE_UNITS = {
    "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
    "kibit": 2**10, "mibit": 2**20, "gibit": 2**30, "tibit": 2**40,
    "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9, "tbps": 8 * 10**12,
    "kibps": 8 * 2**10, "mibps": 8 * 2**20, "gibps": 8 * 2**30, "tibps": 8 * 2**40,
}
_DELAY_UNITS = {"ms": 1, "s": 1000, "": 1}

MIN_RATE = 8_000  # 8 kbit/s: below that even DHCP and DNS give up
MAX_DELAY_MS = 60_000

# tbf parameters.  The bucket must hold at least one full frame (and veth hands
# tbf GSO super-frames, which tbf re-segments when they exceed it); 10 ms worth
# of the rate keeps bursts short on fast settings.  The queue holds half a
# second, as a home router's does (bufferbloat included): deeper would only
# add latency, shallower would make TCP lose packets and fall below the rate.
MIN_BURST = 16 * 1024
BURST_SECONDS = 0.01
QUEUE_SECONDS = 0.5


@dataclass(frozen=True)
class Uplink:
    """One uplink setting: ``rate_bps`` None means unlimited."""

    rate_bps: int | None = None
    delay_ms: int = 0

    @property
    def limited(self) -> bool:
        return self.rate_bps is not None or self.delay_ms > 0

    def describe(self) -> str:
        if not self.limited:
            return "unlimited"
        parts = [format_rate(self.rate_bps) + " each way" if self.rate_bps else "full speed"]
        if self.delay_ms:
            parts.append(f"+{self.delay_ms} ms before each archive response")
        return ", ".join(parts)

    def to_json(self) -> str:
        return json.dumps({"rate_bps": self.rate_bps, "delay_ms": self.delay_ms}) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Uplink:
        """Read ``run/uplink.json``; anything unreadable is the unlimited uplink."""
        try:
            data: Any = json.loads(text)
            rate = data.get("rate_bps")
            delay = int(data.get("delay_ms") or 0)
        except (ValueError, AttributeError, TypeError):
            return cls()
        return cls(int(rate) if rate else None, max(0, delay))


def parse_rate(text: str) -> int:
    """A tc-style rate ("4mbit", "512kbit", "1.5mbit", "100kbps") in bits per second.

    A unit is required: tc reads a bare number as *bytes* per second, which is
    never what someone typing "4" for "4 Mbit/s" means.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*", text)
    if not match or match.group(2).lower() not in _RATE_UNITS:
        raise LabError(
            f"bad uplink rate {text!r}",
            hint="a number with a tc unit, e.g. 4mbit, 512kbit, 1gbit, 100kbps (bytes/s)",
        )
    bps = int(float(match.group(1)) * _RATE_UNITS[match.group(2).lower()])
    if bps < MIN_RATE:
        raise LabError(f"uplink rate {text!r} is below {format_rate(MIN_RATE)}",
                       hint="the lab's DHCP and DNS would stop working")
    return bps


def parse_delay(text: str) -> int:
    """A delay ("100ms", "1.5s", "250") in milliseconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|)\s*", text.lower())
    if not match:
        raise LabError(f"bad uplink delay {text!r}", hint="e.g. 100ms or 1s")
    delay = round(float(match.group(1)) * _DELAY_UNITS[match.group(2)])
    if delay > MAX_DELAY_MS:
        raise LabError(f"uplink delay {text!r} is above {MAX_DELAY_MS // 1000} s")
    return delay


def make_uplink(rate: str | None, delay_ms: int = 0) -> Uplink:
    """Validate ``Lab.set_uplink``'s arguments."""
    if delay_ms < 0 or delay_ms > MAX_DELAY_MS:
        raise LabError(f"uplink delay {delay_ms} ms is outside 0-{MAX_DELAY_MS} ms")
    return Uplink(parse_rate(rate) if rate is not None else None, delay_ms)


def format_rate(bps: int | None) -> str:
    if bps is None:
        return "unlimited"
    for unit, size in (("Gbit/s", 10**9), ("Mbit/s", 10**6), ("kbit/s", 10**3)):
        if bps >= size:
            value = bps / size
            return f"{value:g} {unit}" if value == int(value) else f"{value:.2f} {unit}"
    return f"{bps} bit/s"


def tbf_parameters(rate_bps: int) -> tuple[int, int]:
    """(burst, limit) in bytes for a tbf of ``rate_bps``."""
    rate_bytes = rate_bps / 8
    burst = max(MIN_BURST, int(rate_bytes * BURST_SECONDS))
    limit = max(3 * burst, int(rate_bytes * QUEUE_SECONDS))
    return burst, limit


def uplink_ports(plan: LabPlan) -> list[tuple[str, str]]:
    """(namespace, device) of both ends of the internet host's cable."""
    return [(plan.internet_netns, "eth0"), (plan.switch_netns, INTERNET_SWITCH_PORT)]


def tc_commands(netns: str, device: str, uplink: Uplink, shaped_now: bool) -> list[list[str]]:
    """The tc commands that give ``device`` in ``netns`` the uplink's rate.

    ``shaped_now``: whether the device has our tbf at the moment (deleting a
    root qdisc that is not there is an error, so "off" must know).
    """
    tc = ["tc", "-netns", netns, "qdisc"]
    if uplink.rate_bps is None:
        return [[*tc, "del", "dev", device, "root"]] if shaped_now else []
    burst, limit = tbf_parameters(uplink.rate_bps)
    return [[*tc, "replace", "dev", device, "root", "tbf", "rate", f"{uplink.rate_bps}bit",
             "burst", str(burst), "limit", str(limit)]]


def parse_tbf_rate(tc_json: str) -> int | None:
    """The root tbf's rate in bits/s from ``tc -j qdisc show dev DEV``, or None."""
    try:
        qdiscs = json.loads(tc_json or "[]")
    except ValueError:
        return None
    for qdisc in qdiscs if isinstance(qdiscs, list) else []:
        if isinstance(qdisc, dict) and qdisc.get("kind") == "tbf" and qdisc.get("root"):
            rate = (qdisc.get("options") or {}).get("rate")
            if isinstance(rate, int):
                return rate * 8  # tc -j reports bytes per second
    return None


# --------------------------------------------------------------------------
# I/O: the lab's own namespaces only
# --------------------------------------------------------------------------


def read_shaping(plan: LabPlan) -> dict[str, int | None]:
    """What the kernel says: "namespace:device" -> tbf rate in bits/s (None: unshaped)."""
    found: dict[str, int | None] = {}
    for netns, device in uplink_ports(plan):
        shown = run(["tc", "-netns", netns, "-j", "qdisc", "show", "dev", device], check=False)
        found[f"{netns}:{device}"] = parse_tbf_rate(shown.stdout) if shown.returncode == 0 else None
    return found


def apply_uplink(plan: LabPlan, record: Path, uplink: Uplink) -> None:
    """Shape both ends of the internet host's cable and record the setting."""
    now = read_shaping(plan)
    for netns, device in uplink_ports(plan):
        # Never anything but the lab's own namespaces: the machine's network is not ours.
        if netns not in plan.namespaces:
            raise LabError(f"refusing to shape {device} outside the lab (namespace {netns})")
        for argv in tc_commands(netns, device, uplink, now[f"{netns}:{device}"] is not None):
            run(argv)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(uplink.to_json())
    tmp.replace(record)


def recorded_uplink(record: Path) -> Uplink:
    try:
        return Uplink.from_json(record.read_text())
    except OSError:
        return Uplink()
