"""The client side: one round of local work (``fit``) and the gRPC node loop."""
