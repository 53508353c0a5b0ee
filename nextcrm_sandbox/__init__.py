"""Local emulators of the providers NextCRM syncs from, for the demo, the tests and the benchmarks.

``nextcrm_sandbox.server`` serves them all on one loopback HTTP server: ``.stripe``, ``.xero``,
``.quickbooks``, ``.myob``, ``.paypal``, ``.billionmail`` and ``.mautic``, one package each, with
the shared OAuth (``.oauth``) and signed-webhook delivery (``.webhooks``). ``.cli`` is the
``nextcrm-sandbox`` command. The runtime package, ``nextcrm_pipelines``, never imports this one.
"""
