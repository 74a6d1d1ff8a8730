"""Several servers training one model (``--mezo-fleet-*``, issue 27): the leader (rank 0) runs the jobs and relays
every message that moves the weights to the other servers over HTTP, signed with the fleet's secret; the scheduler
processes of every member meet in one gloo group (:mod:`sglang_mezo.scheduler.replicas`) and share each step's
batch exactly as the replicas of one server do. A server that joins replays the leader's history before it serves.
See ``docs/fleet.md``."""
