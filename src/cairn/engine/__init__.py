"""The engine: durable queue and leases, the agent, the scheduler of one pipeline run, reuse."""
