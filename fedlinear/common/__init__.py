"""Source layout: this sub-package's modules live in the repository's top-level folder of the same name."""
import os as _os

__path__ = [_os.path.join(_os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))), __name__.rpartition(".")[2])]
