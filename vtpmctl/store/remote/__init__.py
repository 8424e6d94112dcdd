"""Remotes: vTPMs kept in an S3-compatible object store shared by many hosts.

``config``  the remotes this host knows (``remotes.json``) and their fleet keys;
``client``  the one S3 client wrapper: boto3 (imported lazily), errors mapped
            to the ``RemoteError`` branch, conditional writes;
``layout``  what the objects in a remote are and mean: key names, the
            instance index, the wrapped instance keys.

Nothing here imports boto3 at import time; only ``client.RemoteClient`` does,
when it is first made. See docs/remotes.md for users, docs/architecture.md
for the map.
"""
