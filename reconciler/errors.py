"""The one exception family of spos.

Manifest problems are never raised one at a time: validation collects every `Diagnostic`
(reconciler.diagnostics) and raises one ManifestError carrying them all. Runtime failures raise
a `SposError` subclass that says whether trying again can help (`retryable`). Any other
exception escaping spos is a bug.
"""

from __future__ import annotations


class SposError(Exception):
    """Base of every error spos raises on purpose. `retryable` says whether a retry can help."""

    retryable = False


class ManifestError(SposError):
    """The manifests are invalid; nothing was changed. Carries every problem found."""

    def __init__(self, diagnostics: list):
        self.diagnostics = sorted(diagnostics)
        count = len(self.diagnostics)
        super().__init__(f"{count} problem{'s' if count != 1 else ''} in the manifests")


class UnsafePathError(SposError):
    """A path would leave the device root or pass through a symlink."""


class LockHeldError(SposError):
    """Another spos process holds the apply lock."""

    retryable = True


class StalePlanError(SposError):
    """A saved plan no longer matches the device or the manifests it was made from."""


class UsageError(SposError):
    """The command line or its arguments are wrong."""


class ApplyError(SposError):
    """One or more resources could not be changed; the others were applied and recorded."""

    retryable = True
