"""``python -m app``: one uvicorn process on the configured host and port, exiting 0 after a
graceful SIGTERM (in-flight requests finish, bounded by GRACEFUL_TIMEOUT_S)."""

from __future__ import annotations

import signal
import sys

import uvicorn

from app.config import get_settings


def main() -> int:
    settings = get_settings()
    # uvicorn re-raises the signal it shut down for once it has drained; exit 0 then.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(
        "app.main:app",
        host=settings.host,
        port=settings.port,
        workers=1,
        timeout_graceful_shutdown=settings.graceful_timeout_s,
        log_config=None,
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
