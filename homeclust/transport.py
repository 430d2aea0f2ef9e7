"""SSH transport: one connection to the master, every worker tunnelled through it.

* The master is reached directly; each worker is a ``fabric.Connection`` whose
  ``gateway`` is the master's connection, so all worker channels are
  multiplexed over one TCP connection (no ``MaxStartups`` trouble on the
  master's sshd, one authentication).  The master is opened before fanning
  out: opening a shared gateway from several threads at once is a known fabric
  failure ("No existing session").
* Host keys are pinned trust-on-first-use in homeclust's own known_hosts file
  (one per cluster); a changed key is refused with a message saying how to
  accept it deliberately.  A first-use pin is shown to the admin with its
  fingerprint; the file is changed under a lock and re-read first, so runs at
  the same time never drop each other's pins.
* Every wait is bounded: TCP connect, SSH banner, authentication, channel
  open (paramiko's default is an hour) and each command.
* Connecting is retried with tenacity (bounded, one log line per retry);
  authentication failures and changed host keys are never retried.
* Commands are shell scripts sent on stdin to ``sh -s`` (through ``sudo -n``
  when the login user is not root), so a step's whole batch is one round trip.
  The host enforces each command's time limit itself (``timeout``): a command
  homeclust gave up on never keeps running there.
* A run can be cancelled (Ctrl-C, SIGTERM): waits notice within a fraction of
  a second; only commands marked not interruptible (a rollback) run on.
* The run lock on the master is an ``flock`` held by an open SSH session, so a
  dead run never leaves a stale lock; a *claim* (run id + expiry) keeps it for
  its run while a guarded change replaces the master's connection.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import logging
import os
import select
import shlex
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import paramiko
import tenacity
from fabric import Connection

from homeclust.errors import ApplyError, ConnectError, HostKeyChangedError, Interrupted, LockError
from homeclust.inventory import Inventory, Node

log = logging.getLogger("homeclust.ssh")

KEEPALIVE_SECONDS = 15
#: Seconds the admin side waits beyond a command's own limit (enforced on the host)
#: before it gives up on the answer.
TIMEOUT_MARGIN = 15.0
#: Exit code of ``timeout`` when it stopped a command.
TIMED_OUT = 124


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str
    duration: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class Host(Protocol):
    """A connected host: what the runner, the safety net and the checks use."""

    node: Node

    def run(self, script: str, *, timeout: float | None = None,
            interruptible: bool = True) -> CommandResult: ...

    def hold_lock(self, path: str, owner: str, run_id: str, *, wait: float = 0.0
                  ) -> LockHandle: ...

    def close(self) -> None: ...


class LockHandle(Protocol):
    def release(self) -> None: ...


class Connector(Protocol):
    """Opens hosts: ``open`` reuses a live connection, ``reopen`` makes a new one.

    ``cancel`` is set when the run is interrupted: waits end early with
    :class:`~homeclust.errors.Interrupted`.
    """

    cancel: threading.Event

    def open(self, node: Node) -> Host: ...

    def reopen(self, node: Node, *, within: float) -> Host: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- host keys


def fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class PinnedHostKeys:
    """Trust-on-first-use host keys in homeclust's own known_hosts file.

    Shared by every connection of a run; and the file is shared by every run: each change
    re-reads the file under an exclusive lock (``flock`` on ``known_hosts.lock``), makes its
    one change and replaces the file atomically -- so two runs pinning different hosts at
    once both keep their pins, and a host two runs meet for the first time at once is
    pinned by whichever comes first: the other is refused if it saw another key.
    A first-use pin is told to ``on_first_use`` (the admin's terminal), fingerprint and all.
    """

    def __init__(self, path: Path, on_first_use: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.on_first_use = on_first_use or (lambda message: None)
        self._lock = threading.Lock()
        self._keys = self._read()

    def _read(self) -> paramiko.HostKeys:
        keys = paramiko.HostKeys()
        if self.path.exists():
            try:
                keys.load(str(self.path))
            except (OSError, paramiko.SSHException) as exc:
                raise ConnectError(f"cannot read known_hosts file {self.path}: {exc}") from None
        return keys

    @contextlib.contextmanager
    def _file_locked(self) -> Iterator[paramiko.HostKeys]:
        """The file as it is now, while no other run can change it (thread lock held too)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield self._read()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _save(self, keys: paramiko.HostKeys) -> None:
        """Replace the file with ``keys`` atomically (call with the file locked)."""
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            os.close(fd)
            keys.save(tmp)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._keys = keys

    def install(self, client: paramiko.SSHClient, label: str) -> None:
        """Give ``client`` our pinned keys and the trust-on-first-use policy."""
        with self._lock:
            for hostname, keys in self._keys.items():
                for keytype, key in keys.items():
                    client.get_host_keys().add(hostname, keytype, key)
        client.set_missing_host_key_policy(_TrustOnFirstUse(self, label))

    def pinned(self, hostname: str) -> list[paramiko.PKey]:
        """The keys pinned for ``hostname`` (a :func:`pin_name`)."""
        with self._lock:
            found = self._keys.lookup(hostname)
            return list(found.values()) if found else []

    def replace(self, hostname: str, key: paramiko.PKey, label: str) -> None:
        """Pin ``key`` as the only key of ``hostname`` (a node reinstalled on purpose)."""
        with self._file_locked() as keys:
            keys.pop(hostname, None)
            keys.add(hostname, key.get_name(), key)
            self._save(keys)
        log.info("replaced the pinned host key of %s with %s %s in %s", label, key.get_name(),
                 fingerprint(key), self.path)

    def pin(self, hostname: str, key: paramiko.PKey, label: str) -> None:
        """Pin ``key`` for ``hostname`` on first use -- unless another run pinned another key
        for it meanwhile: then this connection is refused like a changed key."""
        with self._file_locked() as keys:
            found = keys.lookup(hostname)
            if found:
                self._keys = keys
                known = found.get(key.get_name())
                if known is not None and known.asbytes() == key.asbytes():
                    return  # another run pinned the very same key: nothing to say
                expected = known if known is not None else next(iter(found.values()))
                raise paramiko.BadHostKeyException(hostname, key, expected)
            keys.add(hostname, key.get_name(), key)
            self._save(keys)
        message = (f"{label}: first connection: pinned its host key {key.get_name()} "
                   f"{fingerprint(key)} ({hostname}, in {self.path}); compare it with "
                   f"`ssh-keygen -lf /etc/ssh/ssh_host_{_key_file(key)}_key.pub` on {label}'s "
                   "console -- from now on any other key is refused")
        log.info("%s", message)
        self.on_first_use(message)

    def changed_error(self, label: str, hostname: str, exc: paramiko.BadHostKeyException
                      ) -> HostKeyChangedError:
        return HostKeyChangedError(
            f"host key of {label} ({hostname}) has changed: pinned {exc.expected_key.get_name()} "
            f"{fingerprint(exc.expected_key)}, offered {exc.key.get_name()} "
            f"{fingerprint(exc.key)}; refusing to connect",
            hint=f"if {label} was reinstalled on purpose, accept its new key with "
            f"`homeclust accept-host-key {label}` (it shows the new fingerprint first; then "
            "`homeclust up` gives every node the new key)",
        )


def _key_file(key: paramiko.PKey) -> str:
    """The part of sshd's host key file name for ``key``'s type (``ed25519``, ``rsa``…)."""
    name = key.get_name()
    return ("ed25519" if "ed25519" in name else "ecdsa" if "ecdsa" in name
            else "rsa" if "rsa" in name else "dsa" if "dss" in name else "ed25519")


def pin_name(address: str, port: int) -> str:
    """The name a host's key is pinned under (OpenSSH's and paramiko's known_hosts form)."""
    return address if port == 22 else f"[{address}]:{port}"


class _TrustOnFirstUse(paramiko.MissingHostKeyPolicy):  # type: ignore[misc]
    def __init__(self, store: PinnedHostKeys, label: str) -> None:
        self.store = store
        self.label = label

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
                         ) -> None:
        self.store.pin(hostname, key, self.label)


# --------------------------------------------------------------------------- errors


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, ConnectError):
        return getattr(exc, "retryable", False)
    return False


class _RetryableConnectError(ConnectError):
    retryable = True


def describe_connect_failure(label: str, exc: BaseException, via: str | None) -> ConnectError:
    """Turn a paramiko/socket exception into a ConnectError with a useful message."""
    where = f"{label} (via {via})" if via else label
    if isinstance(exc, paramiko.ChannelException):
        if exc.code == 1:
            return ConnectError(
                f"{where}: the master refused to open a channel to the worker "
                "('administratively prohibited')",
                hint="the master's sshd has AllowTcpForwarding off; homeclust reaches the "
                "workers through it: set `AllowTcpForwarding yes` (at least for this user) in "
                "the master's /etc/ssh/sshd_config",
            )
        return _RetryableConnectError(
            f"{where}: the master could not connect to the worker's SSH port "
            f"({exc.text or 'connect failed'})",
            hint="is the worker powered on, wired to the private network, and sshd running?",
        )
    if isinstance(exc, paramiko.AuthenticationException):
        return ConnectError(
            f"{where}: authentication failed ({exc})",
            hint="check [ssh] user and key in the inventory, and that the public key is in "
            "the host's authorized_keys",
        )
    if isinstance(exc, paramiko.PasswordRequiredException):
        return ConnectError(f"{where}: the SSH key is encrypted ({exc})",
                            hint="use an unencrypted key for automation, or decrypt it")
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return _RetryableConnectError(f"{where}: timed out connecting")
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        return _RetryableConnectError(f"{where}: {exc.strerror or exc}")
    if isinstance(exc, (OSError, EOFError, paramiko.SSHException)):
        return _RetryableConnectError(f"{where}: {exc or type(exc).__name__}")
    return ConnectError(f"{where}: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- hosts


class SshHost:
    """One authenticated SSH connection to a node (for workers: through the master)."""

    def __init__(self, node: Node, connection: Connection, *, sudo: bool,
                 command_timeout: float, channel_timeout: float,
                 cancel: threading.Event | None = None) -> None:
        self.node = node
        self.connection = connection
        self.sudo = sudo
        self.command_timeout = command_timeout
        self.channel_timeout = channel_timeout
        self.cancel = cancel or threading.Event()

    @property
    def transport(self) -> paramiko.Transport:
        transport = self.connection.transport
        if transport is None or not transport.is_active():
            raise ConnectError(f"{self.node.name}: the SSH connection is closed")
        return transport

    def is_alive(self) -> bool:
        transport = self.connection.transport
        return transport is not None and bool(transport.is_active())

    def _command(self, timeout: float) -> str:
        # $SSH_CONNECTION is expanded by the login shell before sudo strips the
        # environment; scripts read it as $1 (the firewall's lockout check needs it).
        # ``timeout`` makes the host stop the script at its limit, whether or not
        # we are still there to hear about it.
        shell = (f'timeout -k 10 {max(1, int(timeout))} sh -s -- "$SSH_CONNECTION"')
        return f"sudo -n -- {shell}" if self.sudo else shell

    def _open_channel(self, command: str) -> paramiko.Channel:
        """A session channel running ``command``; every wait bounded by channel_timeout."""
        try:
            channel = self.transport.open_session(timeout=self.channel_timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectError(f"{self.node.name}: cannot open a session: {exc}") from None
        # exec_command waits for the server's answer without a time limit: a server
        # that never answers would hang us.  Closing the channel ends that wait.
        watchdog = threading.Timer(self.channel_timeout, channel.close)
        watchdog.daemon = True
        watchdog.start()
        try:
            channel.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            channel.close()
            raise ConnectError(f"{self.node.name}: the server did not start the command "
                               f"within {self.channel_timeout:.0f} s: {exc}") from None
        finally:
            watchdog.cancel()
        return channel

    def run(self, script: str, *, timeout: float | None = None,
            interruptible: bool = True) -> CommandResult:
        """Run ``script`` with ``sh -s`` on the host and wait (bounded) for it."""
        timeout = timeout or self.command_timeout
        start = time.monotonic()
        if interruptible and self.cancel.is_set():
            raise Interrupted(f"{self.node.name}: interrupted")
        channel = self._open_channel(self._command(timeout))
        try:
            stdout, stderr, code = _pump(channel, script.encode(), start + timeout + TIMEOUT_MARGIN,
                                         self.cancel if interruptible else None)
        except TimeoutError:
            raise ApplyError(
                f"{self.node.name}: no answer within {timeout:.0f} s (the host stops the command "
                "by itself at that limit)") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectError(f"{self.node.name}: connection lost: {exc}") from None
        except Interrupted:
            raise Interrupted(f"{self.node.name}: interrupted while a command was running "
                              f"(the host stops it within {timeout:.0f} s at the latest)") from None
        finally:
            channel.close()
        text_err = stderr.decode("utf-8", "replace")
        if self.sudo and code == 1 and "sudo:" in text_err and "password" in text_err:
            raise ApplyError(
                f"{self.node.name}: sudo asks for a password",
                hint="homeclust needs passwordless sudo for the [ssh] user "
                "(e.g. `user ALL=(ALL) NOPASSWD: ALL` in /etc/sudoers.d/), or log in as root",
            )
        if code == TIMED_OUT:
            raise ApplyError(f"{self.node.name}: the command did not finish within "
                             f"{timeout:.0f} s and was stopped on the host:\n"
                             f"{stdout.decode('utf-8', 'replace')[-800:]}")
        return CommandResult(code, stdout.decode("utf-8", "replace"), text_err,
                             time.monotonic() - start)

    def hold_lock(self, path: str, owner: str, run_id: str, *, wait: float = 0.0
                  ) -> _ChannelLock:
        """Take the exclusive run lock on the host, held as long as a channel stays open.

        ``flock`` runs in a session that waits for our stdin to close; if this
        process dies or the connection drops, sshd closes the session and the
        kernel releases the lock -- no stale locks.  A *claim* file (see
        :func:`claim_script`) reserves the lock for one run while its guarded
        change replaces the master's connection: other runs are refused until
        it expires, the claiming run passes and removes it.
        """
        command = lock_command(path, owner, run_id, wait)
        if self.sudo:
            command = f"sudo -n -- sh -c {shlex.quote(command)}"
        channel = self._open_channel(command)
        deadline = time.monotonic() + self.channel_timeout + wait
        data = b""
        while not data.startswith(b"LOCKED\n"):
            if channel.recv_ready():
                data += channel.recv(4096)
            elif channel.exit_status_ready():
                while channel.recv_ready():
                    data += channel.recv(4096)
                break
            elif time.monotonic() > deadline:
                channel.close()
                raise ConnectError(f"{self.node.name}: no answer while taking the run lock")
            else:
                select.select([channel], [], [], 0.05)
        text = data.decode("utf-8", "replace")
        if text.startswith("LOCKED"):
            return _ChannelLock(channel)
        channel.close()
        first, _, rest = text.partition("\n")
        if first.startswith("BUSY"):
            raise LockError(
                f"another homeclust run holds the cluster lock on {self.node.name} "
                f"({rest.strip() or 'unknown'})",
                hint="wait for it to finish; the lock is released when that run's SSH "
                "connection closes",
            )
        if first.startswith("CLAIMED"):
            seconds = first.split()[-1]
            raise LockError(
                f"another homeclust run ({rest.strip() or 'unknown'}) is in the middle of a "
                f"guarded change on {self.node.name}; the lock is reserved for it for "
                f"{seconds} s more",
                hint="wait for it: if that run was interrupted, the host rolls the change back "
                "by itself before the reservation ends",
            )
        raise ConnectError(f"{self.node.name}: cannot take the run lock: {text.strip()}")

    def close(self) -> None:
        try:
            self.connection.close()
        except Exception:  # closing a broken connection must never mask the real error
            log.debug("error closing %s", self.node.name, exc_info=True)


def lock_command(path: str, owner: str, run_id: str, wait: float = 0.0) -> str:
    """The shell command that takes the run lock and holds it while stdin stays open.

    Prints ``LOCKED``; or ``BUSY`` and the holder; or ``CLAIMED <run> <seconds>``
    and the holder when another run's claim is still valid.
    """
    lock, info, claim = (shlex.quote(path + suffix) for suffix in ("", ".owner", ".claim"))
    inner = (
        f"now=$(date +%s); "
        f"if [ -f {claim} ]; then read run until < {claim}; "
        f"if [ \"$run\" != {shlex.quote(run_id)} ] && [ \"$now\" -lt \"${{until:-0}}\" ]; then "
        f"echo \"CLAIMED $run $((until - now))\"; cat {info} 2>/dev/null; exit 76; fi; "
        f"rm -f {claim}; fi; "
        f"printf '%s\\n' {shlex.quote(owner)} > {info}; echo LOCKED; exec cat >/dev/null"
    )
    how = f"-w {max(1, int(wait))}" if wait > 0 else "-n"
    return (
        f"flock {how} -E 75 {lock} sh -c {shlex.quote(inner)}; rc=$?; "
        f"if [ $rc = 75 ]; then echo BUSY; cat {info} 2>/dev/null; fi; exit $rc"
    )


def claim_script(path: str, run_id: str, seconds: int) -> str:
    """Reserve the run lock for ``run_id`` for ``seconds`` (written while holding it)."""
    claim = shlex.quote(path + ".claim")
    return (f"printf '%s %s\\n' {shlex.quote(run_id)} \"$(( $(date +%s) + {int(seconds)} ))\" "
            f"> {claim}.tmp && mv -f {claim}.tmp {claim}")


def unclaim_script(path: str, run_id: str) -> str:
    """Drop ``run_id``'s claim (only its own)."""
    claim = shlex.quote(path + ".claim")
    return (f"if [ -f {claim} ] && [ \"$(cut -d' ' -f1 {claim})\" = {shlex.quote(run_id)} ]; "
            f"then rm -f {claim}; fi; true")


class _ChannelLock:
    def __init__(self, channel: paramiko.Channel) -> None:
        self.channel = channel

    def release(self) -> None:
        try:
            self.channel.shutdown_write()
            self.channel.close()
        except Exception:
            log.debug("error releasing lock", exc_info=True)


def _pump(channel: paramiko.Channel, stdin: bytes, deadline: float,
          cancel: threading.Event | None = None) -> tuple[bytes, bytes, int]:
    """Feed ``stdin`` and collect stdout/stderr until the command exits or the deadline."""
    out: list[bytes] = []
    err: list[bytes] = []
    view = memoryview(stdin)
    sent = 0
    if not stdin:
        channel.shutdown_write()
    while True:
        progressed = False
        if sent < len(view) and channel.send_ready():
            sent += channel.send(view[sent:sent + 32768])
            progressed = True
            if sent >= len(view):
                channel.shutdown_write()
        while channel.recv_ready():
            out.append(channel.recv(65536))
            progressed = True
        while channel.recv_stderr_ready():
            err.append(channel.recv_stderr(65536))
            progressed = True
        # The exit status can arrive before the last output: finish only when the
        # server has also signalled end of output (or closed the channel).
        finished = channel.exit_status_ready() and (channel.eof_received or channel.closed)
        if finished and not channel.recv_ready() and not channel.recv_stderr_ready():
            return b"".join(out), b"".join(err), channel.recv_exit_status()
        if time.monotonic() > deadline:
            raise TimeoutError
        if cancel is not None and cancel.is_set():
            raise Interrupted("interrupted")
        if channel.closed and not channel.exit_status_ready():
            raise EOFError("channel closed before the command finished")
        if not progressed:
            select.select([channel], [], [], 0.05)


# --------------------------------------------------------------------------- connector


RetryLogger = Callable[[str], None]


class SshConnector:
    """Opens and caches the run's connections; master first, workers through it."""

    def __init__(self, inventory: Inventory, *, attempts: int = 3,
                 on_retry: RetryLogger | None = None,
                 on_first_use: Callable[[str], None] | None = None) -> None:
        self.inventory = inventory
        self.attempts = attempts
        self.on_retry = on_retry or (lambda message: log.warning("%s", message))
        self.keys = PinnedHostKeys(inventory.ssh.known_hosts, on_first_use or self.on_retry)
        self.cancel = threading.Event()
        self._hosts: dict[str, SshHost] = {}
        self._lock = threading.Lock()
        self._master_lock = threading.Lock()
        key = inventory.ssh.key
        if not key.exists():
            raise ConnectError(
                f"SSH key not found: {key}",
                hint="set [ssh] key in the inventory to the private key that logs in to the nodes",
            )

    # -- public API -------------------------------------------------------------

    def open(self, node: Node) -> SshHost:
        with self._lock:
            host = self._hosts.get(node.name)
        if host is not None and host.is_alive():
            return host
        host = self._connect_with_retries(node, stop=tenacity.stop_after_attempt(self.attempts))
        with self._lock:
            self._hosts[node.name] = host
        return host

    def reopen(self, node: Node, *, within: float) -> SshHost:
        """A brand-new connection (a new TCP connection for the master, a new channel
        and SSH session through the master for a worker), retried for ``within`` seconds.

        Used to prove a guarded change did not cut the admin off.  The new
        connection replaces the cached one.
        """
        with self._lock:
            old = self._hosts.pop(node.name, None)
        host = self._connect_with_retries(node, stop=tenacity.stop_after_delay(max(within, 1.0)))
        with self._lock:
            self._hosts[node.name] = host
        if old is not None:
            old.close()
            if node.is_master:
                # Worker connections rode on the old master connection.
                self._drop_workers()
        return host

    def offered_host_key(self, node: Node) -> paramiko.PKey:
        """The host key ``node``'s sshd offers now: read during the key exchange, before
        (and without) authenticating or trusting it.  Workers are asked through the
        master's (pinned) connection, as always."""
        ssh = self.inventory.ssh
        address, port = self.inventory.ssh_target(node)
        sock: Any
        try:
            if node.is_master:
                sock = socket.create_connection((address, port), timeout=ssh.connect_timeout)
            else:
                master = self._master()
                sock = master.transport.open_channel(
                    "direct-tcpip", (address, port), ("127.0.0.1", 0),
                    timeout=ssh.connect_timeout)
        except HostKeyChangedError:
            raise
        except Exception as exc:
            raise describe_connect_failure(node.name, exc, None if node.is_master
                                           else self.inventory.master.name) from None
        transport = paramiko.Transport(sock)
        transport.banner_timeout = ssh.connect_timeout
        try:
            transport.start_client(timeout=ssh.connect_timeout)
            key: paramiko.PKey = transport.get_remote_server_key()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectError(f"{node.name}: no host key offered: {exc}") from None
        finally:
            transport.close()
        return key

    def close(self) -> None:
        with self._lock:
            hosts = list(self._hosts.values())
            self._hosts.clear()
        # Workers first: they tunnel through the master.
        for host in sorted(hosts, key=lambda h: h.node.is_master):
            host.close()

    # -- internals --------------------------------------------------------------

    def _drop_workers(self) -> None:
        with self._lock:
            workers = [h for h in self._hosts.values() if not h.node.is_master]
            for h in workers:
                del self._hosts[h.node.name]
        for h in workers:
            h.close()

    def _master(self) -> SshHost:
        # Serialize: the gateway must be open before workers fan out over it.
        with self._master_lock:
            return self.open(self.inventory.master_node)

    def _connect_with_retries(self, node: Node, *, stop: Any) -> SshHost:
        label = node.name

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0
            self.on_retry(
                f"retrying connection to {label} in {wait:.1f} s "
                f"(attempt {state.attempt_number + 1}): {exc}"
            )

        def sleep(seconds: float) -> None:
            if self.cancel.wait(seconds):
                raise Interrupted(f"{label}: interrupted while reconnecting")

        retrying = tenacity.Retrying(
            stop=stop,
            wait=tenacity.wait_exponential(multiplier=0.5, max=5),
            retry=tenacity.retry_if_exception(_is_retryable),
            before_sleep=before_sleep,
            sleep=sleep,
            reraise=True,
        )
        return retrying(self._connect_once, node)

    def _connect_once(self, node: Node) -> SshHost:
        ssh = self.inventory.ssh
        address, port = self.inventory.ssh_target(node)
        gateway: Connection | None = None
        via: str | None = None
        if not node.is_master:
            master = self._master()
            gateway = master.connection
            via = master.node.name
            # Bound the direct-tcpip channel open (paramiko's default: one hour).
            master.transport.channel_timeout = ssh.connect_timeout
        connection = Connection(
            host=address,
            port=port,
            user=ssh.user,
            gateway=gateway,
            connect_timeout=int(max(1, ssh.connect_timeout)),
            connect_kwargs={
                "key_filename": str(ssh.key),
                "look_for_keys": False,
                "allow_agent": False,
                "banner_timeout": ssh.connect_timeout,
                "auth_timeout": ssh.connect_timeout,
                "channel_timeout": ssh.connect_timeout,
            },
        )
        self.keys.install(connection.client, node.name)
        try:
            connection.open()
        except paramiko.BadHostKeyException as exc:
            connection.close()
            raise self.keys.changed_error(node.name, exc.hostname, exc) from None
        except Exception as exc:
            connection.close()
            raise describe_connect_failure(node.name, exc, via) from None
        transport = connection.transport
        transport.set_keepalive(KEEPALIVE_SECONDS)
        return SshHost(
            node, connection, sudo=ssh.uses_sudo, command_timeout=ssh.command_timeout,
            channel_timeout=ssh.connect_timeout, cancel=self.cancel,
        )
