"""Recipes: the training runs that make the project's committed assets.

They are not part of the runtime library: ``recipes`` may import ``conceptflow``, and
``conceptflow`` never imports ``recipes`` (only the ``conceptflow pretrain-toy`` command does,
inside the command). ``recipes.toy`` makes the toy world's base and evaluators.
"""
