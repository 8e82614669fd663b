"""`sitegen serve`: the progress API and dashboard for upstream frontends and operators (docs/api.md).

A process of its own beside the workers. It imports the store and the client, never the pipeline.
"""
