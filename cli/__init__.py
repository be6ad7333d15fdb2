"""``qplan`` command line: a thin layer over the planner's library API and the backends.

The only package that imports both ``qplan.planner`` and ``qplan.backends``; both are imported
lazily inside the commands, so ``qplan estimate`` on a bundled model imports no torch.
"""
