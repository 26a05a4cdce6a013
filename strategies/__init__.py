"""The Flower server of fedvi: the FedMerDel strategy, its workflows and the ServerApp.

Imports Flower and the core (``fedvi``); never ``simulations`` (which sits on top).
"""

#: Exit codes of a run (``python -m simulations.run``, ``python -m strategies.submit``); any
#: other status is 1.
EXIT_CODES = {"completed": 0, "failed": 1, "completed_with_failures": 3}
