"""The admission policies the simulation compares, named once.

Light, so that the command line can offer them without importing the simulator;
the policies themselves are in :mod:`throttler.simulation.policies`.
"""

POLICIES = ("all-at-once", "fixed-pool", "resources", "throttler")
POLICY_LABELS = {"all-at-once": "(a) all at once", "fixed-pool": "(b) fixed pool",
                 "resources": "(c) resources only", "throttler": "(d) throttler"}
