"""What runs the worker locally and tests it, apart from what runs in production.

`services`: throwaway PostgreSQL and Redis for `make demo`, `make test` and the benchmarks.
`fake_server`: a real HTTP server speaking the providers' APIs, misbehaving on request.
`offline_site`: the offline provider's site templates (the default provider builds its answers with them).
`screenshot`: the demo's and the quality tests' picture of a page in headless Chromium.
"""
