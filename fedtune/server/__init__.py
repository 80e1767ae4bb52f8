"""The coordinator of a real federation: ``run_server`` (setup + the round driver) over ``GrpcDispatcher``
(the driver's phases published to nodes) over ``RoundCoordinator`` (the state the gRPC transport reads and
feeds)."""

from fedtune.server.coordinator import OBSERVER, RoundCoordinator, fingerprint_diff, natural_key
from fedtune.server.dispatch import BaseSync, FederationError, GrpcDispatcher
from fedtune.server.loop import open_transport, run_server

__all__ = ["OBSERVER", "BaseSync", "FederationError", "GrpcDispatcher", "RoundCoordinator", "fingerprint_diff",
           "natural_key", "open_transport", "run_server"]
