"""The aggregator interface at its documented path (``from strategies.aggregators import ...``).

The code lives in :mod:`strategies.aggregation`; this module keeps the import path
that the spec and users' scripts name.
"""

from strategies.aggregation import *  # noqa: F403
from strategies.aggregation import __all__ as __all__
