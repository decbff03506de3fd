"""abflip's shared trust layer: release manifest schema, TUF repository editing, keys.

The device side uses only the read side (manifest parsing, errors); the producer side
edits and signs metadata. Nothing here touches the network.
"""
