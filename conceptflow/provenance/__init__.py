"""What a registered version was made from, read back from the registry, and rebuilt from it.

``chain``: the lineage chain of a version (dataset md5 -> masks md5 -> config -> code revision
-> base model -> adapter md5 -> version; a combination's concept versions, each with its own
chain). ``rebuild``: retrain a registered concept in a fresh folder from its recorded config
and its recorded data (pulled by md5 from the DVC remote) and compare the adapter bit for bit.
"""
