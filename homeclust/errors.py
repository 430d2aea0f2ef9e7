"""One error hierarchy for homeclust.

Every failure homeclust reports is a :class:`HomeclustError`; each phase has its
own subclass so the CLI can turn them into the documented exit codes without
knowing where they came from:

* :class:`UsageError`, :class:`InventoryError` -> exit 2 (nothing was contacted)
* :class:`ConnectError`, :class:`FactError`, :class:`StepError` (and its
  :class:`UnsafeValueError`), :class:`ApplyError`, :class:`LabError` -> exit 1
* :class:`Interrupted` (Ctrl-C, SIGTERM) -> exit 130
"""

from __future__ import annotations


class HomeclustError(Exception):
    """Root of every error homeclust raises on purpose."""

    #: Exit code the CLI uses when this error ends a command.
    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class UsageError(HomeclustError):
    """Bad command-line input (unknown step, unknown host, conflicting options)."""

    exit_code = 2


class InventoryError(HomeclustError):
    """The inventory file is missing, unreadable or invalid."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        table: str | None = None,
        key: str | None = None,
        hint: str | None = None,
    ) -> None:
        where = path or "inventory"
        if table and key:
            where += f": [{table}] {key}"
        elif table:
            where += f": [{table}]"
        elif key:
            where += f": {key}"
        super().__init__(f"{where}: {message}", hint=hint)
        self.path = path
        self.table = table
        self.key = key


class ConnectError(HomeclustError):
    """A host could not be reached, authenticated or trusted."""


class HostKeyChangedError(ConnectError):
    """A host presented a key different from the one pinned for it."""


class FactError(HomeclustError):
    """Facts could not be gathered or parsed, or the platform is unsupported."""


class StepError(HomeclustError):
    """A step cannot plan for, or failed to converge on, a host."""


class UnsafeValueError(StepError):
    """A value cannot be written to its destination safely (a shell script, a config file).

    The inventory grammar refuses such values at load time; this is the
    renderers' own line of defence, for callers that bypassed it.
    """


class ApplyError(HomeclustError):
    """Running changes on a host failed (a command exited non-zero, a timeout)."""


class RolledBackError(ApplyError):
    """A guarded change could not be confirmed and the host restored its old state
    (checked: a fresh plan shows the same changes as before the attempt)."""


class Interrupted(HomeclustError):
    """The run was interrupted (Ctrl-C, SIGTERM); guarded changes were rolled back."""

    exit_code = 130

    def __init__(self, message: str, *, hint: str | None = None, rolled_back: bool = False
                 ) -> None:
        super().__init__(message, hint=hint)
        #: True when a guarded change in flight was rolled back (checked) because of it.
        self.rolled_back = rolled_back


class LockError(HomeclustError):
    """Another homeclust run holds the cluster lock on the master."""


class LabError(HomeclustError):
    """The virtual lab could not be built, started, used or torn down."""
