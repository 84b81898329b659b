"""The local-federation runtime of ``fedlinear run``: what to launch (:mod:`.spec`), launching it and
following the run (:mod:`.launch`), Flower's processes (:mod:`.flower`), stopping every process of a
launch (:mod:`.processes`), the private network namespace (:mod:`.isolation`), the staged app
(:mod:`.staging`) and the run directory's lock (:mod:`.lock`)."""
