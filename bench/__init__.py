"""The benchmark harness of issue 5: livecomments beside python-socketio, on loopback.

Read in the order a run goes: `run.py` (the command line) -> `scenarios.py` (what is measured and
how) -> `procs.py` (the processes: servers pinned to one core, load generators on the other) ->
`loadgen.py` (a load generator process) -> `leanws.py` / `leanhttp.py` (the small clients it
drives) -> `hist.py` (latency histograms) -> `report.py` (table, JSON, BENCHMARKS.md).
`peer_socketio.py` is the python-socketio server we measure ourselves against.
"""
