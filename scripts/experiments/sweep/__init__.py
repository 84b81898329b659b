"""``fedlinear sweep``: what privacy costs, as one table and one plot.

Runs the grid noise multiplier x seed, each point one ``fedlinear run`` (a process of its own: with
``--mode inline`` forked from a warm worker that imported fedlinear once, :mod:`.forked`, else a
subprocess; ``--start``), each in its own run directory ``OUT/runs/z<noise>-s<seed>``, all on ONE
data set: ``--data DIR``, or synthetic data made once into ``OUT/data`` (the default data of ``fedlinear run``: d=10, 1000 samples per client, label
noise 0.1, data seed 42). A noise multiplier of 0 is the non-private run (``dp=none``); any other is
``dp=<--dp>`` (default ``central-server-clip``) with ``dp-noise-multiplier=<noise>``; ``--set`` keys
are passed to every run (``dp-*`` keys to the private runs only).

Several runs go at a time (``--parallel``; default: as many as the machine holds, ~1 core and
~1.5 GiB per simulation run), each bounded by ``--timeout``; a failed run is reported and the sweep
goes on. Run the same command again to resume: completed runs are kept (not rerun), failed or
interrupted ones are moved to ``OUT/attempts/`` and run again, and the grid may grow (more noise
levels, more seeds) as long as the data, clients, rounds, mode and settings stay the same.

Writes ``OUT/sweep.csv`` (one row per run), ``OUT/sweep.md`` (per noise level: the final test MSE
over the pooled least-squares test MSE, mean, std and min-max over seeds; the final epsilon; runs
completed) and ``OUT/sweep.png`` (that ratio against the final epsilon, log x-axis, with the
non-private run and the optimum as reference lines), and prints the table and the total wall time.

    fedlinear sweep --noise 0,0.5,1,2,4 --seeds 3 --out sweep-results
    fedlinear sweep --noise 0,1 --seeds 2 --data DIR --rounds 10 --set dp-clipping-norm=0.5 --out s2
"""
