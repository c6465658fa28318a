"""Which storage errors are worth retrying: connection and endpoint errors, 5xx and throttling.

botocore raises its own exception types (not OSError) for a dead endpoint; s3fs turns HTTP error
responses into OSError with the botocore ClientError as `__cause__`. Both are inspected here.
"""

from __future__ import annotations

import errno

# Error codes an S3-compatible service returns for overload or a passing fault: worth retrying.
_RETRY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                "RequestThrottled", "ProvisionedThroughputExceededException", "RequestTimeout", "InternalError",
                "ServiceUnavailable", "BandwidthLimitExceeded", "500", "502", "503", "504"}
# Local errors that no wait will fix.
_PERMANENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EINVAL, errno.ENAMETOOLONG,
                     errno.EDQUOT, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR}


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes (s3fs wraps botocore errors into OSError with __cause__)."""
    out: list[BaseException] = []
    while exc is not None and exc not in out and len(out) < 8:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def client_error_status(exc: BaseException) -> tuple[str, int] | None:
    """(error code, HTTP status) of a botocore ClientError in the chain, if any."""
    for item in _chain(exc):
        response = getattr(item, "response", None)
        if isinstance(response, dict) and "Error" in response:
            code = str(response["Error"].get("Code", ""))
            return code, int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return None


def _network_error_types() -> tuple[type, ...]:
    types: list[type] = []
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        types += [BotoConnectionError, HTTPClientError]  # endpoint, connect/read timeouts, closed connections
    except ImportError:  # pragma: no cover - botocore comes with s3fs
        pass
    try:
        import aiohttp

        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def is_transient(exc: BaseException, permanent: tuple[type, ...] = ()) -> bool:
    """Connection and endpoint errors, 5xx and throttling: yes. Missing keys, refusals, `permanent`: no."""
    if isinstance(exc, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                        PermissionError) + permanent):
        return False
    client = client_error_status(exc)
    if client is not None:
        code, status = client
        return status >= 500 or status == 429 or code in _RETRY_CODES or "Throttl" in code
    if any(isinstance(item, _network_error_types()) for item in _chain(exc)):
        return True
    if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS:
        return False
    return isinstance(exc, (OSError, ConnectionError, TimeoutError)) or "Throttl" in type(exc).__name__


def not_implemented(exc: BaseException) -> bool:
    """An endpoint that does not support conditional writes (e.g. an older MinIO or Ceph)."""
    client = client_error_status(exc)
    return client is not None and (client[1] == 501 or client[0] in ("NotImplemented", "InvalidArgument"))
