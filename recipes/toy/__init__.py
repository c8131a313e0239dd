"""How the toy world's assets (``assets/toy-base``) are made.

- ``pretrain``: the toy base, a tiny SD-1.x pipeline trained from scratch on the scene stream,
  with its model card.
- ``evaluators``: training of the recogniser and the identity encoder whose models, loading and
  inference live in ``conceptflow.toy.evaluators``.
- ``build``: both in one call (``conceptflow pretrain-toy``).
"""
