"""``mpsd bench`` and ``mpsd tune``: measure, on the operator's own host, whether MPS pays.

This package drives mpsd from the outside, the way an operator does: HTTP to the proxy and to
the engines, ``mpsd run`` as a child process, the control socket for reloads. It never imports
the supervisor, the proxy or the observers (tests/unit/test_architecture.py keeps it so).

- :mod:`~mpsd.bench.loadgen`: the load generator (closed and open loop, streaming with TTFT and
  inter-token latency, token counts from ``usage``), in worker processes pinned to their cores;
- :mod:`~mpsd.bench.stats`: medians, spreads, percentiles and the noise verdict (pure);
- :mod:`~mpsd.bench.workloads`: built-in workloads and the operator's own (pure);
- :mod:`~mpsd.bench.target`: the mpsd under test, running already or started for the run;
- :mod:`~mpsd.bench.arms`: interleaved arms (one engine direct, mpsd, the client balancing);
- :mod:`~mpsd.bench.report`: the table, JSON lines and the plot;
- :mod:`~mpsd.bench.tune`: the search that writes a ``[[gpu]]`` block.
"""
