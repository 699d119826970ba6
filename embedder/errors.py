"""One exception hierarchy; each class carries the exit code the command line maps it to.

Exit codes (documented in README):
    0  success
    1  failure at run time (export validation failed, device unavailable, write failed)
    2  bad input or usage (missing file, not Parquet, missing column, model not found, output exists,
       progress in the work folder from a run with other options)
    130, 143  stopped by SIGINT or SIGTERM (128 + signal number); rerun to resume
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2


class EmbedderError(Exception):
    """Base of every error this project raises on purpose."""

    exit_code = EXIT_RUNTIME


class UsageError(EmbedderError, ValueError):
    """A command-line option or combination of options is invalid."""

    exit_code = EXIT_USAGE


class InputError(EmbedderError, ValueError):
    """The input data is missing, unreadable or not what the job needs."""

    exit_code = EXIT_USAGE


class OutputExistsError(EmbedderError, FileExistsError):
    """The output path exists and --overwrite was not given."""

    exit_code = EXIT_USAGE


class ModelNotFoundError(EmbedderError, FileNotFoundError):
    """The model is neither a local folder nor in the local Hugging Face cache."""

    exit_code = EXIT_USAGE


class UnsupportedModelError(EmbedderError, ValueError):
    """The model's pipeline has a part the exporter cannot reproduce faithfully."""

    exit_code = EXIT_USAGE


class ExportError(EmbedderError, RuntimeError):
    """Exporting the graph failed, or the exported graph failed validation."""


class DeviceError(EmbedderError, RuntimeError):
    """The requested execution device could not be used."""


class OutputError(EmbedderError, OSError):
    """Writing the output failed (unwritable folder, full disk)."""


class LockedError(EmbedderError, RuntimeError):
    """Another job holds the lock on the same output."""


class Interrupted(EmbedderError):
    """SIGTERM or SIGINT stopped the job after it committed what was complete."""

    def __init__(self, signum: int, outcome: str = "committed windows are kept, rerun the same command to resume"):
        import signal

        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}; {outcome}")
        self.exit_code = 128 + signum


def first_line(error: BaseException) -> str:
    """The first non-blank line of an error's message (library errors can run to pages), else its type."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
