"""The request corridor: listener / ingress -> routing -> replica -> engine backend.

``ingress`` (the OpenAI-compatible HTTP API), ``routing`` (the routing table and the policy that
picks a copy, retries included), ``replica`` (one engine replica: backend + telemetry),
``backend`` / ``vllm_engine`` / ``sim_engine`` (the engines behind one interface), ``telemetry``
(per-request records, the batches pushed to the controller), ``app`` (the Ray Serve application
of a plan), ``spec`` (what a deployment needs), ``registry`` / ``api_keys`` / ``openai_schema`` /
``listener`` (the edges), ``controller_link`` (how replicas and ingresses reach a controller).
Never imports ``orchestrator.control``.
"""
