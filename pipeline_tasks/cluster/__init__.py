"""`make cluster`: the deployment's shape (docker/compose.yaml) run for real on one machine.

* ``hosts``: network namespaces as hosts (bridge, addresses, hostnames, /etc/hosts);
* ``services``: compose's services placed on the hosts (the one description);
* ``stack``: the services started, waited for, restarted, their memory sampled;
* ``faults``: the three faults and the proof each fired; Spark's record of its tasks;
* ``scenario``: the pipeline across the hosts, the checks, ``report.json``.

A user of the system like the demo: production code never imports it.
"""
