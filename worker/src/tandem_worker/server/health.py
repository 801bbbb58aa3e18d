"""Names in the standard gRPC health service that Tandem's processes serve, for their probes.

`""` (the server as a whole) is SERVING while the process takes new work: a worker not draining
and not stuck, a router with a worker pair that could serve. `LIVENESS_SERVICE`, on workers, is
NOT_SERVING only while the engine watchdog finds the engine stuck (a step with work that makes no
progress for --engine-stall-timeout): what a liveness probe, or `tandem up`'s supervisor, restarts
a worker for. A draining or waiting worker is alive. Kept apart from the servers so that probes
(the supervisor, the operator's pod specs) read it without importing the engine.
"""

from __future__ import annotations

LIVENESS_SERVICE = "tandem.liveness"

# How a draining worker refuses new work (UNAVAILABLE), a message the router tells apart from a
# fault; a decode worker passes its prefill partner's refusal on at the end of its own message.
DRAINING = "worker is draining"
