"""Flower server side of fedvi: the FedMerDel strategy and the ServerApp."""

from strategies.fedmerdel import FedMerDel, FedMerDelOutcome, SiteFailureError

__all__ = ["FedMerDel", "FedMerDelOutcome", "SiteFailureError"]
