"""Data-subject requests by mail: mail to ``privacy.request_address`` is stored like any
mail, and the pipeline records it as a request in the transaction that saves it
(status ``received``).  ``RequestIntake`` reads each: mail to ``address+TENANT@`` names
its tenant and is forwarded, with the request quoted, to that tenant's privacy contact
at once; any other waits ``unassigned`` (logged, counted among the open requests and
their deadline) until ``request assign`` names the tenant.  A request is read once:
the change of its status is the claim, so instances on one database share the work."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from gateway.clock import utcnow
from gateway.config import GatewayConfig
from gateway.policyset import PolicySet
from gateway.privacy.incident import NoticeError
from gateway.privacy.keys import PrivacyKey
from gateway.privacy.requests import read_mail_request
from gateway.runner import Runner
from gateway.store.models import REQUEST_RECEIVED
from gateway.store.privacy import PrivacyStore
from gateway.store.repository import Store
from gateway.store.requests import RequestStore
from gateway.tenancy import subaddress

log = logging.getLogger(__name__)


class RequestIntake(Runner):
    def __init__(self, store: Store, config: GatewayConfig, policies: Callable[[], PolicySet],
                 key: PrivacyKey, interval: float) -> None:
        super().__init__("requests", log)
        self.store = store
        self.config = config
        self.policies = policies
        self.key = key
        self.interval = interval

    async def turn(self) -> float:
        await asyncio.to_thread(self.read_all)
        return self.interval

    async def failed(self, exc: Exception) -> float:
        log.exception("data-subject requests by mail: reading them failed")
        return self.interval

    def read_all(self) -> None:
        rows = RequestStore(self.store).mail_requests()
        if not rows:
            return
        inactive = PrivacyStore(self.store).inactive_tenants()
        for row in rows:
            self.read(row, inactive)

    def tenant_named(self, row: dict[str, Any], inactive: set[str]) -> str:
        """The tenant the request's address names (privacy+acme@: acme), or ""."""
        address = self.config.privacy.request_address or ""
        for recipient in row["recipients"]:
            tag = (subaddress(recipient, address) or "").lower()
            if tag in self.config.tenants and tag not in inactive:
                return tag
        return ""

    def read(self, row: dict[str, Any], inactive: set[str]) -> None:
        tenant = self.tenant_named(row, inactive)
        routing = self.policies().subprocessors
        try:
            to = read_mail_request(self.store, self.config, routing, self.key, row,
                                   REQUEST_RECEIVED, tenant=tenant, kind="other",
                                   subject=None, to=None, actor="gateway", now=utcnow())
        except NoticeError as exc:  # the tenant names no privacy contact: a human decides
            log.warning("data-subject request %d by mail for tenant %s cannot be forwarded "
                        "(%s): request assign %d --tenant %s --to ADDRESS", row["id"], tenant,
                        exc, row["id"], tenant)
            read_mail_request(self.store, self.config, routing, self.key, row,
                              REQUEST_RECEIVED, tenant="", kind="other", subject=None,
                              to=None, actor="gateway", now=utcnow())
            return
        if to is None:
            return  # another instance read it
        if tenant:
            log.info("data-subject request %d by mail forwarded to tenant %s (%s)", row["id"],
                     tenant, to)
        else:
            log.warning("data-subject request %d by mail names no tenant: say which with "
                        "request assign %d --tenant TENANT --kind KIND", row["id"], row["id"])
