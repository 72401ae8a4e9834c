"""The console's pages on Twisted web: server-rendered HTML (Jinja2, autoescaped), in French,
one style sheet, no JavaScript.

Every request but the style sheet and the login page needs a session (gateway.console.
sessions): without one, a GET is sent to /login and a POST refused (403). Every POST carries
the session's CSRF token in a hidden field (compared in constant time; 403 without it), and
a POST whose Origin is another site is refused. Roles: viewers read; operators also replay
and dead-letter deliveries; admins also see the accounts and reload the mapping set.

Database work runs on the Database's pool threads, scrypt and page rendering on the
reactor's thread pool: the reactor thread only routes. Each view of a message's content
emits `message.read` (who, which message, from where), a search by patient identifier
`message.searched` (who, which messages it showed), a replay `delivery.replayed`, a
login `console.login` and a logout `console.logout` on the event bus: the audit trail keeps
them. Logs carry ids, never patient data.
"""
from __future__ import annotations

import functools
import hmac
import ipaddress
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo
from urllib.parse import parse_qs, urlencode

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from twisted.internet import defer, protocol, threads
from twisted.web import http, resource, server

from gateway import fhir_json
from gateway.config import ROLES, AdminListenerConfig, ConsoleAccount, GatewayConfig
from gateway.console import actions, queries
from gateway.console.criteria import STATUSES, InvalidSearch, parse_search
from gateway.console.hl7_layout import layout
from gateway.console.passwords import DUMMY_HASH, MAX_PASSWORD, verify_password
from gateway.console.sessions import (COOKIE, Session, close_session, find_session, new_session,
                                      opened_with, store_session, touch_session)
from gateway.console.throttle import LoginThrottle
from gateway.events import Event, EventBus
from gateway.http_deadline import RequestDeadline
from gateway.http_request import Request

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
MAX_BODY = 64 * 1024  # a console form is small; a larger body is refused (413)
MAX_QUERY = 4096  # characters of a query string
MAX_FIELDS = 32
# Passwords checked at once (scrypt: about 0.1 s and 32 MiB each, on the reactor's thread pool,
# which page rendering and the REST door share) and logins waiting their turn; more are
# refused at once (503), so that a flood of logins stalls neither.
LOGIN_CHECKS = 2
LOGIN_WAITING = 16
_TOKEN = re.compile(r"[A-Za-z0-9_-]{20,128}")
_SECURITY_HEADERS = {
    b"content-security-policy": b"default-src 'none'; style-src 'self'; img-src 'self'; "
                                b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"same-origin",
    b"x-frame-options": b"DENY",
    b"cache-control": b"no-store",
}

STATUS_LABELS = {"received": "reçu", "translated": "traduit", "failed": "échec de traduction",
                 "rejected": "refusé", "ignored": "ignoré"}
DELIVERY_LABELS = {"pending": "en attente", "delivered": "livrée", "dead": "lettre morte"}
OUTCOME_LABELS = {"delivered": "livrée", "transient": "échec temporaire", "permanent": "refus définitif"}
ROLE_LABELS = {"viewer": "lecture", "operator": "opérateur", "admin": "administrateur"}
NOTICES = {  # notice code -> (text, is an error)
    actions.REPLAYED: ("Nouvelle tentative programmée : la livraison repart maintenant, avec la même "
                       "clé d'idempotence.", False),
    actions.DEAD_LETTERED: ("Livraison mise en lettre morte.", False),
    actions.IN_FLIGHT: ("Livraison en cours d'envoi par un nœud : réessayez dans un instant.", True),
    actions.NOT_PENDING: ("Seule une livraison en attente peut être mise en lettre morte.", True),
    actions.NOT_FOUND: ("Livraison introuvable pour ce message.", True),
    actions.EXPIRED: ("Sortie canonique expirée (rétention) : rien à renvoyer.", True),
    "reloaded": ("Jeu de mappings rechargé.", False),
    "reload-refused": ("Jeu de mappings refusé : l'ancien reste en service (voir le journal).", True),
}


@dataclass
class ConsoleContext:
    """What the console reads and acts on, from the running gateway."""

    config: GatewayConfig
    listener: AdminListenerConfig
    database: Any  # gateway.store.database.Database
    reactor: Any
    events: EventBus = field(default_factory=EventBus)
    registry: Callable[[], Any] | None = None  # -> FacilityRegistry in force
    mappings: Callable[[], Any] | None = None  # -> MappingSet in force, or None
    reload_mappings: Callable[[], defer.Deferred] | None = None  # -> Deferred[bool]
    wake_delivery: Callable[[], None] | None = None  # the delivery service's wake
    now: Callable[[], float] = time.time


class Forbidden(Exception):
    pass


@dataclass
class _Call:
    """One request as the handlers see it."""

    request: Any
    method: str
    path: str
    params: dict[str, list[str]]
    form: dict[str, list[str]]
    source: str
    session: Session | None = None

    def one(self, name: str, cap: int = 1024) -> str:
        values = self.form.get(name) or [""]
        return values[0][:cap]


class ConsoleRequest(Request):
    """A request whose body is dropped once it exceeds MAX_BODY (answered 413)."""

    too_large = False
    _received = 0

    def gotLength(self, length):
        if length is not None and length > MAX_BODY:
            self.too_large = True
            length = 0  # keep nothing
        super().gotLength(length)

    def handleContentChunk(self, data):
        self._received += len(data)
        if self.too_large or self._received > MAX_BODY:
            self.too_large = True
            return
        super().handleContentChunk(data)


class Console(resource.Resource):
    isLeaf = True

    def __init__(self, context: ConsoleContext):
        super().__init__()
        self.context = context
        console = context.config.console
        self.accounts: dict[str, ConsoleAccount] = {a.name: a for a in console.accounts}
        self.throttle = LoginThrottle(console.login_attempts, console.login_pause)
        self.password_checks = defer.DeferredSemaphore(LOGIN_CHECKS)
        self.templates = Environment(loader=FileSystemLoader(str(_HERE / "templates")),
                                     autoescape=True, undefined=StrictUndefined,
                                     trim_blocks=True, lstrip_blocks=True, finalize=_shown)
        # Times are shown and searched on the operators' wall clock (console.timezone).
        self.zone = ZoneInfo(console.timezone)
        self.templates.filters.update(when=functools.partial(_when, zone=self.zone),
                                      duration=_duration, percent=_percent)
        self.templates.globals["zone"] = console.timezone
        self.stylesheet = (_HERE / "static" / "console.css").read_bytes()
        self.routes: list[tuple[str, re.Pattern, str, Callable]] = [
            ("GET", re.compile(r"/"), "viewer", self._home),
            ("GET", re.compile(r"/messages"), "viewer", self._messages),
            ("GET", re.compile(r"/messages/(\d{1,18})"), "viewer", self._message),
            ("POST", re.compile(r"/messages/(\d{1,18})/deliveries/(\d{1,18})/replay"), "operator", self._replay),
            ("POST", re.compile(r"/messages/(\d{1,18})/deliveries/(\d{1,18})/dead-letter"), "operator",
             self._dead_letter),
            ("GET", re.compile(r"/destinations"), "viewer", self._destinations),
            ("GET", re.compile(r"/facilities"), "viewer", self._facilities),
            ("GET", re.compile(r"/mappings"), "viewer", self._mappings),
            ("POST", re.compile(r"/mappings/reload"), "admin", self._reload),
            ("GET", re.compile(r"/accounts"), "admin", self._accounts),
            ("POST", re.compile(r"/logout"), "viewer", self._logout),
        ]

    # -- dispatch ----------------------------------------------------------------------------

    def render(self, request):
        d = defer.ensureDeferred(self._serve(request))
        d.addErrback(self._crashed, request)
        return server.NOT_DONE_YET

    async def _serve(self, request) -> None:
        method = request.method.decode("ascii", "replace")
        if method == "HEAD":
            method = "GET"
        path = request.path.decode("utf-8", "replace")
        if not self._host_allowed(request):
            return await self._error(request, None, 421, "Nom d'hôte inconnu",
                                     "La console ne répond qu'à ses adresses IP, à localhost et aux noms "
                                     f"de listeners.admin ({self.context.listener.name}).hosts.")
        if getattr(request, "too_large", False):
            return await self._error(request, None, 413, "Requête trop grande",
                                     f"Un formulaire de la console fait au plus {MAX_BODY} octets.")
        if path == "/static/console.css" and method == "GET":
            return self._send(request, 200, self.stylesheet, b"text/css; charset=utf-8",
                              cache=b"private, max-age=3600")
        query = request.uri.partition(b"?")[2]
        try:
            if len(query) > MAX_QUERY:
                raise ValueError("query too long")
            params = parse_qs(query.decode("ascii", "strict"), keep_blank_values=True,
                              errors="strict", max_num_fields=MAX_FIELDS)
            form = {}
            if method == "POST":
                request.content.seek(0)
                form = parse_qs(request.content.read().decode("ascii", "strict"),
                                keep_blank_values=True, errors="strict", max_num_fields=MAX_FIELDS)
        except (ValueError, UnicodeDecodeError):
            return await self._error(request, None, 400, "Requête invalide",
                                     "Paramètres illisibles, trop longs ou trop nombreux.")
        call = _Call(request, method, path, params, form, _source(request))
        if method == "POST" and not self._same_origin(request):
            return await self._error(request, None, 403, "Refusé", "Formulaire venu d'un autre site.")
        if path == "/login":
            if method == "GET":
                return await self._login_page(call, 200)
            if method == "POST":
                return await self._login(call)
            return await self._error(request, None, 405, "Méthode non permise", "GET ou POST.")
        call.session = await self._session(request)
        if call.session is None:
            if method == "GET":
                target = path + ("?" + query.decode("utf-8") if query else "")
                return self._redirect(request, "/login?" + urlencode({"next": target}))
            return await self._error(request, None, 403, "Refusé", "Session absente ou expirée.")
        for route_method, pattern, role, handler in self.routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if route_method != method:
                continue
            if ROLES.index(call.session.role) < ROLES.index(role):
                return await self._error(request, call.session, 403, "Refusé",
                                         f"Réservé au rôle {role} ou plus.")
            if method == "POST" and not self._csrf_ok(call):
                return await self._error(request, call.session, 403, "Refusé",
                                         "Jeton de formulaire absent ou invalide : rechargez la page.")
            return await handler(call, *match.groups())
        if any(pattern.fullmatch(path) for _, pattern, _, _ in self.routes):
            return await self._error(request, call.session, 405, "Méthode non permise",
                                     "Cette page ne répond pas à cette méthode.")
        return await self._error(request, call.session, 404, "Page introuvable",
                                 "Aucune page à cette adresse.", back="/messages")

    def _host_allowed(self, request) -> bool:
        """Over plain HTTP, a Host that is not an address, localhost or a configured name is a
        page whose DNS name was pointed at this port (DNS rebinding): the browser would give it
        the console as its own origin, to try passwords with and read. Over TLS, the
        certificate's names already refuse it."""
        listener = self.context.listener
        host = request.getHeader(b"host")
        if listener.tls or host is None:
            return True
        name = host.decode("ascii", "replace").strip().lower()
        if name.startswith("["):  # [IPv6]:port
            name = name[1:].partition("]")[0]
        elif ":" in name:
            name = name.rpartition(":")[0]
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return name == "localhost" or name in listener.hosts

    def _same_origin(self, request) -> bool:
        origin = request.getHeader(b"origin")
        if origin is None:
            return True  # no Origin (older clients): the CSRF token still decides
        host = request.getHeader(b"host") or b""
        return origin in (b"http://" + host, b"https://" + host)

    def _csrf_ok(self, call: _Call) -> bool:
        given = call.form.get("csrf_token") or []
        if len(given) != 1:
            return False
        return hmac.compare_digest(given[0].encode("utf-8"), call.session.csrf_token.encode("utf-8"))

    async def _session(self, request) -> Session | None:
        token = request.getCookie(COOKIE.encode("ascii"))
        if not token:
            return None
        token = token.decode("ascii", "replace")
        if not _TOKEN.fullmatch(token):
            return None
        console = self.context.config.console
        now = self._now()
        found = await self.context.database.run(find_session, token, now, console.session_idle_timeout)
        if found.ended:
            await self.context.database.run_write(close_session, token)
        elif found.touch:
            await self.context.database.run_write(touch_session, token, now)
        session = found.session
        if session is None:
            return None
        account = self.accounts.get(session.account)
        if account is None:  # removed from the configuration since
            return None
        if not opened_with(session, token, account.password_hash):  # its password changed since
            await self.context.database.run_write(close_session, token)
            return None
        if account.role != session.role:
            session = Session(session.account, account.role, session.csrf_token, session.source,
                              session.created_at, session.expires_at)
        return session

    # -- login -------------------------------------------------------------------------------

    async def _login_page(self, call: _Call, status: int, error: str | None = None,
                          username: str = "") -> None:
        target = (call.params.get("next") or call.form.get("next") or ["/messages"])[0]
        await self._page(call.request, None, status, "login.html", title="Connexion",
                         next=_local(target), error=error, username=username)

    async def _login(self, call: _Call) -> None:
        username = call.one("username", 64).strip()
        password = call.one("password", MAX_PASSWORD)
        console = self.context.config.console
        host = call.source.rsplit(":", 1)[0]
        now = self.context.now()
        checks = self.password_checks
        if checks.tokens == 0 and len(checks.waiting) >= LOGIN_WAITING:
            self._emit("console.login", username or "?", call, outcome="refused",
                       detail={"reason": "busy"})
            return await self._login_page(call, 503, "Trop de connexions en cours : réessayez dans un instant.",
                                          username)
        if not self.throttle.attempt(username, host, now):  # counts it as failed until it succeeds
            self._emit("console.login", username or "?", call, outcome="refused",
                       detail={"reason": "throttled"})
            return await self._login_page(call, 429, "Trop de tentatives : réessayez dans quelques minutes.",
                                          username)
        account = self.accounts.get(username)
        stored = account.password_hash if account is not None else DUMMY_HASH
        pool = self.context.reactor.getThreadPool()
        good = await checks.run(threads.deferToThreadPool, self.context.reactor, pool, verify_password,
                                password, stored)
        if account is None or not good or not username:
            self._emit("console.login", username or "?", call, outcome="refused",
                       detail={"reason": "bad credentials"})
            log.info("console login refused from %s", call.source)
            return await self._login_page(call, 401, "Identifiant ou mot de passe incorrect.", username)
        self.throttle.succeeded(username, host)
        token, session = new_session(account.name, account.role, call.source, self._now(),
                                     console.session_max_age, account.password_hash)
        await self.context.database.run_write(store_session, token, session, console.session_idle_timeout)
        call.request.addCookie(COOKIE.encode("ascii"), token.encode("ascii"), path=b"/",
                               httpOnly=True, secure=self.context.listener.tls, sameSite="strict")
        self._emit("console.login", account.name, call)
        log.info("console login: %s (%s) from %s", account.name, account.role, call.source)
        self._redirect(call.request, _local(call.one("next", 2048)))

    async def _logout(self, call: _Call) -> None:
        token = (call.request.getCookie(COOKIE.encode("ascii")) or b"").decode("ascii", "replace")
        await self.context.database.run_write(close_session, token)
        call.request.addCookie(COOKIE.encode("ascii"), b"", path=b"/", httpOnly=True,
                               secure=self.context.listener.tls, sameSite="strict",
                               expires=b"Thu, 01 Jan 1970 00:00:00 GMT", max_age=b"0")
        self._emit("console.logout", call.session.account, call)
        self._redirect(call.request, "/login")

    # -- pages -------------------------------------------------------------------------------

    async def _home(self, call: _Call) -> None:
        self._redirect(call.request, "/messages")

    async def _messages(self, call: _Call) -> None:
        form = {name: (call.params.get(name) or [""])[0][:256]
                for name in ("control_id", "patient", "facility", "type", "status", "since", "until")}
        try:
            criteria = parse_search(call.params, self.zone)
        except InvalidSearch as invalid:
            return await self._page(call.request, call.session, 400, "messages.html", title="Messages",
                                    section="messages", form=form, problems=invalid.problems,
                                    page=None, next_link=None, statuses=_statuses(),
                                    status_labels=STATUS_LABELS)
        page = await self.context.database.run(queries.search_messages, criteria)
        if criteria.patient is not None:
            # Which messages concern a patient is patient data: who asked, and what it showed
            # (ids; the identifier itself never goes into the audit trail).
            self._emit("message.searched", call.session.account, call, subject="messages",
                       detail={"criteria": sorted(k for k, v in criteria.query().items() if v),
                               "results": len(page.rows), "messages": [row.id for row in page.rows]})
        next_link = None
        if page.next_before is not None:
            next_link = "/messages?" + urlencode(criteria.query(before=page.next_before))
        await self._page(call.request, call.session, 200, "messages.html", title="Messages",
                         section="messages", form=criteria.form_values(), problems=[], page=page,
                         next_link=next_link, statuses=_statuses(), status_labels=STATUS_LABELS)

    async def _message(self, call: _Call, message_id: str) -> None:
        view = await self.context.database.run(queries.message_view, int(message_id), self._now())
        if view is None:
            return await self._error(call.request, call.session, 404, "Message introuvable",
                                     f"Aucun message n° {int(message_id)}.", back="/messages")
        self._emit("message.read", call.session.account, call, subject=f"message/{view.id}",
                   facility=view.sender_id, message_type=view.message_type,
                   detail={"view": "console"})
        notice = NOTICES.get((call.params.get("notice") or [""])[0])
        pool = self.context.reactor.getThreadPool()
        extra = await threads.deferToThreadPool(self.context.reactor, pool, _presentation, view)
        await self._page(call.request, call.session, 200, "message.html",
                         title=f"Message n° {view.id}", section="messages", m=view,
                         notice=notice[0] if notice else None,
                         notice_error=notice[1] if notice else False,
                         status_labels=STATUS_LABELS, delivery_labels=DELIVERY_LABELS,
                         outcome_labels=OUTCOME_LABELS, **extra)

    async def _replay(self, call: _Call, message_id: str, delivery_id: str) -> None:
        outcome, destination = await self.context.database.run_write(
            actions.replay_delivery, int(message_id), int(delivery_id), self._now())
        if outcome == actions.REPLAYED:
            self._emit("delivery.replayed", call.session.account, call,
                       subject=f"delivery/{int(delivery_id)}", destination=destination,
                       detail={"message": int(message_id)})
            log.info("console: %s replayed delivery %s of message %s", call.session.account,
                     delivery_id, message_id)
            if self.context.wake_delivery is not None:
                self.context.wake_delivery()
        self._redirect(call.request, f"/messages/{int(message_id)}?notice={outcome}")

    async def _dead_letter(self, call: _Call, message_id: str, delivery_id: str) -> None:
        outcome, destination = await self.context.database.run_write(
            actions.dead_letter, int(message_id), int(delivery_id), self._now(), call.session.account)
        if outcome == actions.DEAD_LETTERED:
            self._emit("delivery.dead", call.session.account, call,
                       subject=f"delivery/{int(delivery_id)}", destination=destination,
                       detail={"message": int(message_id), "reason": "console"})
            log.info("console: %s dead-lettered delivery %s of message %s", call.session.account,
                     delivery_id, message_id)
        self._redirect(call.request, f"/messages/{int(message_id)}?notice={outcome}")

    async def _destinations(self, call: _Call) -> None:
        now = self._now()
        stats = await self.context.database.run(queries.destination_stats, now)
        rows = []
        configured = {d.name: d for d in self.context.config.destinations}
        for name in list(configured) + sorted(set(stats) - set(configured)):
            found = stats.get(name) or queries.DestinationStats(name)
            config = configured.get(name)
            oldest = found.oldest_pending_at
            rows.append({"name": name, "kind": config.kind if config else None,
                         "url": config.url if config else None, "stats": found,
                         "oldest_age": (now - oldest).total_seconds() if oldest else None})
        await self._page(call.request, call.session, 200, "destinations.html", title="Destinations",
                         section="destinations", destinations=rows)

    async def _facilities(self, call: _Call) -> None:
        now = self._now()
        seen = await self.context.database.run(queries.certificates)
        registry = self.context.registry() if self.context.registry else None
        facilities = registry.facilities if registry is not None else self.context.config.senders
        by_facility: dict[str, list] = {}
        for cert in seen:
            by_facility.setdefault(cert.facility_id, []).append(_certificate(cert, now))
        rows = [{"id": f.id, "name": f.name, "type": f.type, "msh4": f.facilities or (f.id,),
                 "certificates": by_facility.pop(f.id, [])} for f in facilities]
        unknown = [c for certs in by_facility.values() for c in certs]
        await self._page(call.request, call.session, 200, "facilities.html", title="Établissements",
                         section="facilities", facilities=rows, unknown=unknown)

    async def _mappings(self, call: _Call) -> None:
        mappings = self.context.mappings() if self.context.mappings else None
        files: list[dict] = []
        if mappings is not None:
            pool = self.context.reactor.getThreadPool()
            files = await threads.deferToThreadPool(self.context.reactor, pool, _mapping_files,
                                                    Path(mappings.directory))
        notice = NOTICES.get((call.params.get("notice") or [""])[0])
        await self._page(call.request, call.session, 200, "mappings.html", title="Mappings",
                         section="mappings", version=mappings.version if mappings else None,
                         count=mappings.files if mappings else 0,
                         directory=str(mappings.directory) if mappings else "", files=files,
                         can_reload=self.context.reload_mappings is not None,
                         notice=notice[0] if notice else None,
                         notice_error=notice[1] if notice else False)

    async def _reload(self, call: _Call) -> None:
        if self.context.reload_mappings is None:
            return await self._error(call.request, call.session, 404, "Pas de mappings",
                                     "Cette passerelle ne traduit pas.", back="/mappings")
        replaced = await self.context.reload_mappings()
        mappings = self.context.mappings() if self.context.mappings else None
        self._emit("mappings.reloaded", call.session.account, call, subject="mappings",
                   outcome="success" if replaced else "refused",
                   detail={"version": mappings.version if mappings else None})
        self._redirect(call.request, "/mappings?notice=" + ("reloaded" if replaced else "reload-refused"))

    async def _accounts(self, call: _Call) -> None:
        console = self.context.config.console
        sessions = await self.context.database.run(queries.open_sessions, self._now(),
                                                   console.session_idle_timeout)
        await self._page(call.request, call.session, 200, "accounts.html", title="Comptes",
                         section="accounts", accounts=console.accounts, sessions=sessions)

    # -- answers -----------------------------------------------------------------------------

    async def _page(self, request, session: Session | None, status: int, template: str,
                    **values) -> None:
        values.setdefault("section", "")
        values.setdefault("notice", None)
        values.setdefault("notice_error", False)
        role = session.role if session else None
        values.update(account=session.account if session else None, role=role,
                      role_label=ROLE_LABELS.get(role or "", ""),
                      csrf_token=session.csrf_token if session else "",
                      is_operator=bool(session) and ROLES.index(role) >= ROLES.index("operator"),
                      is_admin=role == "admin")
        pool = self.context.reactor.getThreadPool()
        html = await threads.deferToThreadPool(self.context.reactor, pool,
                                               self.templates.get_template(template).render, **values)
        self._send(request, status, html.encode("utf-8"), b"text/html; charset=utf-8")

    async def _error(self, request, session: Session | None, status: int, title: str, message: str,
                     back: str | None = None) -> None:
        await self._page(request, session, status, "error.html", title=title, message=message, back=back)

    def _redirect(self, request, location: str) -> None:
        request.setHeader(b"location", location.encode("utf-8"))
        self._send(request, 303, b"", b"text/plain; charset=utf-8")

    def _send(self, request, status: int, body: bytes, content_type: bytes,
              cache: bytes = b"no-store") -> None:
        if request.finished or getattr(request, "_disconnected", False) or request.channel is None:
            return
        request.setResponseCode(status)  # with its reason phrase (gateway.http_request)
        for name, value in _SECURITY_HEADERS.items():
            request.setHeader(name, value)
        if self.context.listener.tls:  # browsers then never try the console over plain HTTP
            request.setHeader(b"strict-transport-security", b"max-age=31536000")
        request.setHeader(b"cache-control", cache)
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"content-length", str(len(body)).encode("ascii"))
        request.write(body)
        request.finish()

    def _crashed(self, failure, request) -> None:
        log.error("console: internal error on %s %s: %s", request.method.decode("ascii", "replace"),
                  request.path.decode("utf-8", "replace")[:200], failure.getErrorMessage())
        log.debug("console error", exc_info=(failure.type, failure.value, failure.getTracebackObject()))
        self._send(request, 500, "Erreur interne de la console ; voir le journal.".encode("utf-8"),
                   b"text/plain; charset=utf-8")

    # -- helpers -----------------------------------------------------------------------------

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.context.now(), timezone.utc)

    def _emit(self, kind: str, actor: str, call: _Call, outcome: str = "success", **fields) -> None:
        self.context.events.emit(Event(kind, actor[:128], outcome=outcome, source=call.source,
                                       listener=self.context.listener.name, **fields))


def _presentation(view: queries.MessageView) -> dict:
    """The message's text, segments, ACK and pretty bundle (off the reactor thread)."""
    text = view.decode(view.raw) if view.raw is not None else None
    segments = None
    if text is not None and view.format == "hl7v2":
        segments = layout(text, view.version)
    bundle_text = None
    if view.bundle is not None:
        try:
            # Decimals as stored (fhir_json): json's floats showed 5.10 as 5.1 and 0.010 as
            # 0.01, where FHIR gives the precision meaning.
            bundle_text = fhir_json.dumps(fhir_json.loads(view.bundle), indent=True).decode("utf-8")
        except ValueError:
            bundle_text = view.bundle
    return {"text": text, "segments": segments,
            "ack_text": view.decode(view.ack) if view.ack is not None else None,
            "bundle_text": bundle_text}


def _certificate(cert: queries.CertificateRow, now: datetime) -> dict:
    days = (cert.not_after - now).total_seconds() / 86400
    state = "expired" if days < 0 else "expiring" if days < 30 else "valid"
    return {**cert.__dict__, "days_left": int(days), "state": state}


def _mapping_files(directory: Path) -> list[dict]:
    """The files the mapping set is made of (as MappingSet.load reads them: each kind's
    folder, shared and per facility), relative to its directory."""
    from gateway.mapping.mapping_set import KINDS

    folders = [directory] + sorted(p for p in (directory / "senders").glob("*") if p.is_dir())
    found = []
    for folder in folders:
        for kind in KINDS:
            for path in sorted((folder / kind).glob("*.yaml")):
                found.append({"path": str(path.relative_to(directory)), "size": path.stat().st_size})
    return found


def _statuses() -> list[tuple[str, str]]:
    return [(status, STATUS_LABELS[status]) for status in STATUSES]


def _source(request) -> str:
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    return f"{host}:{address.port}" if host is not None else "?"


def _local(target: str) -> str:
    """A path of this site to go to after login; anything else goes to /messages."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target or \
            any(ord(c) < 32 for c in target) or target.startswith("/login") or target.startswith("/logout"):
        return "/messages"
    return target


def _when(value: datetime | None, zone: tzinfo = timezone.utc) -> str:
    """An instant on the console's clock, with its offset (Morocco moves between +01 and +00
    around Ramadan): 2026-11-22 10:15:03 +01."""
    if value is None:
        return "—"
    return value.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S %Z")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} j {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def _percent(value: float) -> str:
    return f"{value * 100:.1f} %".replace(".", ",")


# Bidi overrides (LRO, RLO) force one direction on what follows whatever its script: a PID-3 of
# "\u202e654321" read "123456" on the page. Arabic needs none (dir="auto" turns it right to
# left): every value is shown with them named instead.
_OVERRIDES = {0x202D: "<U+202D>", 0x202E: "<U+202E>"}


def _shown(value: Any) -> Any:
    """A value as the templates print it (Jinja's finalize), bidi overrides named."""
    if isinstance(value, str) and ("\u202d" in value or "\u202e" in value):
        return value.translate(_OVERRIDES)
    return value


def site(context: ConsoleContext, extra: dict[str, resource.Resource] | None = None) -> server.Site:
    """The admin listener's site: `extra` resources mounted at their paths ("metrics",
    "health/live", ...: no login), the console everywhere else."""
    root = _Root(Console(context))
    for path, child in (extra or {}).items():
        root.mount(path, child)
    built = _ConsoleSite(root, requestFactory=ConsoleRequest, timeout=60)
    built.displayTracebacks = False
    return built


class _Root(resource.Resource):
    """Mounted children first (exact path segments), the console for every other path."""

    def __init__(self, console: Console):
        super().__init__()
        self.console = console

    def mount(self, path: str, child: resource.Resource) -> None:
        parts = [p for p in path.strip("/").split("/") if p]
        if not parts:
            raise ValueError("an extra resource needs a path")
        parent: resource.Resource = self
        for part in parts[:-1]:
            existing = parent.children.get(part.encode("ascii"))
            if existing is None:
                existing = _Folder(self.console)
                parent.putChild(part.encode("ascii"), existing)
            parent = existing
        parent.putChild(parts[-1].encode("ascii"), child)

    def getChild(self, path, request):
        return self.console  # a leaf: it reads request.path whole


class _Folder(resource.Resource):
    """A path segment holding mounted resources; other paths below it go to the console."""

    def __init__(self, console: Console):
        super().__init__()
        self.console = console

    def getChild(self, path, request):
        return self.console

    def render(self, request):
        return self.console.render(request)


class _ConsoleChannel(RequestDeadline, http.HTTPChannel):
    """A request not arrived whole within the site's `read_timeout` is answered 408 and the
    connection closed (gateway.http_deadline)."""

    @property
    def read_timeout(self) -> float:
        return self.site.read_timeout

    def too_slow(self) -> None:
        body = f"Requête non reçue en entier dans les {self.read_timeout:g} s.\n".encode("utf-8")
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\n"
                             b"content-type: text/plain; charset=utf-8\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
        # Nothing more is read; the idle timeout, no longer reset, aborts a peer that holds on.
        self.dataReceived = lambda data: None
        self.loseConnection()


class _ConsoleSite(server.Site):
    protocol = _ConsoleChannel
    allowed: Callable[[str], bool] | None = None  # the listener's allow_sources
    read_timeout = 30.0  # seconds from a request's first byte to its last (forms are small)

    def buildProtocol(self, addr):
        if self.allowed is not None and not self.allowed(getattr(addr, "host", "")):
            # Closed at once. Not None: a TLS listener wraps whatever this returns, and would
            # wrap None (an unhandled error, and a connection left open).
            return _Refused()
        return super().buildProtocol(addr)

    def log(self, request) -> None:
        pass  # paths carry ids and search terms; the console logs what it does itself


class _Refused(protocol.Protocol):
    """A connection from outside the listener's allow_sources, before any TLS handshake."""

    def connectionMade(self) -> None:
        self.transport.loseConnection()


__all__ = ["Console", "ConsoleContext", "ConsoleRequest", "site"]
