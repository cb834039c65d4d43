"""What identifies a bundle file, and the error for one that is not usable: without torch, so a reader
of exported files (a lean serving worker) can name the bundle format and raise the same error."""

from __future__ import annotations

FORMAT_NAME = "imgclf-bundle"
FORMAT_VERSION = 1


class BundleError(ValueError):
    """A file that cannot be used as a bundle; the message names the file and what is wrong."""
