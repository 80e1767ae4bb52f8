"""Privacy for multi-site training: client-level DP-FedAvg and secure aggregation, built from small parts.

- ``config``: the ``[privacy]`` section and its checks (no torch), and the ``dp_clip`` pipeline transform's
  registration;
- ``accounting``: epsilon of Poisson-sampled Gaussian rounds from ``dp-accounting`` (RDP and PLD), the noise
  for a target epsilon, and the run's accountant as plain state;
- ``dp``: per-client clipping (the ``dp_clip`` transform) and ``DPStrategy``, the server-side wrapper around
  any linear strategy (Poisson sampling, the server re-clips, Gaussian noise on the sum, epsilon every round,
  adaptive clipping);
- ``secagg``: the pure secure-aggregation protocol (keys, Shamir shares, AES-256-CTR masks, fixed point);
  ``secagg_strategy`` and ``client``: its phases on the round driver (server and client side), ``wire``: its
  messages; ``distributed``: distributed DP's discrete Gaussian shares and what a round is charged;
  ``wrap.with_privacy``: the server strategy wrapped as ``[privacy]`` asks.
"""
