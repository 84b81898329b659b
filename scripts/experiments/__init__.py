"""Experiments on fedlinear itself, each running ``fedlinear run`` as a user would: the benchmark
(:mod:`.bench`), the privacy/utility sweep (:mod:`.sweep`), the soak test (:mod:`.soak`), real tables
at defaults (:mod:`.realdata`), and the HTML report of run directories (:mod:`.report`)."""
