"""Running the gateway as a service nobody watches (docs/operations.md).

- :mod:`~plexus.service.notify`: the systemd notify protocol (ready, watchdog,
  status, reloading, stopping), without a dependency;
- :mod:`~plexus.service.figures`: one snapshot of every counter the gateway
  keeps (adapters, sinks and their buffers, the device link, commands), read
  by everything below, so there is one set of counters;
- :mod:`~plexus.service.health`: what "healthy" means, for the watchdog and
  ``/healthz``;
- :mod:`~plexus.service.metrics`: the opt-in Prometheus and health endpoint
  (prometheus-client is imported only when it starts);
- :mod:`~plexus.service.agent`: the gateway's own health sent as points;
- :mod:`~plexus.service.reload`: SIGHUP, re-reading the rig file without
  losing a point.

Nothing here is imported by ``import plexus``.
"""
