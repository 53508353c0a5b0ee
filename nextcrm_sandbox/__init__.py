"""Local emulators of the providers NextCRM syncs from, for the demo, the tests and the benchmarks.

``nextcrm_sandbox.server`` runs them as one loopback HTTP server; ``.stripe`` emulates the
Stripe API v1.
"""
