"""``python -m app``: one uvicorn process on the configured host and port, exiting 0 after a
graceful SIGTERM (in-flight requests finish, bounded by GRACEFUL_TIMEOUT_S)."""

from __future__ import annotations

import logging
import os
import signal
import sys

import uvicorn

from app.config import get_settings


def main() -> int:
    settings = get_settings()
    # uvicorn re-raises the signal it shut down for once it has drained; exit 0 then.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run(
            "app.main:app",
            host=settings.host,
            port=settings.port,
            workers=1,
            timeout_graceful_shutdown=settings.graceful_timeout_s,
            log_config=None,
            access_log=False,
        )
    except SystemExit as exc:  # the code sys.exit was given: none is 0, a message is 1
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def exit_now(code: int) -> None:
    """Exit once the server has drained and its lifespan has closed the store and the worker:
    the logs flushed, without Python's module teardown (torch's alone takes 0.6-1 s on a 2-core
    EPYC, time a rolling restart or a test's every server would wait for nothing)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
