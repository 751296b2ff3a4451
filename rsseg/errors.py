"""Project exceptions. Messages are one line that names the file or field and says what to do."""


class UserError(Exception):
    """Bad input from the user: entry points print it as one line and exit non-zero."""


class DataError(UserError):
    """A data file or folder cannot be used as given."""


class ConfigError(UserError):
    """A parameter or spec field is invalid."""


class PromotionRefused(UserError):
    """The candidate version does not beat the champion or the minimum: nothing was changed."""

    exit_code = 3


class ExportError(UserError):
    """A model cannot be exported, or its exported graph does not reproduce the PyTorch model."""


class OutputError(UserError):
    """An output path that the command must not (or cannot) write."""


class TritonNotInstalled(UserError):
    """The Triton binary (from nvidia-pytriton) is missing or unusable in this environment."""


class PortInUse(UserError):
    """A port the server would listen on is taken."""


class TritonServerError(RuntimeError):
    """A server started by `TritonServer` exited or did not become ready; the message holds the log tail."""


class ServerUnavailable(UserError):
    """No server answered at a URL after the retries."""


class InferenceFailed(UserError):
    """A request kept failing after the retries."""


def first_line(exc: object, limit: int = 200) -> str:
    """An exception's first line for a one-line message (its type's name when it has no text)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
