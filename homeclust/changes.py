"""Changes: the small closed set of things a step can ask a host to do.

* :class:`FileChange` -- a file with content, mode and owner (or its removal);
  carries the unified diff against what the host has now.
* :class:`PackagesChange` -- packages to install.
* :class:`ServiceChange` -- enable/disable, start/stop/restart a unit.
* :class:`CommandChange` -- a command, optionally guarded by a shell test
  (``unless``) and/or triggered only when some file of the same batch really
  changed (``when_changed``: "restart networking if its file changed").

Planning produces them from facts without I/O.  :func:`render_batch` turns the
changes of one step on one host into a single shell script (one round trip),
and :func:`parse_batch_output` reads back what each change did.
"""

from __future__ import annotations

import base64
import difflib
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

CHANGE_MARKER = "@@homeclust-change@@"
#: The PATH every script homeclust sends runs with (sudo and login shells differ).
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class FileChange:
    path: str
    content: str | None  # None: the file must not exist
    old: str | None  # what the host has now (None: absent or unknown)
    mode: int = 0o644
    owner: str = "root"
    group: str = "root"
    reason: str = ""
    #: Secret content (keys, credentials): never shown in a diff nor written to a log.
    secret: bool = False
    #: The account that writes (or removes) the file, for files in a directory it controls
    #: (a cluster user's home): root never acts there itself, so a link planted there
    #: gets the account only what it could do anyway.  The file is the account's own.
    run_as: str | None = None

    kind: Literal["file"] = field(default="file", init=False)

    def __post_init__(self) -> None:
        if self.run_as is not None and (self.run_as == "root" or self.owner != self.run_as):
            raise ValueError(f"{self.path}: a file written as {self.run_as} is owned by it "
                             "(and root writes its own files itself)")

    @property
    def description(self) -> str:
        if self.content is None:
            return f"remove {self.path}"
        # A reason is only given for files that exist (mode, owner, too big to diff).
        verb = "create" if self.old is None and not self.reason else "update"
        extra = f" ({self.reason})" if self.reason else ""
        return f"{verb} {self.path}{extra}"

    def diff(self) -> str:
        if self.secret:
            what = ("will be removed" if self.content is None else
                    "will be created" if self.old is None and not self.reason else
                    f"differ{f' ({self.reason})' if self.reason else ''}")
            return f"--- {self.path}\n+++ {self.path}\n# contents {what} (secret: not shown)\n"
        old = (self.old or "").splitlines(keepends=True)
        new = (self.content or "").splitlines(keepends=True)
        text = "".join(
            difflib.unified_diff(
                old, new,
                fromfile=self.path if self.old is not None else "/dev/null",
                tofile=self.path if self.content is not None else "/dev/null",
            )
        )
        if not text and self.reason:
            return f"--- {self.path}\n+++ {self.path}\n# {self.reason}\n"
        return text


@dataclass(frozen=True)
class PackagesChange:
    packages: tuple[str, ...]
    command: str  # from Platform.install_command
    preseed: str | None = None

    kind: Literal["packages"] = field(default="packages", init=False)

    @property
    def description(self) -> str:
        return "install " + " ".join(self.packages)


@dataclass(frozen=True)
class ServiceChange:
    unit: str
    enable: bool | None = None  # True: enable, False: disable (and mask when mask=True)
    action: Literal["start", "stop", "restart", "reload"] | None = None
    mask: bool = False
    when_changed: tuple[str, ...] = ()

    kind: Literal["service"] = field(default="service", init=False)

    @property
    def description(self) -> str:
        parts = []
        if self.enable is True:
            parts.append("enable")
        elif self.enable is False:
            parts.append("mask" if self.mask else "disable")
        if self.action:
            parts.append(self.action)
        text = " and ".join(parts) + f" {self.unit}"
        if self.when_changed:
            text += " (if " + ", ".join(self.when_changed) + " changed)"
        return text


@dataclass(frozen=True)
class CommandChange:
    description: str
    command: str
    unless: str | None = None  # skip when this shell test succeeds on the host
    when_changed: tuple[str, ...] = ()  # run only if one of these files changed in this batch
    #: On failure, report this warning instead of failing the step (e.g. a sysctl
    #: that is read-only inside a container).
    warn_on_failure: str | None = None
    #: What the command changes, as a unified diff (e.g. live rules -> wanted rules).
    diff: str = ""

    kind: Literal["command"] = field(default="command", init=False)


Change = FileChange | PackagesChange | ServiceChange | CommandChange


def unified_diff(old: str, new: str, old_label: str, new_label: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(keepends=True),
                                        new.splitlines(keepends=True), old_label, new_label))


def diff_text(changes: Sequence[Change]) -> str:
    """Every file diff of a plan plus a line per other change, for ``plan`` output."""
    out = []
    for change in changes:
        if isinstance(change, FileChange):
            out.append(change.diff())
        else:
            out.append(f"# {change.description}\n")
            if isinstance(change, CommandChange) and change.diff:
                out.append(change.diff)
    return "".join(out)


# --------------------------------------------------------------------------- shell

#: Shell function ``hc_as ACCOUNT COMMAND...``: run COMMAND as ACCOUNT -- its uid, its
#: primary group, no other group -- in ``/``.  Whatever that command does to paths ACCOUNT
#: controls (links, directories swapped meanwhile) is only what ACCOUNT could do itself.
#: ``setpriv`` (util-linux on both families) needs no PAM session; ``runuser`` is the fallback.
AS_ACCOUNT_SH = """\
hc_as() {
  hc_u=$(id -u "$1" 2>/dev/null) && hc_g=$(id -g "$1" 2>/dev/null) && [ "$hc_u" != 0 ] || {
    echo "homeclust: no account $1 to act as (or it is root)"; return 1; }
  hc_who=$1; shift
  if command -v setpriv >/dev/null 2>&1; then
    (cd / && exec setpriv --reuid="$hc_u" --regid="$hc_g" --clear-groups -- "$@")
  else
    (cd / && exec runuser -u "$hc_who" -- "$@")
  fi
}
"""

#: Run as the account by ``hc_file`` (stdin: the content; ``$1`` path, ``$2`` mode): the same
#: atomic write, with a temporary file only that account can have made.  Exit 2: unchanged.
_WRITE_AS_ACCOUNT = """\
umask 077
d=$(dirname "$1"); [ -d "$d" ] || mkdir -p "$d" || exit 1
t=$(mktemp "$d/.homeclust-tmp.XXXXXX") || exit 1
cat > "$t" && chmod "$2" "$t" || { rm -f "$t"; exit 1; }
if [ -f "$1" ] && [ ! -L "$1" ] && cmp -s "$t" "$1" && \\
   [ "$(stat -c '%a %u %g' "$1")" = "$(stat -c '%a %u %g' "$t")" ]; then
  rm -f "$t"; exit 2
fi
mv -f "$t" "$1" || { rm -f "$t"; exit 1; }
"""

_PRELUDE = f"""\
exec 2>&1
export LC_ALL=C PATH={HOST_PATH}
hc_changed=" "
hc_mark() {{ printf '\\n{CHANGE_MARKER} %s %s\\n' "$1" "$2"; }}
hc_was_changed() {{
  for p in "$@"; do case "$hc_changed" in *" $p "*) return 0;; esac; done
  return 1
}}
{AS_ACCOUNT_SH}hc_run_as() {{
  # hc_as, with what the account's command prints indented: it can never pass for a marker.
  hc_out=$(hc_as "$@" 2>&1); hc_rc=$?
  [ -z "$hc_out" ] || printf '%s\\n' "$hc_out" | sed 's/^/  /'
  return $hc_rc
}}
hc_root_only() {{
  # Whether only root can change what directory $1 is (or will be once made): every
  # directory on its real path is root's and writable by nobody else (a sticky one, like
  # /tmp, only above the last one that exists).  Root never writes anywhere else.
  hc_dir=$1
  hc_p=$(readlink -m "$hc_dir") || return 1
  set --
  while :; do
    [ -d "$hc_p" ] && set -- "$hc_p" "$@"
    [ -z "$hc_p" ] && break
    hc_p=${{hc_p%/*}}
  done
  [ -d / ] && set -- / "$@"
  hc_last=$#
  hc_bad=$(stat -c '%u %G %a %n' -- "$@" | {{
    i=0
    while read -r uid group mode name; do
      i=$((i + 1))
      [ "$uid" = 0 ] || {{ echo "$name"; continue; }}
      # Writable by its group: only root's group, or Debian's staff (root-equivalent by
      # Debian's own account, for /usr/local on systems installed before bookworm).
      case $mode in
        *[2367]) ;;
        *[2367]?) case $group in root|staff) continue;; esac;;
        *) continue;;
      esac
      # Writable by anyone: a sticky directory (/tmp) above the last one only.
      case $mode in [1357]???) [ "$i" -lt "$hc_last" ] && continue;; esac
      echo "$name"
    done; }})
  [ -z "$hc_bad" ] && return 0
  echo "homeclust: refusing to write as root under $hc_dir: $(printf '%s' "$hc_bad" | head -1) is \\
not root's alone (another account could swap what it holds)"
  return 1
}}
hc_file() {{
  # path mode owner group base64-content [account]: write atomically, report whether it
  # changed.  With an account, the account writes it (a file of its own, in a directory it
  # controls); otherwise root does, only where nobody else controls the directory.
  if [ -n "${{6:-}}" ]; then
    printf '%s' "$5" | base64 -d | hc_run_as "$6" sh -c {shlex.quote(_WRITE_AS_ACCOUNT)} sh "$1" "$2"
    hc_rc=$?
    [ $hc_rc = 0 ] && hc_changed="$hc_changed$1 "
    return $hc_rc
  fi
  dir=$(dirname "$1")
  hc_root_only "$dir" || return 1
  [ -d "$dir" ] || mkdir -p "$dir" || return 1
  tmp=$(mktemp "$dir/.homeclust-tmp.XXXXXX") || return 1
  printf '%s' "$5" | base64 -d > "$tmp" || {{ rm -f "$tmp"; return 1; }}
  chown -h "$3:$4" "$tmp" && chmod "$2" "$tmp" || {{ rm -f "$tmp"; return 1; }}
  if [ -f "$1" ] && [ ! -L "$1" ] && cmp -s "$tmp" "$1" && \\
     [ "$(stat -c '%a %U %G' "$1")" = "$(stat -c '%a %U %G' "$tmp")" ]; then
    rm -f "$tmp"; return 2
  fi
  mv -f "$tmp" "$1" || {{ rm -f "$tmp"; return 1; }}
  hc_changed="$hc_changed$1 "
}}
hc_absent() {{
  # path [account]: remove it (a link itself, never what it points to).
  if [ -n "${{2:-}}" ]; then
    hc_run_as "$2" sh -c '[ -e "$1" ] || [ -L "$1" ] || exit 2; rm -f "$1"' sh "$1"
    hc_rc=$?
    [ $hc_rc = 0 ] && hc_changed="$hc_changed$1 "
    return $hc_rc
  fi
  [ -e "$1" ] || [ -L "$1" ] || return 2
  hc_root_only "$(dirname "$1")" || return 1
  rm -f "$1" || return 1
  hc_changed="$hc_changed$1 "
}}
"""


def as_account(account: str, command: str) -> str:
    """``command`` run by a batch as ``account`` (see :data:`AS_ACCOUNT_SH`): for everything
    done in a directory that account controls, which root must never act in itself."""
    if account == "root":
        return command
    return f"hc_run_as {shlex.quote(account)} sh -c {shlex.quote(command)}"


#: What stands for a secret file's content in a script written to the run log.
REDACTED_CONTENT = "SECRET-NOT-LOGGED"


def _file_shell(change: FileChange, *, redact: bool = False) -> str:
    path = shlex.quote(change.path)
    account = f" {shlex.quote(change.run_as)}" if change.run_as else ""
    if change.content is None:
        return f"hc_absent {path}{account}"
    encoded = (REDACTED_CONTENT if redact and change.secret
               else base64.b64encode(change.content.encode()).decode())
    return (
        f"hc_file {path} {change.mode:o} {shlex.quote(change.owner)} "
        f"{shlex.quote(change.group)} {encoded}{account}"
    )


def _service_shell(change: ServiceChange) -> str:
    unit = shlex.quote(change.unit)
    parts = []
    if change.enable is True:
        parts.append(f"systemctl unmask {unit} >/dev/null 2>&1; systemctl enable {unit}")
    elif change.enable is False:
        parts.append(f"systemctl disable {unit}")
        if change.mask:
            parts.append(f"systemctl mask {unit}")
    if change.action:
        parts.append(f"systemctl {change.action} {unit}")
    return " && ".join(parts) if parts else "true"


def change_shell(change: Change, *, redact: bool = False) -> str:
    """The shell command of one change (without markers or guards).

    ``redact``: the form written to logs (secret file contents left out).
    """
    if isinstance(change, FileChange):
        return _file_shell(change, redact=redact)
    if isinstance(change, PackagesChange):
        if change.preseed:
            return f"{{ {change.preseed}; }} && {change.command}"
        return change.command
    if isinstance(change, ServiceChange):
        return _service_shell(change)
    return change.command


def render_batch(changes: Sequence[Change], *, stop_on_failure: bool = True,
                 redact: bool = False) -> str:
    """One POSIX shell script applying ``changes`` in order.

    Every change reports ``<index> changed|unchanged|skipped|warned|failed`` on
    a marker line.  The first failure stops the script with exit 1 (later
    changes are not attempted: a step never half-applies silently).
    ``redact``: the form written to the run log (secret file contents left out).
    """
    lines = [_PRELUDE]
    for index, change in enumerate(changes):
        body = change_shell(change, redact=redact)
        when = getattr(change, "when_changed", ())
        unless = getattr(change, "unless", None)
        conditions = []
        if when:
            conditions.append("hc_was_changed " + " ".join(shlex.quote(p) for p in when))
        guard_open = ""
        guard_close = ""
        if conditions:
            guard_open = f"if {' && '.join(conditions)}; then\n"
            guard_close = f"else hc_mark {index} skipped; fi\n"
        if unless:
            guard_open += f"if ( {unless} ) >/dev/null 2>&1; then hc_mark {index} unchanged; else\n"
            guard_close = "fi\n" + guard_close
        on_fail = (
            f"printf 'warning: %s\\n' {shlex.quote(change.warn_on_failure)}; hc_mark {index} warned"
            if isinstance(change, CommandChange) and change.warn_on_failure
            else f"hc_mark {index} failed" + ("; exit 1" if stop_on_failure else "")
        )
        if isinstance(change, FileChange):
            action = (
                f"{body}; rc=$?\n"
                f"case $rc in 0) hc_mark {index} changed;; 2) hc_mark {index} unchanged;;"
                f" *) {on_fail};; esac\n"
            )
        else:
            action = f"if {{ {body}\n}}; then hc_mark {index} changed; else {on_fail}; fi\n"
        lines.append(guard_open + action + guard_close)
    lines.append("exit 0\n")
    return "".join(lines)


ChangeStatus = Literal["changed", "unchanged", "skipped", "warned", "failed", "not-run"]


@dataclass(frozen=True)
class ChangeOutcome:
    index: int
    status: ChangeStatus
    output: str


def parse_batch_output(output: str, count: int) -> list[ChangeOutcome]:
    """Split a batch's output into one outcome per change (``not-run`` after a failure)."""
    outcomes: dict[int, ChangeOutcome] = {}
    buffer: list[str] = []
    for line in output.splitlines():
        if line.startswith(CHANGE_MARKER + " "):
            _, index_text, status = line.split()
            index = int(index_text)
            outcomes[index] = ChangeOutcome(index, status, "\n".join(buffer).strip())  # type: ignore[arg-type]
            buffer = []
        else:
            buffer.append(line)
    return [outcomes.get(index, ChangeOutcome(index, "not-run", "")) for index in range(count)]
