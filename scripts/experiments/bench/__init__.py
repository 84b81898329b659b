"""``fedlinear bench``: how fast fedlinear runs, next to Flower's own floor and a quickstart-style app.

One invocation, on one set of generated data, measures (each run a ``fedlinear run`` or ``fedlinear
sweep`` subprocess):

* ``sim`` / ``processes``: fedlinear (engines ``numpy`` and ``keras``), **the floor** (the no-op app in
  ``benchmarks/noop_app``, launched by the same launcher but on Flower's engine as Flower starts it: no
  TensorFlow guard, Ray's own settings, Flower's own cold ``flwr-clientapp`` per message; ``--tuned-floor``
  adds the floor with what the launcher gives fedlinear's app (in ``scaling`` its Ray settings, in
  ``processes`` its warm ClientApps), to show what they are worth) and **the quickstart-style reference**
  (``benchmarks/quickstart_app``; in processes mode only with ``--quickstart-processes``), at
  ``--clients`` x ``--rounds`` (10 x 20) in simulation, ``--clients`` x ``--processes-rounds`` (10 x 5)
  in processes mode (run last: the slowest);
* ``inline``: fedlinear in inline mode at 10 x 20 and ``--inline-scaling-clients`` (1000, 10000) x 3,
  its ratios to the simulation floor of the same size, its weights compared with simulation's;
* ``sweep``: ``fedlinear sweep --mode inline`` (``--sweep-noise`` x ``--sweep-seeds``, 5 x 3) on its
  default data, the whole command timed;
* ``scaling``: fedlinear and the floor in simulation at 10, 100, 1000, 10000 clients x 3 rounds;
* ``central``: the pooled NumPy least-squares fit and centralized Keras training of the same data.

The parts: :mod:`.cases` (the plan, one case's runs and figures, the ratios, and ``TARGETS``, the
targets declared with their references), :mod:`.measure` (one command's wall clock, CPU and peak RSS
of its process tree), :mod:`.harness` (one invocation), :mod:`.tables` (the tables and the targets
judged), :mod:`.plots` (``ratios.png``, ``scaling.png``), :mod:`.worker` (the central baselines).

For every run: wall clock of the whole command, and the peak RSS of its whole process tree (every
process below it, sampled every 0.2 s, RSS summed over the live processes); from the run's
``history.json``: per-round times, start-up before round 1, the final test MSE and the accuracy bar
(final test MSE <= 1.01 x the pooled least-squares test MSE). Figures are the median of ``--repeat``
runs for runs shorter than ``--repeat-limit`` seconds. Ratios (x floor, x quickstart) are computed
within this invocation, between runs of the same mode (inline: to the simulation floor).

Writes ``OUT/bench.json``, ``OUT/bench.csv``, ``OUT/table.txt``, ``OUT/ratios.png`` and ``OUT/scaling.png``.

    fedlinear bench --out bench-results                       # everything (long)
    fedlinear bench --out r --only sim,scaling --max-clients 1000
    fedlinear bench --out r --quick --only sim,inline,sweep   # a smoke test in about a minute and a half
"""
