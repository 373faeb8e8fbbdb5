"""The runtime: the engine that groups texts by tokens, batches them and runs the merged graph.
Imports only the core (and errors, io, progress)."""
