"""Update compression: what a client sends instead of its dense update, and how the server reads it back.

- ``config``: the ``compress.*`` section and the combinations it refuses (torch-free, read by the config system);
- ``compressors``: pure functions from an update to what is sent (top-k, random-k, threshold, sign, int8/int4
  blocks), each a fixed point of its wire encoding, so the server decodes exactly what the client kept count of;
- ``feedback``: the ``compress`` transform of the client update pipeline, with error feedback;
- ``link``: the server's side: a compressed update back to values, compressed downlink deltas, masks sent once,
  factors trimmed to the rank in use;
- ``rank``: rank pruning (the ``rank_prune`` transform, ``strategy.svd_energy``'s trimmed downlink);
- ``mask`` / ``explore``: the global pruning mask (``mask.*``): the server's strategy wrapper with its
  exploration phase, and the client's side.
"""
