"""A one-node Kubernetes cluster on this machine, for multisniff's integration tests.

Run through ``tests/cluster/clusterctl``. Every path, address and port the cluster uses is in
``layout``; every other module takes a ``Layout`` and never invents a path of its own.
"""
