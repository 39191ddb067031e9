"""Baseline placement policies behind the same interface as ``lorafleet``, so every plan is a
comparison (docs/placement.md#baselines). One module per policy, each registered by one line in
``placement.policy.POLICIES``:

* ``round_robin``: adapters dealt round-robin over N replicas;
* ``least_loaded``: hottest first, each to the replica with the least offered tokens/s;
* ``loraserve``: rank-aware fractional packing at per-rank operating points (arXiv 2511.22880);
* ``dlora``: proactive replication maximising the minimum burst tolerance (dLoRA, OSDI'24);
* ``agullo_greedy``: rank groups, zig-zag by rate, fill one replica at a time until the predictor
  says it would starve (Agulló et al., arXiv 2602.24044).

Every baseline gets the same per-replica optimum (max_loras, max_cpu_loras, max_lora_rank) and
the same predictor as ``lorafleet``, so the comparison isolates where the traffic goes and how
many replicas each method asks for. ``_shared`` holds what they share beyond ``placement.common``.
"""
