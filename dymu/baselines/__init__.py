"""The methods DYMU is compared with, trained on the search's data, backbone and sweep.

``dymu baselines`` (:func:`dymu.baselines.run.run_baselines`) trains them into
``RUN/baselines/`` and writes a report that shows DYMU beside each.
"""
