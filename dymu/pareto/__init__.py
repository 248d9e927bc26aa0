"""Pareto sets of multi-task models: many models, one per preference, trained jointly.

Modules: :mod:`dymu.pareto.phn` (one hypernetwork that generates a model per preference
ray, PHN / controllable Pareto MTL, METHOD.md 2) with its scalarisations in
:mod:`dymu.pareto.epo` (linear and EPO), and :mod:`dymu.pareto.transfer` (K models with
learned transfer between subproblems, METHOD.md 3).
"""
