"""The decision corridor: telemetry -> estimate -> drift -> plan -> twin verification ->
transition.

``window`` (sliding telemetry windows, the offered-load estimate), ``drift`` (has the workload
moved; is there evidence of missing capacity), ``replan`` (the controller's choice against the
running plan: move cost), ``fanout`` (twin runs as Ray tasks, bounded), ``transition`` (make
before break), ``controller`` (the loop's state and decisions, Ray-free), ``actor`` (the Ray
actor and the Ray Serve operations), ``cluster`` (a local Ray head), ``deploy`` (deploy, status,
shutdown and the deployment record).
"""
