"""Every field a peer sends is bounded before it is stored, logged or compared (issue 16, item 6)."""

from __future__ import annotations

import json
import resource

import grpc
import pytest

from fedtune.server.coordinator import MAX_REFUSALS_KEPT, RoundCoordinator
from fedtune.transport import ConfigMismatch, MessageRejected, start_server
from fedtune.transport._proto import federation_pb2 as fpb
from fedtune.transport._proto import federation_pb2_grpc as fpb_grpc
from fedtune.transport.errors import MAX_REASON
from fedtune.transport.messages import MAX_METRICS, parse_update_header
from fedtune.transport.testing import StaticCoordinator
from fedtune.untrusted import MAX_ERROR

FP = json.dumps({"model": "tiny-llama", "adapter": {"r": 4}}, sort_keys=True)


def _header(**kw) -> bytes:
    return fpb.UpdateHeader(round=1, phase="train", node="a", num_examples=1, **kw).SerializeToString()


def test_an_8_mib_error_string_is_kept_as_a_bounded_line() -> None:
    h = parse_update_header(_header(error="[/x]\n" + "e" * (8 << 20)))
    assert h.error is not None and len(h.error) < MAX_ERROR + 40
    assert h.error.startswith("[/x]\\x0aeee") and h.error.endswith(f"({(8 << 20) + 5 - MAX_ERROR} more characters)")


def test_metric_names_and_counts_are_bounded() -> None:
    with pytest.raises(MessageRejected, match=f"at most {MAX_METRICS} metrics"):
        parse_update_header(_header(metrics={f"m{i}": 1.0 for i in range(MAX_METRICS + 1)}))
    with pytest.raises(MessageRejected, match="named by 1..64 characters"):
        parse_update_header(_header(metrics={"m" * 65: 1.0}))


def test_a_rejection_reason_quoting_a_peer_is_bounded() -> None:
    e = MessageRejected(f"unknown encoding {'x' * (4 << 20)!r}")
    assert len(e.reason) < MAX_REASON + 40 and "more characters" in e.reason


def test_refused_registrations_keep_a_bounded_record() -> None:
    coord = RoundCoordinator(FP, 3)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    huge = json.dumps({"model": "x" * (1 << 20), "adapter": {f"k{i}": i for i in range(30)}})
    for i in range(3 * MAX_REFUSALS_KEPT):
        with pytest.raises(ConfigMismatch) as e:
            coord.register(f"n{i}", huge)
        assert len(e.value.reason) < MAX_REASON + 40
    assert coord.refusals == 3 * MAX_REFUSALS_KEPT and len(coord.refused_registrations) == MAX_REFUSALS_KEPT
    assert coord.refused_registrations[-1].startswith(f"node 'n{3 * MAX_REFUSALS_KEPT - 1}' refused")
    assert coord.refused_registrations[-1].endswith("... and 12 more key(s) (model, quant and adapter sections "
                                                    "must agree)")
    with pytest.raises(ConfigMismatch) as e:
        coord.register("big-model", json.dumps({"model": "x" * (1 << 20), "adapter": {"r": 4}}))
    assert "model.name: server has 'tiny-llama', node has 'xxx" in e.value.reason and len(e.value.reason) < 400
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 100 << 10  # KiB: the record stays small
    with pytest.raises(ConfigMismatch, match="unreadable config fingerprint"):
        coord.register("deep", "[" * 10_000)


@pytest.mark.integration
def test_oversized_registration_fields_are_refused_before_use() -> None:
    server = start_server(StaticCoordinator(fingerprint=FP), "127.0.0.1:0", max_workers=4, bulk_port=None)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = fpb_grpc.FederationStub(ch)
            for field, value in (("config_fingerprint", "x" * (4 << 20)), ("nonce", b"n" * 4096),
                                 ("signature", b"s" * 65), ("public_key", b"k" * 33)):
                nonce = stub.Challenge(fpb.ChallengeRequest(node="site-a"), timeout=10).nonce
                req = fpb.RegisterRequest(node="site-a", nonce=nonce, config_fingerprint=FP)
                setattr(req, field, value)
                with pytest.raises(grpc.RpcError) as e:
                    stub.Register(req, timeout=10)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert e.value.details().startswith(f"{field} has length"), e.value.details()
    finally:
        server.stop(0)


@pytest.mark.integration
def test_a_request_that_does_not_parse_is_invalid_argument_not_internal() -> None:
    server = start_server(StaticCoordinator(fingerprint=FP), "127.0.0.1:0", max_workers=4, bulk_port=None)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            for rpc in ("Challenge", "Register", "Heartbeat", "Status"):
                with pytest.raises(grpc.RpcError) as e:
                    ch.unary_unary(f"/fedtune.v1.Federation/{rpc}")(b"\xff\xff\xff", timeout=10)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                list(ch.unary_stream("/fedtune.v1.Federation/GetInstructions")(b"\xff\xff\xff", timeout=10))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop(0)
