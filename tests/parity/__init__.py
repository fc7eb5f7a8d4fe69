"""Parity of ksbopt's peer optimizers with the reference implementations they are named after.

``make_fixtures.py`` runs the references (the authors' code and ``pytorch-optimizer``, CPU
PyTorch, float64) on the small problems of ``problems.py`` and writes their trajectories to
``fixtures/*.npz``; ``test_parity.py`` replays every fixture with ksbopt.
"""
