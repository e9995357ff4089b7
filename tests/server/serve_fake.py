"""``python -m tests.server.serve_fake PORT SHUTDOWN_TIMEOUT_S``: the app on a FakeBackend, run by
the same uvicorn runner as ``cosyserve serve`` (its signal handling included), for the tests
that send it real signals."""

from __future__ import annotations

import logging
import sys

from cosyserve.server.app import create_app
from cosyserve.server.launch import serve
from tests.server.conftest import make_settings
from tests.server.fakes import FakeBackend


def main() -> None:
    port, timeout = int(sys.argv[1]), float(sys.argv[2])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    settings = make_settings(port=port, shutdown_timeout_s=timeout, decode_workers=0)
    serve(create_app(settings, backend=FakeBackend(step_sleep_s=0.02)), settings)


if __name__ == "__main__":
    main()
