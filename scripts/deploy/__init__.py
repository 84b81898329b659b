"""Multi-machine federations: credentials (:mod:`.pki`), checking them before Flower does
(:mod:`.preflight`), the SuperLink behind its Fleet front (:mod:`.superlink`, :mod:`.fleetfront`)
and a party's SuperNode (:mod:`.node`). The commands are in :mod:`fedlinear.scripts.cli.deploy`."""
