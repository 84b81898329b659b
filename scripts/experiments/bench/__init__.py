"""``fedlinear bench``: how fast fedlinear runs, next to Flower's own floor and a quickstart-style app.

One invocation, on one set of generated data, measures (each run a ``fedlinear run`` subprocess):

* ``sim`` / ``processes``: fedlinear (engines ``numpy`` and ``keras``), **the floor** (the no-op app in
  ``benchmarks/noop_app``, launched by the same launcher) and **the quickstart-style reference**
  (``benchmarks/quickstart_app``; in processes mode only with ``--quickstart-processes``), at
  ``--clients`` x ``--rounds`` (10 x 20);
* ``scaling``: fedlinear and the floor in simulation at 10, 100, 1000, 10000 clients x 3 rounds;
* ``central``: the pooled NumPy least-squares fit and centralized Keras training of the same data.

For every run: wall clock of the whole ``fedlinear run`` command, and the peak RSS of its whole
process tree (every process below it, sampled every 0.2 s, RSS summed over the live processes);
from the run's ``history.json``: per-round times, start-up before round 1, the final test MSE and
the accuracy bar (final test MSE <= 1.01 x the pooled least-squares test MSE). Figures are the
median of ``--repeat`` runs for runs shorter than ``--repeat-limit`` seconds. Ratios (x floor,
x quickstart) are computed within this invocation, between runs of the same mode.

Writes ``OUT/bench.json``, ``OUT/bench.csv``, ``OUT/table.txt`` and ``OUT/scaling.png``.

    fedlinear bench --out bench-results                       # everything (long)
    fedlinear bench --out r --only sim,scaling --max-clients 1000
    fedlinear bench --out r --quick --only sim                # a smoke test in about a minute
"""
