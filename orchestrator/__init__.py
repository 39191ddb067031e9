"""Orchestrator: lorafleet on Ray Serve — the only package that imports Ray (and vLLM, lazily).

One sub-package per corridor (docs/architecture.md has the map):

* ``serving``  a request: listener / ingress (OpenAI API) -> routing table -> replica ->
               engine backend (vLLM or the twin-timed sim), telemetry, the Serve application;
* ``control``  a decision: telemetry window -> estimate -> drift -> re-plan (placement) ->
               twin verification fan-out -> transition; the controller actor; deploy/shutdown;
* ``measure``  live-engine measurement: profiling and benchmarking a real vLLM, the tiny model;
* ``cli``      the ``lorafleet`` commands, thin: parse, call the library, print.

Arrows: cli -> control -> serving; serving never imports control (the controller drives the
serving side through the actor methods ``serving.controller_link`` names).
"""
