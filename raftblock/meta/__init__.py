# The metadata group: the cluster map (state.py), placement (placement.py), replicated by pysyncobj
# (group.py, journal.py), served on the admin port (rpc.py, node.py). The only package importing pysyncobj.
