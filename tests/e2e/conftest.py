import pytest

from sidecar.testing import OTLPBackend, free_port


@pytest.fixture
def backend():
    with OTLPBackend() as b:
        yield b


@pytest.fixture
def ports():
    class Ports:
        grpc = free_port()
        http = free_port()
        metrics = free_port()
        health = free_port()
    return Ports
