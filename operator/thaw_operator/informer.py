"""Watch caches of the stage Jobs and their pods: client-go's reflector and indexer, in small.

A reconcile used to list a FineTuneJob's Jobs and pods from the API server every time, and
the periodic resync reconciles every unfinished job: at 1,000 jobs that was two label-selected
LISTs per job per minute, each scanning every pod of the namespace on the API server (measured
in docs/benchmarks.md). Here one label-selected watch per kind keeps slim copies
(thaw_operator.observe) indexed by the FineTuneJob label, and a reconcile reads them.

Staleness, and why it is safe:
- The operator's own writes go into the cache from the API server's reply (read your writes),
  so a Job it just created is never taken for one that was deleted. A watch event older than
  what is cached (by resourceVersion) does not replace it.
- Until the first list completes, and while the watch fails, `synced` is clear and callers
  list live.
- A relist (the watch fell too far behind: 410 Gone) replaces the contents, keeping entries
  newer than the list itself.
- Pods may lag their Job; controller.py lists them live when a Job's outcome depends on them
  (observe.needs_fresh_pods).
The watches use plain JSON (no client models): cheaper to parse, and a slim copy is a few
hundred bytes.

Only a change wakes the operator (controller-runtime's event predicates): on_change runs when a
slim copy differs apart from its resourceVersion. A stage Job sends about five events per
attempt (created, started, pods ready, pod tracking, complete), and the echo of the operator's
own write; the slim copy changes on two or three of them, the ones the planner reads.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import defaultdict
from collections.abc import Callable

from kubernetes.watch.watch import iter_resp_lines

log = logging.getLogger("thaw.operator")


def _same(a: dict, b: dict) -> bool:
    """Equal slim copies apart from resourceVersion (which moves on every write)."""
    strip = lambda o: o | {"metadata": {k: v for k, v in o["metadata"].items() if k != "resourceVersion"}}
    return strip(a) == strip(b)


def _version(obj: dict) -> int:
    """resourceVersion as a number: opaque by contract, an etcd revision in practice; where it is
    not a number, every event is taken as newer."""
    try:
        return int(obj["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return -1


class Informer:
    """A label-selected list+watch of one kind, as slim JSON, by (namespace, label value).

    list_fn: the client's list call (e.g. BatchV1Api.list_namespaced_job), args its namespace
    (or none for the *_for_all_namespaces variant); on_change(obj) is called for every watched
    change after the cache has it (not for events that change nothing it keeps)."""

    def __init__(
        self,
        kind: str,
        list_fn: Callable,
        args: tuple,
        slim: Callable[[dict], dict],
        label: str,
        on_change: Callable[[dict], None] | None = None,
    ) -> None:
        self.kind, self.list_fn, self.args, self.slim, self.label = kind, list_fn, args, slim, label
        self.on_change = on_change
        self.synced = threading.Event()
        self._listed = False
        self._lock = threading.Lock()
        self._objects: dict[tuple[str, str], dict] = {}  # (namespace, name) -> slim object
        self._index: dict[tuple[str, str], set[str]] = defaultdict(set)  # (namespace, label value) -> names

    # --- reads and the operator's own writes -------------------------------------------------

    def by_label(self, namespace: str, value: str) -> list[dict]:
        with self._lock:
            return [self._objects[(namespace, n)] for n in sorted(self._index.get((namespace, value), ()))]

    def __len__(self) -> int:
        return len(self._objects)

    def upsert(self, obj: dict) -> bool:
        """An object as the API server returned it (watched, or the reply to our own write).
        True when the cache changed apart from resourceVersion."""
        slim = self.slim(obj)
        key = (slim["metadata"].get("namespace", ""), slim["metadata"]["name"])
        with self._lock:
            have = self._objects.get(key)
            if have is not None and _version(have) > _version(slim) >= 0:
                return False  # an older event than what we hold (our own write got here first)
            self._put(key, slim)
            return have is None or not _same(have, slim)

    def _put(self, key: tuple[str, str], slim: dict) -> None:
        have = self._objects.get(key)
        if have is not None:
            self._unindex(key, have)
        self._objects[key] = slim
        value = (slim["metadata"].get("labels") or {}).get(self.label)
        if value is not None:
            self._index[(key[0], value)].add(key[1])

    def remove(self, namespace: str, name: str) -> bool:
        with self._lock:
            have = self._objects.pop((namespace, name), None)
            if have is not None:
                self._unindex((namespace, name), have)
            return have is not None

    def _unindex(self, key: tuple[str, str], obj: dict) -> None:
        value = (obj["metadata"].get("labels") or {}).get(self.label)
        names = self._index.get((key[0], value))
        if names is not None:
            names.discard(key[1])
            if not names:
                del self._index[(key[0], value)]

    def _replace(self, items: list[dict], version: int) -> list[dict]:
        """The contents from a list; returns what changed (new, changed or gone), as events the
        watch would have sent had it not fallen behind."""
        fresh = {}
        for obj in items:
            slim = self.slim(obj)
            fresh[(slim["metadata"].get("namespace", ""), slim["metadata"]["name"])] = slim
        with self._lock:
            old = self._objects
            for key, have in old.items():  # written by us after the list was taken: keep
                if _version(have) > max(version, _version(fresh[key]) if key in fresh else -1):
                    fresh[key] = have
            self._objects, self._index = {}, defaultdict(set)
            for key, slim in fresh.items():
                self._put(key, slim)
        changed = [slim for key, slim in fresh.items() if key not in old or not _same(old[key], slim)]
        return changed + [have for key, have in old.items() if key not in fresh]

    # --- the list+watch loop ----------------------------------------------------------------

    def _call(self, **kwargs):
        return self.list_fn(*self.args, label_selector=self.label, _preload_content=False, **kwargs)

    def run(self, stop: threading.Event) -> None:
        """The thread's body: list, then watch from the list's version; list again on 410."""
        version = None
        while not stop.is_set():
            try:
                if version is None:
                    listed = json.loads(self._call().data)
                    version = listed["metadata"]["resourceVersion"]
                    changed = self._replace(listed.get("items") or [], int(version) if version.isdigit() else -1)
                    self.synced.set()
                    # A relist tells what the lost watch would have; the first list does not (the
                    # operator reconciles every job when it takes leadership).
                    for obj in changed if self._listed and self.on_change is not None else ():
                        self.on_change(obj)
                    self._listed = True
                version = self._watch(stop, version)
            except Exception as err:  # noqa: BLE001 - a dropped connection or a restarting API server
                # Not current until a watch runs again (a watch that keeps failing, e.g. RBAC
                # without `watch`, must not leave a cache that looks current: callers list live).
                self.synced.clear()
                log.warning("%s watch: %s", self.kind, str(err).splitlines()[0][:300] if str(err) else repr(err))
                stop.wait(2)

    def _watch(self, stop: threading.Event, version: str) -> str | None:
        """Stream events from `version`; the version to go on from, or None to list again."""
        # The server ends the watch after 60 s; the client gives up at 90 s on a connection that
        # went silent (a half-open socket would otherwise hold a stale cache for good).
        resp = self._call(
            watch=True, resource_version=version, timeout_seconds=60, allow_watch_bookmarks=True, _request_timeout=90
        )
        self.synced.set()  # the stream resumes from `version`: nothing since is missed
        try:
            for line in iter_resp_lines(resp):
                if stop.is_set():
                    break
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:  # our version is too old: list again
                        return None
                    raise RuntimeError(f"{obj.get('reason')}: {obj.get('message')}")
                version = (obj.get("metadata") or {}).get("resourceVersion", version)
                if kind == "BOOKMARK":
                    continue
                if kind == "DELETED":
                    changed = self.remove(obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
                else:
                    changed = self.upsert(obj)
                if changed and self.on_change is not None:
                    self.on_change(obj)
        finally:
            resp.close()
            resp.release_conn()
        return version
