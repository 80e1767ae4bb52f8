"""The simulation harness: many virtual clients sharing one base model, run by the round driver.

``engine`` (``fedtune simulate``: setup, then ``fedtune.rounds``), ``dispatch`` (the simulator's Dispatcher:
faults and the wire round trip), ``pools`` / ``workers`` / ``flower_backend`` (where clients work), ``store``
(their state across rounds), ``faults``.
"""
