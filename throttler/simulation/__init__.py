"""Capacity planning: the whole estate on a modelled cluster, storage and network included.

A discrete-event simulation that drives the daemon's real planner, estimator
and admission over a modelled cluster of ``workers x memory x threads`` on
shared storage, and compares four ways to run one batch. It is a feature of
its own (``throttler simulate``), outside the daemon's import path:

* :mod:`.estate`: the estate, from a manifest or the case study;
* :mod:`.model`: the cluster, storage and network model, units, the tunables;
* :mod:`.calibration`: the calibrated CPU, daemon and scheduler costs (one table each);
* :mod:`.plans`: the real planner's plans, their task trees, a plan cache per run;
* :mod:`.engine`: the discrete-event loop;
* :mod:`.policies`: policies (a) to (d);
* :mod:`.bounds`: lower bounds, and which resource binds;
* :mod:`.report`: results, the table, the JSON;
* :mod:`.deadline`: the smallest cluster that meets a deadline;
* :mod:`.command`: the ``throttler simulate`` command.
"""
