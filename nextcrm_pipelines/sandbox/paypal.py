"""PayPal sandbox emulator (being built): see ../shared/providers/paypal.md section 9 for the checklist."""

from __future__ import annotations

from collections.abc import Callable

from starlette.routing import BaseRoute


class PayPalSandbox:
    """PayPal API emulator state and routes, on the shared sandbox clock."""

    def __init__(self, clock: Callable[[], int]) -> None:
        self.clock = clock

    def routes(self) -> list[BaseRoute]:
        return []
