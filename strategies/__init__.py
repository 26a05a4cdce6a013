"""The Flower server of fedvi: the FedMerDel strategy, its workflows and the ServerApp.

Imports Flower and the core (``fedvi``); never ``simulations`` (which sits on top).
"""
