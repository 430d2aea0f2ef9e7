"""Open MPI's configuration files and the check's MPI program (pure).

* ``openmpi-mca-params.conf`` (Open MPI's system-wide parameters, in the
  platform's sysconfdir): a managed block pins the TCP byte-transfer layer
  (``btl_tcp_if_include``) and the runtime's out-of-band channel
  (``oob_tcp_if_include``) to the private network.  The master has two
  interfaces; unpinned, Open MPI offers and tries the public one too.  The
  rest of the file is the distribution's and stays as it is; an assignment of
  one of these keys (or of the ``*_if_exclude`` keys, which Open MPI refuses
  together with ``*_if_include``) elsewhere in the file is commented out, so
  the file says one thing.
* ``openmpi-default-hostfile``: every compute node with its slots, so
  ``mpirun -np N prog`` spans the cluster without ``--hostfile``.  The same
  list goes to each cluster user's ``~/hostfile``, as the guide does.  (Open
  MPI ignores the default hostfile inside a batch job: the scheduler decides.)
* ``/etc/profile.d/homeclust-mpi.sh`` where Open MPI is off the default paths
  (RHEL's ``/usr/lib64/openmpi``).
* The check's program: mpi4py, one rank per node, an 8 MiB exchange in both
  directions between rank 0 (the master) and every other rank, verified.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Network

from homeclust.inventory import Inventory
from homeclust.render.blocks import split_block

MCA_BEGIN = "# BEGIN homeclust (mpi step): MPI traffic stays on the private network"
MCA_END = "# END homeclust"
#: Keys the block sets, and keys Open MPI refuses alongside them.
MCA_KEYS = ("btl_tcp_if_include", "oob_tcp_if_include")
MCA_CONFLICTING = ("btl_tcp_if_exclude", "oob_tcp_if_exclude")
DISABLED_PREFIX = "# disabled by homeclust (its block sets the TCP interfaces): "

PROFILE_PATH = "/etc/profile.d/homeclust-mpi.sh"
CHECK_PROGRAM_PATH = "/usr/local/libexec/homeclust/mpi-check.py"
#: Bytes each way between rank 0 and every other rank.
CHECK_BYTES = 8 * 1024 * 1024

_ASSIGNMENT_RE = re.compile(r"^\s*([A-Za-z0-9_]+)\s*=")


def render_mca_params(current: str | None, network: IPv4Network) -> str:
    """The parameter file with homeclust's block; other settings kept as they are."""
    managed = set(MCA_KEYS) | set(MCA_CONFLICTING)

    def disable(lines: list[str]) -> list[str]:
        out = []
        for line in lines:
            match = _ASSIGNMENT_RE.match(line)
            out.append(DISABLED_PREFIX + line.strip() if match and match.group(1) in managed
                       else line)
        return out

    before, inside, after = split_block(current, MCA_BEGIN, MCA_END)
    block = [MCA_BEGIN, *(f"{key} = {network}" for key in MCA_KEYS), MCA_END]
    if inside is None:
        # Appended: the file's last line may have had no newline; now every line has one.
        return "\n".join([*disable(before), *block]) + "\n"
    return "\n".join([*disable(before), *block, *disable(after)]) + "\n"


def hostfile_lines(inventory: Inventory) -> list[str]:
    """``NAME slots=N`` for every compute node (the master only with ``compute = true``)."""
    return [f"{n.name} slots={n.slots}" for n in inventory.nodes if n.compute]


def render_hostfile(inventory: Inventory) -> str:
    return "\n".join([
        "# Managed by homeclust (mpi step): every compute node of the inventory and its",
        "# slots. mpirun uses this list when no --hostfile or --host is given (not inside",
        "# a batch job, where the scheduler decides).",
        *hostfile_lines(inventory),
    ]) + "\n"


def render_user_hostfile(inventory: Inventory) -> str:
    return "\n".join([
        "# Written by homeclust (mpi step), like the guide's ~/hostfile:",
        "#   mpirun --hostfile ~/hostfile -np N prog",
        "# The same hosts are Open MPI's default, so --hostfile can be left out.",
        *hostfile_lines(inventory),
    ]) + "\n"


def render_profile(prefix: str | None) -> str | None:
    """Login-shell environment for Open MPI off the default paths (None: not needed).

    On RHEL, ``/etc/bashrc`` (read through ``~/.bashrc`` by the non-interactive
    bash that ``mpirun`` starts over SSH) sources ``/etc/profile.d`` as well, so
    the remote ``orted`` is found too.
    """
    if prefix is None:
        return None
    return (
        "# Managed by homeclust (mpi step): Open MPI lives off the default paths here.\n"
        "# Login shells read this file; on this platform /etc/bashrc also reads it for\n"
        "# other bash shells, including the non-interactive ones mpirun starts over SSH.\n"
        f'case ":${{PATH}}:" in *":{prefix}/bin:"*) ;; '
        f'*) PATH="{prefix}/bin${{PATH:+:$PATH}}"; export PATH ;; esac\n'
        f'case ":${{LD_LIBRARY_PATH:-}}:" in *":{prefix}/lib:"*) ;; '
        f'*) LD_LIBRARY_PATH="{prefix}/lib${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}"; '
        "export LD_LIBRARY_PATH ;; esac\n"
    )


#: The check's MPI program.  Python 2.7 and 3 (CentOS 7's mpi4py is Python 2 only);
#: finds mpi4py where RHEL installs it per MPI (``site-packages/openmpi``).
CHECK_PROGRAM = f'''\
# Managed by homeclust (mpi step): the MPI check of `homeclust check`.
# One rank per node. Rank 0 sends {CHECK_BYTES} bytes to every other rank and gets
# as many back, each side checks every byte; then every rank reports its host.
from __future__ import print_function

import os
import sys
import sysconfig
import time

try:
    from mpi4py import MPI
except ImportError:
    sys.path.insert(0, os.path.join(sysconfig.get_path("platlib"), "openmpi"))
    from mpi4py import MPI

SIZE = {CHECK_BYTES}


def pattern(seed):
    block = bytearray(range(256))
    seed %= 256
    return (block[seed:] + block[:seed]) * (SIZE // 256)


comm = MPI.COMM_WORLD
rank = comm.Get_rank()
size = comm.Get_size()
host = MPI.Get_processor_name()
failures = 0
if rank == 0:
    for peer in range(1, size):
        incoming = bytearray(SIZE)
        started = time.time()
        comm.Sendrecv([pattern(peer), MPI.BYTE], dest=peer, sendtag=1,
                      recvbuf=[incoming, MPI.BYTE], source=peer, recvtag=2)
        seconds = time.time() - started
        ok = incoming == pattern(1000 + peer)
        failures += 0 if ok else 1
        print("exchange %d %s %d %.3f" % (peer, "ok" if ok else "corrupt", SIZE, seconds))
else:
    incoming = bytearray(SIZE)
    comm.Recv([incoming, MPI.BYTE], source=0, tag=1)
    if incoming != pattern(rank):
        failures += 1
    comm.Send([pattern(1000 + rank), MPI.BYTE], dest=0, tag=2)
hosts = comm.gather(host, root=0)
failures = comm.allreduce(failures)
if rank == 0:
    for index, name in enumerate(hosts):
        print("rank %d %s" % (index, name))
    print("result %s" % ("ok" if failures == 0 else "failed"))
    sys.stdout.flush()
sys.exit(1 if failures else 0)
'''
