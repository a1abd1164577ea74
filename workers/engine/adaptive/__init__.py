"""Adaptive merging: merging coefficients (and per-task layers) learned on unlabeled task inputs before the merge.

`method.py` is the torch-free base the method modules subclass; `data.py` reads and checks the inputs, `models.py`
runs each task's architecture functionally over merged tensors, `loop.py` optimises, `report.py` writes what it
learned.
"""
