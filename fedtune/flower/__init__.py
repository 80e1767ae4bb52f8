"""Flower bridges: fedtune's client code as a Flower ClientApp and a relay ServerApp driven by the engine.

``records`` converts fedtune's ``Instructions`` / ``ClientReply`` to Flower ``RecordDict`` content and back;
``client_app`` is the ClientApp every Ray actor runs (one cached base model per actor); ``server_app`` builds
the ServerApp whose ``main`` relays the engine's rounds to the simulated nodes.
"""
