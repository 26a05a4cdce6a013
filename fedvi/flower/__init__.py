"""The Flower layer of a site: the ``ClientApp`` (:mod:`fedvi.flower.client`).

This subpackage imports Flower; nothing else under ``fedvi/`` does (``import fedvi`` works
without Flower installed). It speaks :mod:`fedvi.protocol`, the wire format it shares with the
server in ``strategies/``, and calls the same core functions as :func:`fedvi.federated_fit`.
"""
