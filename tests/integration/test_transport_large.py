"""More than 1 GiB in one update through the real transport, over the bulk lane and over the gRPC stream
(chunked: no 2 GiB / 4 MB message limits)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
import torch

from fedtune.transport import DecodedTensor, FederationClient, RoundStatus, UpdateHeader, start_server
from fedtune.types import ClientReply

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class DigestCoordinator:
    """Keeps only a digest of each tensor it receives, so the test needs no second GiB on the server."""

    def __init__(self) -> None:
        self.digests: dict[str, str] = {}

    def register(self, node: str, fingerprint: str, base_updates: int = 0) -> None:
        pass

    def next_instructions(self, node: str, timeout: float) -> None:
        return None

    def upload_window(self, node: str) -> float:
        return 3600.0

    def submit(self, node: str, header: UpdateHeader, tensors: Iterator[DecodedTensor]) -> str:
        for d in tensors:
            self.digests[d.name] = hashlib.sha256(d.tensor.numpy().tobytes()).hexdigest()
        return "ok"

    def status(self, detail: bool = True) -> RoundStatus:
        return RoundStatus(0, "train")


@pytest.mark.parametrize("bulk", [True, False], ids=["bulk lane", "gRPC stream"])
def test_update_larger_than_1_gib(bulk):
    big = torch.randn((1 << 28) + 1024)  # 1 GiB + 4 KiB in a single tensor, beyond gRPC's limits
    small = torch.randn(16)
    coord = DigestCoordinator()
    server = start_server(coord, "127.0.0.1:0")
    try:
        with FederationClient(f"127.0.0.1:{server.port}", "n1", heartbeat=False, bulk=bulk) as fc:
            res = fc.submit(ClientReply("n1", 0, {"big": big, "small": small}, num_examples=1))
        assert res.accepted and res.bytes_sent > (1 << 30)
        assert server.bulk.uploads == int(bulk)
        assert coord.digests["big"] == hashlib.sha256(big.numpy().tobytes()).hexdigest()
        assert coord.digests["small"] == hashlib.sha256(small.numpy().tobytes()).hexdigest()
    finally:
        server.stop(0)
