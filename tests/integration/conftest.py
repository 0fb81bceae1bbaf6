# Integration tests: a real `raftblock serve` process, real NBD clients (qemu, libnbd, nbdinfo, nbdfuse, fio).
#
# Rules:
#   1. Each test starts its own server(s) on a free port in its own tmp dir, through `serve_factory`, and
#      every server is stopped at teardown even when the test fails; a failed test prints the server log tail.
#   2. No sleeps as synchronisation: wait for READY lines, events and files with a deadline.
#   3. RAFTBLOCK_SERVE_CMD (a developer aid, off by default) runs the same tests against another program that
#      takes the `serve` arguments, e.g. a test double; the suite's target is `raftblock serve`.
from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from pathlib import Path

import pytest

from raftblock.testing.serve import ServeProcess

from .helpers import ServeFactory, serve_command


def pytest_report_header(config: pytest.Config) -> str:
    return f"raftblock integration server: {' '.join(serve_command())} serve ..."


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item, so fixtures can tell whether the test failed."""
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


@pytest.fixture
def serve_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServeFactory]:
    """start(volumes=["vol:64M"], disk="os", name="srv", **kw) -> a started ServeProcess in tmp_path/name."""
    started: list[ServeProcess] = []

    def start(
        volumes: Sequence[str] = ("vol:64M",),
        disk: str = "os",
        name: str = "srv",
        start: bool = True,
        **kw: object,
    ) -> ServeProcess:
        sp = ServeProcess(
            tmp_path / name,
            list(volumes),
            disk=disk,
            log_path=tmp_path / f"{name}.log",
            command=serve_command(),
            **kw,  # type: ignore[arg-type]
        )
        started.append(sp)
        if start:
            sp.start()
        return sp

    yield start

    failed = any(getattr(request.node, f"rep_{w}", None) is not None and getattr(request.node, f"rep_{w}").failed
                 for w in ("setup", "call"))
    for sp in started:
        sp.close()
        if failed:
            print(f"\n===== server log {sp.log_path} (tail) =====\n{sp.log_tail(60)}")


@pytest.fixture
def server(serve_factory: ServeFactory) -> ServeProcess:
    """One running server with one 64 MiB volume named `vol`."""
    return serve_factory()


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    """A real S3 HTTP endpoint: moto's server on a free loopback port, in this process."""
    from moto.server import ThreadedMotoServer

    from raftblock.testing.serve import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
