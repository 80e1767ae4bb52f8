"""The client side: one round of local work (``fit``), what each phase does (``phases``), the update pipeline
(``pipeline``) and the gRPC node loop (``node``)."""
