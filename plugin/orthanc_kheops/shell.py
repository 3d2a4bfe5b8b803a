"""The only module that touches the Orthanc SDK.

It reads the configuration, wires the pure core together, and bridges
Orthanc's callbacks to it: the store callback only writes to the outbox,
the workers start once Orthanc has started, and REST calls go to the router.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import orthanc
import psycopg

from . import thread_state
from .config import SECTION, ConfigError, KheopsConfig, check_environment, load_config
from .forwarding.forwarder import Forwarder
from .forwarding.intake import Intake
from .kheops.client import KheopsClient, make_session
from .observability.audit import audit_line
from .observability.masking import Redactor, Secret
from .observability.metrics import MetricsCollector, MetricsPublisher, rule_figures
from .orthanc_rest import OrthancError, OrthancNotFound, OrthancRest, OrthancUnavailable
from .sdk import Platform, Sdk, UnsupportedPlatform, check_platform
from .state.backend import open_state
from .state.clock import SteadyClock
from .state.errors import StoreUnavailable
from .state.node_lock import StateDirectoryInUse
from .state.postgres.database import StateDatabaseError
from .state.store_health import StoreHealth
from .storage_folder import CHEAP_SDK_READS_BELOW, Attachment, StorageFolder, stored_uuid
from .switching.rules import Rule, config_rules
from .switching.sharing import Sharer
from .web.app_files import ENTRY_PAGE, app_file
from .web.forwarding_api import ForwardingApi
from .web.labels import LabelKeeper, LabelThread, OrthancLabels
from .web.oe2_api import Oe2Api
from .web.resources_api import ResourcesApi
from .web.routing import HttpError, Request, Response, Router
from .web.rules_api import RulesApi

log = logging.getLogger("orthanc_kheops")

_EXPLORER_JS = Path(__file__).parent / "web" / "explorer.js"
_LABEL_SECONDS = 5

# A URI that is not UTF-8 (a lone surrogate, a stray byte) gets a 500 from the Python plugin
# itself, before any plugin code runs: the route matches well-formed UTF-8 only (in boost's
# byte escapes), and Orthanc answers 404 to the rest.
_UTF8 = (
    r"(?:[\x01-\x7f]|[\xc2-\xdf][\x80-\xbf]|\xe0[\xa0-\xbf][\x80-\xbf]"
    r"|[\xe1-\xec\xee\xef][\x80-\xbf]{2}|\xed[\x80-\x9f][\x80-\xbf]"
    r"|\xf0[\x90-\xbf][\x80-\xbf]{2}|[\xf1-\xf3][\x80-\xbf]{3}|\xf4[\x80-\x8f][\x80-\xbf]{2})"
)
_ROOT_URI = "/kheops/app/index.html"  # OE2's and Explorer's plugin lists link to the app

# Every callback handed to Orthanc, referenced for the plugin's lifetime: python plugin 5 and
# later release theirs after Python has finalized, which crashes Orthanc at shutdown (SIGSEGV)
# if that was the last reference, as it is for a bound method.
_CALLBACKS: list[Callable[..., None]] = []

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _OrthancLogHandler(logging.Handler):
    """Sends the core's log records to Orthanc's log, with every token masked."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self._redactor = redactor

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self._redactor.redact(f"KHEOPS: {self.format(record)}")
        except Exception:  # noqa: BLE001 -- logging must never raise into the caller
            self.handleError(record)
            return
        if record.levelno >= logging.ERROR:
            orthanc.LogError(text)
        elif record.levelno >= logging.WARNING:
            orthanc.LogWarning(text)
        else:
            orthanc.LogInfo(text)


class _Plugin:
    def __init__(
        self,
        config: KheopsConfig,
        redactor: Redactor,
        rules: Sequence[Rule],
        *,
        sdk: Sdk,
        running: Platform,
        allow_threads: bool,
        overwrite_instances: bool,
    ) -> None:
        self.config = config
        self.redactor = redactor
        self.clock = SteadyClock()
        self.store_health = StoreHealth()
        self.sdk = sdk
        self._running = running
        self._allow_threads = allow_threads
        # Orthanc logs no change for a file stored over an instance it has: then the store
        # callback queues instances, else the change events (forwarding/intake.py says why).
        self.store_callback = overwrite_instances
        self.intake = Intake(self._queue_stored)
        self.state = open_state(config, clock=self.clock)
        self.outbox = self.state.outbox
        cluster = self.state.cluster
        session = make_session(
            url=config.url, pool_size=config.workers + 4, verify=config.verify_tls
        )
        self.kheops = KheopsClient(
            config.url,
            session=session,
            connect_timeout=config.connect_timeout,
            read_timeout=config.request_timeout,
        )
        self.orthanc = OrthancRest(
            config.orthanc_url,
            authorization=Secret(orthanc.GenerateRestApiAuthorizationToken()),
            pool_size=config.workers + 4,
            reader=_read_dicom,
            folder=StorageFolder(
                config.storage_folder,
                lookup=_attachment,
                known_min_bytes=0 if sdk.costly_reads else CHEAP_SDK_READS_BELOW,
            )
            if config.storage_folder is not None
            else None,
            # Without a store callback no store waits for the GIL a read holds.
            reader_max_bytes=_GIL_READ_MAX_BYTES
            if self.store_callback and not allow_threads
            else None,
        )
        self.sharer = Sharer(
            config,
            store=self.state.store,
            kheops=self.kheops,
            orthanc=self.orthanc,
            remember_secret=redactor.add,
        )
        if cluster is not None:
            cluster.install_config_rules({rule.name: rule.document() for rule in rules})
        self.sharer.install_config_rules(rules)
        self.forwarder = Forwarder(
            config,
            outbox=self.outbox,
            orthanc=self.orthanc,
            kheops=self.kheops,
            after_store=self.sharer.after_store,
            exclusive=cluster.exclusive if cluster is not None else None,
            clock=self.clock,
            store_health=self.store_health,
            header_needed=lambda: any(rule.enabled for rule in list(self.sharer.rules.values())),
        )
        self.router = Router(redact=redactor.redact)
        rules_api = RulesApi(
            config,
            sharer=self.sharer,
            kheops=self.kheops,
            orthanc=self.orthanc,
            outbox=self.outbox,
            remember_secret=redactor.add,
            known_secret=redactor.knows,
        )
        rules_api.register(self.router)
        forwarding_api = ForwardingApi(
            config,
            outbox=self.outbox,
            forwarder=self.forwarder,
            orthanc=self.orthanc,
            rules_summary=rules_api.summary,
            nodes=cluster.nodes if cluster is not None else None,
            clock=self.clock,
        )
        forwarding_api.register(self.router)
        Oe2Api(forwarding_api).register(self.router)
        ResourcesApi(outbox=self.outbox, orthanc=self.orthanc).register(self.router)
        collector = MetricsCollector(
            outbox=self.outbox,
            stats=self.forwarder.stats,
            health=self.forwarder.health,
            rules=lambda: rule_figures(self.sharer.store, self.sharer.failing()),
            clock=self.clock,  # the forwarder's: the age of the last send is a difference
            store_health=self.store_health,
        )
        self.metrics = MetricsPublisher(collector.values, sdk.set_metric)
        labels = OrthancLabels(self.orthanc)
        keeper = LabelKeeper(outbox=self.outbox, orthanc=labels, sent_label=config.sent_label)
        self.labels = LabelThread(keeper, labels, interval=_LABEL_SECONDS)

    def on_stored_instance(self, dicom: Any, instance_id: str) -> None:
        """Runs under Orthanc's lock: record the instance and return."""
        self._enqueue([(instance_id, dicom.GetInstanceSize())])

    def _queue_stored(self, orthanc_ids: Sequence[str]) -> None:
        """New instances from the change events, with their size and where their file is
        (the intake's thread): one lookup gives both."""
        # Rows already there stay as they are: the reconciler may have queued (or a worker
        # already sent) an instance before its event came; a deletion forgets sent rows, so
        # an instance stored again after one is new again.
        attachments = {orthanc_id: _attachment(orthanc_id) for orthanc_id in orthanc_ids}
        files = {
            orthanc_id: uuid
            for orthanc_id, attachment in attachments.items()
            if (uuid := stored_uuid(attachment)) is not None
        }
        self._enqueue(
            [(i, a.size if a is not None else 0) for i, a in attachments.items()],
            requeue=False,
            files=files,
        )

    def _enqueue(
        self,
        items: Sequence[tuple[str, int]],
        *,
        requeue: bool = True,
        files: Mapping[str, str] | None = None,
    ) -> None:
        try:
            self.outbox.enqueue(items, now=self.clock(), requeue=requeue, files=files)
        except StoreUnavailable as exc:
            # The change log still has them: the reconciler queues them once writing works.
            if self.store_health.failed(
                f"cannot queue instance {items[0][0]}: {exc}", self.clock()
            ):
                log.error(
                    "cannot queue instances now (%s); they are queued from Orthanc's change log"
                    " once the state directory can be written again",
                    exc,
                )
            return
        except Exception:
            # The change log still has them: the reconciler will queue them.
            log.exception("could not queue %d instances now; they will be found later", len(items))
            return
        self.forwarder.instances_stored(len(items))

    def on_change(self, change_type: int, level: int, resource_id: str) -> None:
        thread_state.keep()
        try:
            self._on_change(change_type, level, resource_id)
        finally:
            self.intake.pace()

    def _on_change(self, change_type: int, level: int, resource_id: str) -> None:
        if change_type == orthanc.ChangeType.NEW_INSTANCE:
            if not self.store_callback:
                self.intake.add(resource_id)
        elif change_type == orthanc.ChangeType.DELETED and level == orthanc.ResourceType.INSTANCE:
            self.intake.flush()  # a deletion never comes before the instance's own queuing
            try:
                self.forwarder.instances_deleted([resource_id])
            except StoreUnavailable as exc:
                # Its row stays; the worker that reads it finds the 404 and forgets it then.
                self.store_health.failed(f"cannot note a deleted instance: {exc}", self.clock())
            except Exception:
                log.exception("could not take deleted instance %s off the queue", resource_id)
        elif change_type == orthanc.ChangeType.ORTHANC_STARTED:
            threading.Thread(target=self._log_versions, name="kheops-versions", daemon=True).start()
            self.metrics.start()  # Orthanc takes metrics only once it has started
            if self.state.cluster is not None:
                self.state.cluster.start(
                    on_rules_changed=self.sharer.reload,
                    last_sent=lambda: self.forwarder.stats.snapshot().last_sent_at,
                    on_sent_elsewhere=self.forwarder.sent_elsewhere,
                )
            self.labels.start()
            self.intake.start()
            if self.config.enabled:
                self.sharer.start()
                self.forwarder.start()
                log.warning(
                    "forwarding to %s started with %d workers", self.config.url, self.config.workers
                )
            else:
                log.warning(
                    "forwarding is disabled (Kheops.Enabled is false); instances are queued"
                )
        elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
            self.intake.stop(timeout=10)
            thread_state.release()
            self.forwarder.stop(timeout=10)
            self.sharer.stop(timeout=10)
            self.labels.stop(timeout=10)
            self.metrics.stop()
            if self.state.cluster is not None:
                self.state.cluster.stop()
                self.state.cluster.close()  # the pool's connections end cleanly
            if self.state.lock is not None:
                self.state.lock.release()
            log.warning("forwarding stopped; unsent instances stay queued")

    def on_rest(self, output: Any, uri: str, **request: Any) -> None:
        call = Request(
            method=request["method"],
            path=request["groups"][0],
            query=dict(request.get("get") or {}),
            body=request.get("body") or b"",
        )
        response = self.router.reply(call)  # never raises: every error is an answer
        _answer(self.sdk, output, response)
        if call.method != "GET":
            self.metrics.wake()
            line = audit_line(call, response)
            if line is not None:
                log.log(*line)

    def on_app(self, output: Any, uri: str, **request: Any) -> None:
        """GET /kheops/app/{file}: the web app's files, straight from the package."""
        if request["method"] != "GET":
            output.SendMethodNotAllowed("GET")
            return
        found = app_file(request["groups"][0])
        if found is None:
            missing = HttpError(404, "the app has no such file", field="file").response()
            _answer(self.sdk, output, missing)
            return
        output.SetHttpHeader("Cache-Control", "no-cache")  # a new plugin version shows at once
        output.AnswerBuffer(found.body, found.content_type)

    def _log_versions(self) -> None:
        """The python plugin tells its version only through REST, which works once started."""
        try:
            document = self.orthanc.get_json("/plugins/python")
            version = document.get("Version") if isinstance(document, dict) else None
        except OrthancError as exc:
            version = f"unknown ({exc})"
        log.warning(
            "running on Orthanc %s, python plugin %s, Python %s; Python.AllowThreads is %s",
            self._running.orthanc,
            version,
            self._running.python,
            "on" if self._allow_threads else "off",
        )


def _to_app(output: Any, uri: str, **request: Any) -> None:
    """/kheops/app and /kheops/app/ (Orthanc sees them as one URI): a page that opens the app."""
    output.AnswerBuffer(ENTRY_PAGE, "text/html; charset=utf-8")


# Without Python.AllowThreads the GIL is held while Orthanc reads a file for GetDicomForInstance,
# and store callbacks (with OverwriteInstances) wait for it as long as the read takes: larger
# files then go over loopback.
_GIL_READ_MAX_BYTES = 1 << 20
_UNKNOWN_RESOURCE = 17  # OrthancPluginErrorCode_UnknownResource


def _attachment(orthanc_id: str) -> Attachment | None:
    """An instance's file: its size and where it is, in-process (a read: safe from a Python
    thread); None when Orthanc cannot say (such an instance travels alone, read over loopback)."""
    try:
        info = json.loads(orthanc.RestApiGet(f"/instances/{orthanc_id}/attachments/dicom/info"))
        return Attachment(
            uuid=str(info["Uuid"]),
            size=int(info["UncompressedSize"]),
            stored_size=int(info["CompressedSize"]),
        )
    except (orthanc.OrthancException, ValueError, KeyError, TypeError):
        return None


def _read_dicom(orthanc_id: str) -> bytes:
    """An instance's file, in-process: safe from worker threads, as it writes nothing."""
    try:
        return orthanc.GetDicomForInstance(orthanc_id)
    except orthanc.OrthancException as exc:
        code = exc.args[0] if exc.args else None
        if code == _UNKNOWN_RESOURCE:
            raise OrthancNotFound(f"Orthanc has no instance {orthanc_id}") from exc
        raise OrthancUnavailable(f"Orthanc could not read instance {orthanc_id}: {exc}") from exc


def _answer(sdk: Sdk, output: Any, response: Response) -> None:
    if response.status == 405:
        output.SendMethodNotAllowed(",".join(response.allowed))
        return
    sdk.answer(output, response.status, response.encoded(), "application/json")


def _register(register: Callable[..., None], *arguments: Any) -> None:
    """`register(*arguments)`, keeping the callback (the last argument) referenced."""
    _CALLBACKS.append(arguments[-1])
    register(*arguments)


def install() -> None:
    """Called by the entry script when Orthanc loads it."""
    try:
        running = check_platform(orthanc)
    except UnsupportedPlatform as exc:
        orthanc.LogError(f"KHEOPS: cannot load: {exc}")
        raise
    configuration = json.loads(orthanc.GetConfiguration())
    if SECTION not in configuration:
        orthanc.LogWarning(f'KHEOPS: no "{SECTION}" section in the configuration; plugin inactive')
        return
    try:
        config = load_config(configuration, config_directory=_config_directory())
        check_environment(config, configuration)
        rules = config_rules(config)
    except ConfigError as exc:
        _refuse_to_start(str(exc))
    redactor = Redactor([config.token])
    if config.postgres is not None and config.postgres.password is not None:
        redactor.add(config.postgres.password)
    handler = _OrthancLogHandler(redactor)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(_LEVELS[config.log_level])
    log.propagate = False
    sdk = Sdk(orthanc)
    python_section = configuration.get("Python")
    allow_threads = isinstance(python_section, dict) and python_section.get("AllowThreads") is True
    try:
        plugin = _Plugin(
            config,
            redactor,
            rules,
            sdk=sdk,
            running=running,
            allow_threads=allow_threads,
            overwrite_instances=configuration.get("OverwriteInstances") is True,
        )
    except StateDirectoryInUse as exc:
        _refuse_to_start(f"{SECTION}.StateDirectory: {exc}")
    except (StateDatabaseError, psycopg.Error) as exc:
        _refuse_to_start(
            redactor.redact(f"{SECTION}.PostgreSQL: cannot use the state database: {exc}")
        )
    except StoreUnavailable as exc:
        if config.state_database == "postgresql":
            _refuse_to_start(
                redactor.redact(f"{SECTION}.PostgreSQL: cannot use the state database: {exc}")
            )
        _refuse_to_start(
            f"{SECTION}.StateDirectory: cannot open the state in {config.state_directory}: {exc}"
        )
    except (OSError, sqlite3.Error) as exc:  # a state file that cannot be opened
        _refuse_to_start(
            f"{SECTION}.StateDirectory: cannot open the state in {config.state_directory}: {exc}"
        )
    if plugin.store_callback:
        _register(orthanc.RegisterOnStoredInstanceCallback, plugin.on_stored_instance)
    _register(orthanc.RegisterOnChangeCallback, plugin.on_change)
    # Orthanc gives a URI to the first pattern that matches it: the app's come first.
    _register(orthanc.RegisterRestCallback, "/kheops/app", _to_app)
    _register(orthanc.RegisterRestCallback, f"/kheops/app/({_UTF8}*)", plugin.on_app)
    _register(orthanc.RegisterRestCallback, f"/kheops/({_UTF8}*)", plugin.on_rest)
    orthanc.ExtendOrthancExplorer(_EXPLORER_JS.read_text(encoding="utf-8"))
    sdk.set_root_uri(_ROOT_URI)
    log.warning("plugin loaded; state in %s", config.state_directory)


def _refuse_to_start(problem: str) -> NoReturn:
    """Orthanc must refuse to start, with one line that names the field and no traceback."""
    orthanc.LogError(f"KHEOPS: invalid configuration: {problem}")
    sys.tracebacklimit = 0
    raise ConfigError("the Kheops section is invalid (see the line above)") from None


def _config_directory() -> Path:
    """Orthanc resolves relative paths in its configuration against the configuration's folder."""
    path = Path(orthanc.GetConfigurationPath())
    return path if path.is_dir() else path.parent
