#!/usr/bin/env python3
"""kubefake: a protocol-faithful fake Kubernetes API server backed by the local Docker engine.

Python 3.11 standard library only. See README.md next to this file.

Usage:
  kubefake.py --listen 127.0.0.1:0 [--tls-cert C --tls-key K [--client-ca CA]]
              [--token T] [--token-file F] [--prefix P] [--max-subprotocol v5|v4|v1]
              [--docker-socket /var/run/docker.sock] [--network none]

Prints exactly one line `listening on http(s)://HOST:PORT` on stdout when ready; logs to stderr.
SIGTERM/SIGINT: removes every Docker container and volume labelled kubefake=<prefix>, then exits.
"""

import argparse
import base64
import copy
import hashlib
import hmac
import http.client
import json
import os
import random
import re
import select
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ARGS = None
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_NAME = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
HISTORY = 1000  # watch events kept; older resourceVersions get 410 Expired
STDIN_BUFFER = 1 << 20  # exec/attach stdin bytes held for Docker before the client is paused


def log(msg):
    sys.stderr.write("%s kubefake: %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


def now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def status_obj(code, reason, message, details=None):
    s = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
         "message": message, "reason": reason, "code": code}
    if details is not None:
        s["details"] = details
    return s


# ---------------------------------------------------------------------------
# Docker engine client (raw HTTP over the unix socket)
# ---------------------------------------------------------------------------

class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("docker", timeout=timeout)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


class Docker:
    def __init__(self, path, version="v1.41"):
        self.path = path
        self.version = version

    def call(self, method, path, body=None, timeout=60, query=None):
        url = "/%s%s" % (self.version, path)
        if query:
            url += "?" + urllib.parse.urlencode(query)
        conn = UnixHTTPConnection(self.path, timeout)
        try:
            headers = {"Host": "docker"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, url, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = raw
            return resp.status, parsed
        finally:
            conn.close()

    def hijack(self, path, body=None, timeout=30):
        """POST with Upgrade: tcp; returns (socket, leftover bytes) of the raw stream."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(self.path)
        data = json.dumps(body).encode() if body is not None else b""
        req = ("POST /%s%s HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\n"
               "Connection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: %d\r\n\r\n"
               % (self.version, path, len(data))).encode() + data
        s.sendall(req)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise IOError("docker closed during hijack")
            buf += chunk
        head, rest = buf.split(b"\r\n\r\n", 1)
        line = head.split(b"\r\n", 1)[0].decode(errors="replace")
        code = int(line.split()[1])
        if code not in (101, 200):
            raise IOError("docker hijack %s: %s %s" % (path, line, rest[:300]))
        s.settimeout(None)
        return s, rest

    def image_exists(self, image):
        st, _ = self.call("GET", "/images/%s/json" % urllib.parse.quote(image, safe=""))
        return st == 200

    def remove_prefix(self, prefix):
        flt = json.dumps({"label": ["kubefake=%s" % prefix]})
        st, lst = self.call("GET", "/containers/json", query={"all": "1", "filters": flt})
        if st == 200:
            for c in lst:
                self.call("DELETE", "/containers/%s" % c["Id"], query={"force": "1", "v": "1"})
        st, vols = self.call("GET", "/volumes", query={"filters": flt})
        if st == 200:
            for v in (vols or {}).get("Volumes") or []:
                self.call("DELETE", "/volumes/%s" % v["Name"], query={"force": "1"})


DOCKER = None


def demux(buf):
    """Parses Docker's 8-byte-header multiplexed frames; returns ([(stream, bytes)], rest)."""
    out = []
    while len(buf) >= 8:
        stream = buf[0]
        n = struct.unpack(">I", buf[4:8])[0]
        if len(buf) < 8 + n:
            break
        out.append((stream, buf[8:8 + n]))
        buf = buf[8 + n:]
    return out, buf


# ---------------------------------------------------------------------------
# Pod store with resourceVersions and a watch history
# ---------------------------------------------------------------------------

class PodRec:
    def __init__(self, obj):
        self.obj = obj
        self.containers = {}  # container name -> docker id
        self.volumes = []
        self.deleted = False
        self.removing = False


class Store:
    def __init__(self):
        self.lock = threading.Condition()
        self.rv = 1000
        self.pods = {}  # (ns, name) -> PodRec
        self.history = []  # (rv, type, obj snapshot)

    def _event(self, typ, obj):
        self.history.append((int(obj["metadata"]["resourceVersion"]), typ, copy.deepcopy(obj)))
        if len(self.history) > HISTORY:
            del self.history[: len(self.history) - HISTORY]
        self.lock.notify_all()

    def bump(self, obj):
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)

    def add(self, rec):
        with self.lock:
            self.bump(rec.obj)
            self.pods[(rec.obj["metadata"]["namespace"], rec.obj["metadata"]["name"])] = rec
            self._event("ADDED", rec.obj)
            return copy.deepcopy(rec.obj)

    def update(self, rec, fn):
        """Applies fn(obj) under the lock, emits MODIFIED. No-op when the pod is gone."""
        with self.lock:
            if rec.deleted:
                return None
            fn(rec.obj)
            self.bump(rec.obj)
            self._event("MODIFIED", rec.obj)
            return copy.deepcopy(rec.obj)

    def remove(self, rec):
        with self.lock:
            if rec.deleted:
                return None
            rec.deleted = True
            key = (rec.obj["metadata"]["namespace"], rec.obj["metadata"]["name"])
            if self.pods.get(key) is rec:
                del self.pods[key]
            self.bump(rec.obj)
            self._event("DELETED", rec.obj)
            return copy.deepcopy(rec.obj)

    def get(self, ns, name):
        with self.lock:
            return self.pods.get((ns, name))


STORE = Store()


def parse_selector(s):
    out = []
    if not s:
        return out
    for part in s.split(","):
        part = part.strip()
        if not part:
            continue
        if "!=" in part:
            k, v = part.split("!=", 1)
            out.append((k.strip(), "!=", v.strip()))
        elif "==" in part:
            k, v = part.split("==", 1)
            out.append((k.strip(), "=", v.strip()))
        elif "=" in part:
            k, v = part.split("=", 1)
            out.append((k.strip(), "=", v.strip()))
        elif part.startswith("!"):
            out.append((part[1:].strip(), "absent", None))
        else:
            out.append((part, "exists", None))
    return out


def sel_match(sel, values):
    for k, op, v in sel:
        have = values.get(k)
        if op == "=" and have != v:
            return False
        if op == "!=" and have == v:
            return False
        if op == "exists" and have is None:
            return False
        if op == "absent" and have is not None:
            return False
    return True


def pod_matches(obj, ns, lsel, fsel):
    md = obj["metadata"]
    if ns is not None and md.get("namespace") != ns:
        return False
    if not sel_match(lsel, md.get("labels") or {}):
        return False
    fields = {"metadata.name": md.get("name"), "metadata.namespace": md.get("namespace"),
              "status.phase": (obj.get("status") or {}).get("phase"),
              "spec.nodeName": (obj.get("spec") or {}).get("nodeName")}
    return sel_match(fsel, fields)


# ---------------------------------------------------------------------------
# The "kubelet"
# ---------------------------------------------------------------------------

def docker_name(ns, pod, ctr):
    return re.sub(r"[^a-zA-Z0-9_.-]", "_", "%s-%s-%s-%s" % (ARGS.prefix, ns, pod, ctr))


def waiting_status(c, reason, message):
    return {"name": c["name"], "ready": False, "started": False, "restartCount": 0,
            "image": c.get("image", ""), "imageID": "",
            "state": {"waiting": {"reason": reason, "message": message}}}


def set_conditions(obj, ready, initialized=True):
    t = now_iso()
    obj["status"]["conditions"] = [
        {"type": "PodReadyToStartContainers", "status": "True", "lastProbeTime": None, "lastTransitionTime": t},
        {"type": "Initialized", "status": "True" if initialized else "False", "lastProbeTime": None,
         "lastTransitionTime": t},
        {"type": "Ready", "status": "True" if ready else "False", "lastProbeTime": None, "lastTransitionTime": t},
        {"type": "ContainersReady", "status": "True" if ready else "False", "lastProbeTime": None,
         "lastTransitionTime": t},
        {"type": "PodScheduled", "status": "True", "lastProbeTime": None, "lastTransitionTime": t},
    ]


def create_container(rec, c, first_id, is_init):
    md = rec.obj["metadata"]
    ns, pod = md["namespace"], md["name"]
    labels = {"kubefake": ARGS.prefix, "kubefake.namespace": ns, "kubefake.pod": pod,
              "kubefake.container": c["name"], "kubefake.uid": md["uid"]}
    for k, v in (md.get("labels") or {}).items():
        labels["kubefake.label.%s" % k] = v
    env = []
    for e in c.get("env") or []:
        if "value" in e:
            env.append("%s=%s" % (e["name"], e.get("value", "")))
        elif "valueFrom" not in e:
            env.append("%s=" % e["name"])
    mounts = []
    vols = {v["name"]: v for v in rec.obj["spec"].get("volumes") or []}
    for vm in c.get("volumeMounts") or []:
        v = vols.get(vm["name"])
        if v is not None and "emptyDir" in v:
            mounts.append({"Type": "volume", "Source": volume_name(md, vm["name"]),
                           "Target": vm["mountPath"], "ReadOnly": bool(vm.get("readOnly"))})
    host = {"NetworkMode": "container:%s" % first_id if first_id else ARGS.network, "Mounts": mounts}
    if not first_id and not is_init:
        host["Hostname"] = None
    body = {"Image": c["image"], "Env": env, "Labels": labels, "Tty": bool(c.get("tty")),
            "OpenStdin": bool(c.get("stdin")), "StdinOnce": bool(c.get("stdinOnce")),
            "AttachStdin": False, "AttachStdout": False, "AttachStderr": False,
            "HostConfig": {k: v for k, v in host.items() if v is not None}}
    if not first_id:
        body["Hostname"] = pod[:63]
    if c.get("command") is not None:
        body["Entrypoint"] = c["command"]
        body["Cmd"] = c.get("args") or []
    elif c.get("args") is not None:
        body["Cmd"] = c["args"]
    if c.get("workingDir"):
        body["WorkingDir"] = c["workingDir"]
    name = docker_name(ns, pod, c["name"])
    st, resp = DOCKER.call("POST", "/containers/create", body, query={"name": name})
    if st != 201:
        raise RuntimeError("create %s: %s %s" % (name, st, resp))
    return resp["Id"]


def volume_name(md, vol):
    return re.sub(r"[^a-zA-Z0-9_.-]", "_", "%s-%s-%s-%s" % (ARGS.prefix, md["namespace"], md["name"], vol))


def inspect_state(cid):
    st, info = DOCKER.call("GET", "/containers/%s/json" % cid)
    if st != 200:
        return None
    return info


def terminated_state(info, cid):
    s = info["State"]
    code = s.get("ExitCode", 0)
    reason = "Completed" if code == 0 else ("OOMKilled" if s.get("OOMKilled") else "Error")
    return {"terminated": {"exitCode": code, "reason": reason, "startedAt": s.get("StartedAt", "")[:19] + "Z",
                           "finishedAt": s.get("FinishedAt", "")[:19] + "Z", "containerID": "docker://" + cid}}


def kubelet(rec):
    try:
        run_pod(rec)
    except Exception as e:  # noqa: BLE001
        log("kubelet error for %s: %r" % (rec.obj["metadata"]["name"], e))
        def fail(o):
            o["status"]["phase"] = "Failed"
            o["status"]["message"] = str(e)
            o["status"]["reason"] = "KubeFakeError"
        STORE.update(rec, fail)


def run_pod(rec):
    spec = rec.obj["spec"]
    md = rec.obj["metadata"]
    containers = spec["containers"]
    inits = spec.get("initContainers") or []
    # Image check first: nothing is ever pulled.
    missing = [c for c in inits + containers if not DOCKER.image_exists(c["image"])]
    if missing:
        def pull_err(reason, msg_fmt):
            def fn(o):
                o["status"]["containerStatuses"] = [
                    waiting_status(c, reason, msg_fmt % c["image"]) if c in missing
                    else waiting_status(c, "PodInitializing", "") for c in containers]
                if inits:
                    o["status"]["initContainerStatuses"] = [
                        waiting_status(c, reason, msg_fmt % c["image"]) if c in missing
                        else waiting_status(c, "PodInitializing", "") for c in inits]
            return fn
        STORE.update(rec, pull_err("ErrImagePull", 'failed to pull and unpack image "%s": not available offline'))
        time.sleep(1)
        STORE.update(rec, pull_err("ImagePullBackOff", 'Back-off pulling image "%s"'))
        return
    for v in spec.get("volumes") or []:
        if "emptyDir" in v:
            name = volume_name(md, v["name"])
            DOCKER.call("POST", "/volumes/create", {"Name": name, "Labels": {"kubefake": ARGS.prefix}})
            rec.volumes.append(name)
    # Init containers, in order, to completion.
    for i, c in enumerate(inits):
        if rec.deleted:
            return
        cid = create_container(rec, c, None, True)
        rec.containers["init:" + c["name"]] = cid
        if rec.deleted:
            cleanup_pod(rec)
            return
        DOCKER.call("POST", "/containers/%s/start" % cid)
        st, res = DOCKER.call("POST", "/containers/%s/wait" % cid, timeout=None)
        info = inspect_state(cid) or {"State": {"ExitCode": (res or {}).get("StatusCode", 1)}}
        term = terminated_state(info, cid)

        def init_done(o, i=i, c=c, cid=cid, term=term):
            sts = o["status"].setdefault("initContainerStatuses", [])
            while len(sts) <= i:
                sts.append(None)
            sts[i] = {"name": c["name"], "ready": term["terminated"]["exitCode"] == 0, "started": False,
                      "restartCount": 0, "image": c["image"], "imageID": "", "containerID": "docker://" + cid,
                      "state": term}
            if term["terminated"]["exitCode"] != 0:
                o["status"]["phase"] = "Failed"
        STORE.update(rec, init_done)
        if term["terminated"]["exitCode"] != 0:
            return
    first = None
    ids = []
    for c in containers:
        if rec.deleted:
            return
        cid = create_container(rec, c, first, False)
        rec.containers[c["name"]] = cid
        ids.append(cid)
        if rec.deleted:
            cleanup_pod(rec)
            return
        if first is None:
            first = cid
    if rec.deleted:
        cleanup_pod(rec)
        return
    started = {}
    for c, cid in zip(containers, ids):
        st, resp = DOCKER.call("POST", "/containers/%s/start" % cid)
        if st not in (204, 304):
            raise RuntimeError("start %s: %s %s" % (c["name"], st, resp))
        started[c["name"]] = now_iso()

    def running(o):
        o["status"]["phase"] = "Running"
        o["status"]["hostIP"] = "127.0.0.1"
        o["status"]["podIP"] = "127.0.0.1"
        o["status"]["podIPs"] = [{"ip": "127.0.0.1"}]
        o["status"]["startTime"] = o["status"].get("startTime") or now_iso()
        set_conditions(o, True)
        o["status"]["containerStatuses"] = [
            {"name": c["name"], "ready": True, "started": True, "restartCount": 0, "image": c["image"],
             "imageID": "docker-pullable://" + c["image"], "containerID": "docker://" + cid,
             "state": {"running": {"startedAt": started[c["name"]]}}}
            for c, cid in zip(containers, ids)]
    STORE.update(rec, running)
    for i, cid in enumerate(ids):
        threading.Thread(target=wait_container, args=(rec, i, cid), daemon=True).start()


def wait_container(rec, i, cid):
    try:
        DOCKER.call("POST", "/containers/%s/wait" % cid, timeout=None)
    except Exception as e:  # noqa: BLE001
        log("wait %s: %r" % (cid[:12], e))
    info = inspect_state(cid)
    if info is None:
        return
    term = terminated_state(info, cid)

    def fn(o):
        cs = o["status"]["containerStatuses"][i]
        cs["state"] = term
        cs["ready"] = False
        cs["started"] = False
        sts = o["status"]["containerStatuses"]
        if all("terminated" in s["state"] for s in sts):
            codes = [s["state"]["terminated"]["exitCode"] for s in sts]
            o["status"]["phase"] = "Succeeded" if all(c == 0 for c in codes) else "Failed"
        set_conditions(o, False)
    STORE.update(rec, fn)


def cleanup_pod(rec):
    for cid in list(rec.containers.values()):
        DOCKER.call("DELETE", "/containers/%s" % cid, query={"force": "1", "v": "1"})
    for v in rec.volumes:
        DOCKER.call("DELETE", "/volumes/%s" % v, query={"force": "1"})


def graceful_delete(rec, grace):
    try:
        threads = []
        for cid in list(rec.containers.values()):
            t = threading.Thread(target=DOCKER.call, args=("POST", "/containers/%s/stop" % cid),
                                 kwargs={"query": {"t": str(grace)}, "timeout": grace + 30}, daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join(grace + 35)
        names = [c["name"] for c in rec.obj["spec"]["containers"]]

        def fin(o):
            for i, n in enumerate(names):
                cid = rec.containers.get(n)
                info = inspect_state(cid) if cid else None
                sts = o["status"].get("containerStatuses") or []
                if info is not None and i < len(sts):
                    sts[i]["state"] = terminated_state(info, cid)
                    sts[i]["ready"] = False
                    sts[i]["started"] = False
            if o["status"].get("phase") == "Running":
                sts = o["status"].get("containerStatuses") or []
                codes = [s["state"].get("terminated", {}).get("exitCode", 137) for s in sts]
                o["status"]["phase"] = "Succeeded" if codes and all(c == 0 for c in codes) else "Failed"
            set_conditions(o, False)
        STORE.update(rec, fin)
    finally:
        try:
            cleanup_pod(rec)
        finally:
            STORE.remove(rec)


# ---------------------------------------------------------------------------
# Pod defaults and validation
# ---------------------------------------------------------------------------

def merge_patch(target, patch):
    """RFC 7386: objects merge key by key, null removes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if not isinstance(target, dict):
        target = {}
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        else:
            target[k] = merge_patch(target.get(k), v)
    return target


def validate_pod(pod):
    causes = []
    md = pod.get("metadata") or {}
    name = md.get("name")
    if name and (len(name) > 253 or not DNS_SUBDOMAIN.match(name)):
        causes.append(("metadata.name", "Invalid value: %r: a lowercase RFC 1123 subdomain must consist of "
                       "lower case alphanumeric characters, '-' or '.'" % name))
    for k, v in (md.get("labels") or {}).items():
        if not isinstance(v, str) or len(v) > 63 or not LABEL_VALUE.match(v):
            causes.append(("metadata.labels", "Invalid value: %r: a valid label must be an empty string or "
                           "consist of alphanumeric characters, '-', '_' or '.', at most 63" % v))
        if not LABEL_NAME.match(k) or len(k.split("/")[-1]) > 63:
            causes.append(("metadata.labels", "Invalid value: %r: name part must be valid" % k))
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        causes.append(("spec", "Required value"))
        return causes
    ctrs = spec.get("containers")
    if not isinstance(ctrs, list) or not ctrs:
        causes.append(("spec.containers", "Required value"))
        return causes
    seen = set()
    for i, c in enumerate((spec.get("initContainers") or []) + ctrs):
        n = c.get("name") if isinstance(c, dict) else None
        if not n or not DNS_LABEL.match(n) or len(n) > 63:
            causes.append(("spec.containers[%d].name" % i, "Invalid value: %r" % n))
        elif n in seen:
            causes.append(("spec.containers[%d].name" % i, "Duplicate value: %r" % n))
        seen.add(n)
        if not isinstance(c, dict) or not c.get("image"):
            causes.append(("spec.containers[%d].image" % i, "Required value"))
    if spec.get("restartPolicy", "Always") not in ("Always", "OnFailure", "Never"):
        causes.append(("spec.restartPolicy", "Unsupported value: %r" % spec.get("restartPolicy")))
    return causes


def default_pod(pod, ns):
    md = pod.setdefault("metadata", {})
    md["namespace"] = ns
    md["uid"] = str(uuid.uuid4())
    md["creationTimestamp"] = now_iso()
    md.pop("resourceVersion", None)
    md.pop("deletionTimestamp", None)
    pod["apiVersion"] = "v1"
    pod["kind"] = "Pod"
    spec = pod["spec"]
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("serviceAccountName", "default")
    spec.setdefault("enableServiceLinks", True)
    spec.setdefault("securityContext", {})
    spec["nodeName"] = "kubefake-node"
    for c in (spec.get("initContainers") or []) + spec["containers"]:
        c.setdefault("resources", {})
        c.setdefault("terminationMessagePath", "/dev/termination-log")
        c.setdefault("terminationMessagePolicy", "File")
        c.setdefault("imagePullPolicy", "Always" if c["image"].endswith(":latest") or ":" not in c["image"]
                     else "IfNotPresent")
    pod["status"] = {"phase": "Pending", "qosClass": "BestEffort",
                     "conditions": [{"type": "PodScheduled", "status": "True", "lastProbeTime": None,
                                     "lastTransitionTime": now_iso()}]}


# ---------------------------------------------------------------------------
# Server-side printing (Table)
# ---------------------------------------------------------------------------

def age(ts):
    try:
        t = time.mktime(time.strptime(ts, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
        s = max(0, int(time.time() - t))
    except (ValueError, TypeError):
        return "<unknown>"
    if s < 120:
        return "%ds" % s
    if s < 7200:
        return "%dm" % (s // 60)
    return "%dh" % (s // 3600)


def pod_status_text(o):
    st = o.get("status") or {}
    reason = st.get("reason") or st.get("phase", "Unknown")
    for cs in st.get("initContainerStatuses") or []:
        w = cs["state"].get("waiting")
        if w and w.get("reason") and w["reason"] != "PodInitializing":
            reason = "Init:" + w["reason"]
    for cs in st.get("containerStatuses") or []:
        s = cs["state"]
        if s.get("waiting", {}).get("reason"):
            reason = s["waiting"]["reason"]
        elif s.get("terminated", {}).get("reason"):
            reason = s["terminated"]["reason"]
    if o["metadata"].get("deletionTimestamp"):
        reason = "Terminating"
    return reason


def pod_table(pods, rv):
    cols = [("Name", "string", "name"), ("Ready", "string", ""), ("Status", "string", ""),
            ("Restarts", "string", ""), ("Age", "string", ""), ("IP", "string", ""), ("Node", "string", "")]
    rows = []
    for o in pods:
        sts = (o.get("status") or {}).get("containerStatuses") or []
        ready = sum(1 for s in sts if s.get("ready"))
        rows.append({"cells": [o["metadata"]["name"], "%d/%d" % (ready, len(o["spec"]["containers"])),
                               pod_status_text(o), "0", age(o["metadata"].get("creationTimestamp")),
                               (o.get("status") or {}).get("podIP", "<none>"), o["spec"].get("nodeName", "<none>")],
                     "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                "metadata": o["metadata"]}})
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv},
            "columnDefinitions": [{"name": n, "type": t, "format": f, "description": n, "priority": 0 if i < 5 else 1}
                                  for i, (n, t, f) in enumerate(cols)],
            "rows": rows}


# ---------------------------------------------------------------------------
# WebSocket (RFC 6455 server side) + Kubernetes channel protocol
# ---------------------------------------------------------------------------

class WSClosed(Exception):
    pass


class WS:
    def __init__(self, sock, proto):
        self.sock = sock
        self.proto = proto
        self.b64 = "base64" in proto
        self.buf = b""
        self.frag = None
        self.frag_op = 0
        self.closed_sent = False

    def send_frame(self, opcode, payload):
        n = len(payload)
        if n < 126:
            hdr = struct.pack("!BB", 0x80 | opcode, n)
        elif n < 65536:
            hdr = struct.pack("!BBH", 0x80 | opcode, 126, n)
        else:
            hdr = struct.pack("!BBQ", 0x80 | opcode, 127, n)
        self.sock.sendall(hdr + payload)

    def send_channel(self, ch, data):
        if self.b64:
            self.send_frame(0x1, str(ch).encode() + base64.b64encode(data))
        else:
            self.send_frame(0x2, bytes([ch]) + data)

    def send_close(self, code=1000, reason=b""):
        if not self.closed_sent:
            self.closed_sent = True
            try:
                self.send_frame(0x8, struct.pack("!H", code) + reason)
            except OSError:
                pass

    def feed(self, data):
        """Feeds raw bytes; returns a list of ("msg", channel, payload) / ("close",) events."""
        self.buf += data
        out = []
        while True:
            b = self.buf
            if len(b) < 2:
                break
            fin = b[0] & 0x80
            op = b[0] & 0x0F
            masked = b[1] & 0x80
            n = b[1] & 0x7F
            p = 2
            if n == 126:
                if len(b) < 4:
                    break
                n = struct.unpack("!H", b[2:4])[0]
                p = 4
            elif n == 127:
                if len(b) < 10:
                    break
                n = struct.unpack("!Q", b[2:10])[0]
                p = 10
            mask = b""
            if masked:
                if len(b) < p + 4:
                    break
                mask = b[p:p + 4]
                p += 4
            if len(b) < p + n:
                break
            payload = b[p:p + n]
            self.buf = b[p + n:]
            if masked:
                payload = bytes(x ^ mask[i % 4] for i, x in enumerate(payload)) if n < 4096 else unmask(payload, mask)
            if op == 0x9:
                self.send_frame(0xA, payload)
                continue
            if op == 0xA:
                continue
            if op == 0x8:
                out.append(("close",))
                continue
            if op == 0x0:
                if self.frag is None:
                    continue
                self.frag += payload
                if not fin:
                    continue
                op, payload = self.frag_op, self.frag
                self.frag = None
            elif not fin:
                self.frag, self.frag_op = payload, op
                continue
            if op in (0x1, 0x2) and payload:
                if self.b64 and op == 0x1:
                    try:
                        ch = int(chr(payload[0]))
                        out.append(("msg", ch, base64.b64decode(payload[1:])))
                    except ValueError:
                        pass
                else:
                    out.append(("msg", payload[0], payload[1:]))
        return out


def unmask(payload, mask):
    n = len(payload)
    m = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ m).to_bytes(n, "big")


PROTO_ORDER = ["v5.channel.k8s.io", "v4.channel.k8s.io", "v4.base64.channel.k8s.io",
               "channel.k8s.io", "base64.channel.k8s.io"]


def allowed_protocols():
    m = ARGS.max_subprotocol
    if m == "v4":
        return PROTO_ORDER[1:]
    if m == "v1":
        return PROTO_ORDER[3:]
    return PROTO_ORDER


# ---------------------------------------------------------------------------
# HTTP handler
# ---------------------------------------------------------------------------

def read_token_file():
    try:
        with open(ARGS.token_file, "r") as f:
            return f.read().strip()
    except OSError:
        return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kubefake"

    def setup(self):
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(10)
            try:
                self.request.do_handshake()
            except (ssl.SSLError, OSError) as e:
                log("TLS handshake failed: %r" % e)
                raise
            self.request.settimeout(None)
        self.request.settimeout(600)
        super().setup()

    def log_message(self, fmt, *a):
        log("%s %s" % (self.address_string(), fmt % a))

    # -- helpers -----------------------------------------------------------
    def send_json(self, code, obj, extra_headers=None):
        data = json.dumps(obj, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache, private")
        for k, v in (extra_headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_status(self, code, reason, message, details=None):
        self.send_json(code, status_obj(code, reason, message, details))

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n <= 0:
            return None
        raw = self.rfile.read(n)
        try:
            return json.loads(raw)
        except ValueError:
            return ValueError("invalid JSON")

    def authenticated(self):
        tokens = []
        if ARGS.token:
            tokens.append(ARGS.token)
        if ARGS.token_file:
            t = read_token_file()
            if t:
                tokens.append(t)
        auth = self.headers.get("Authorization") or ""
        if auth.startswith("Bearer "):
            got = auth[7:].strip().encode()
            ok = False
            for t in tokens:
                ok |= hmac.compare_digest(got, t.encode())
            if ok:
                return True
            return False  # a presented but wrong token is a 401 even with a client cert
        if isinstance(self.request, ssl.SSLSocket) and ARGS.client_ca:
            try:
                if self.request.getpeercert():
                    return True
            except (ssl.SSLError, ValueError):
                pass
        if not tokens and not ARGS.client_ca:
            return True  # no authentication configured
        return False

    # -- dispatch ----------------------------------------------------------
    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_PATCH(self):
        self.dispatch("PATCH")

    def dispatch(self, method):
        u = urllib.parse.urlsplit(self.path)
        q = urllib.parse.parse_qs(u.query, keep_blank_values=True)
        path = u.path.rstrip("/") or "/"
        try:
            if path in ("/version", "/healthz", "/livez", "/readyz") and method == "GET":
                if path == "/version":
                    return self.send_json(200, {"major": "1", "minor": "32", "gitVersion": "v1.32.0-kubefake",
                                                "gitCommit": "0" * 40, "gitTreeState": "clean",
                                                "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.23",
                                                "compiler": "gc", "platform": "linux/amd64"})
                data = b"ok"
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(data)
                return
            if not self.authenticated():
                return self.send_status(401, "Unauthorized", "Unauthorized")
            if path == "/api" and method == "GET":
                host = self.server.server_address
                return self.send_json(200, {"kind": "APIVersions", "versions": ["v1"],
                                            "serverAddressByClientCIDRs": [
                                                {"clientCIDR": "0.0.0.0/0",
                                                 "serverAddress": "%s:%d" % (host[0], host[1])}]})
            if path == "/apis" and method == "GET":
                return self.send_json(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
            if path == "/api/v1" and method == "GET":
                return self.send_json(200, api_resources())
            m = re.match(r"^/api/v1/namespaces/([^/]+)/pods(?:/([^/]+)(?:/([^/]+))?)?$", path)
            if m:
                ns, name, sub = m.group(1), m.group(2), m.group(3)
                return self.pods(method, ns, name, sub, q)
            if path == "/api/v1/pods" and method == "GET":
                return self.pods(method, None, None, None, q)
            m = re.match(r"^/api/v1/namespaces(?:/([^/]+))?$", path)
            if m and method == "GET":
                if m.group(1):
                    return self.send_json(200, namespace_obj(m.group(1)))
                return self.send_json(200, {"kind": "NamespaceList", "apiVersion": "v1",
                                            "metadata": {"resourceVersion": str(STORE.rv)},
                                            "items": [namespace_obj("default")]})
            return self.send_status(404, "NotFound", "the server could not find the requested resource",
                                    {})
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001
            log("error handling %s %s: %r" % (method, self.path, e))
            import traceback
            traceback.print_exc()
            try:
                self.send_status(500, "InternalError", "Internal error occurred: %s" % e)
            except OSError:
                pass
            self.close_connection = True

    # -- pods ----------------------------------------------------------------
    def pods(self, method, ns, name, sub, q):
        if sub is not None:
            if sub in ("exec", "attach"):
                return self.stream(method, ns, name, sub, q)
            if sub == "log" and method == "GET":
                return self.logs(ns, name, q)
            if sub != "status" or method != "GET":
                return self.send_status(404, "NotFound", "the server could not find the requested resource", {})
        if name is None:
            if method == "GET":
                if q.get("watch", ["false"])[0] in ("true", "1"):
                    return self.watch(ns, q)
                return self.list(ns, q)
            if method == "POST":
                return self.create(ns, q)
            return self.send_status(405, "MethodNotAllowed", "method %s not supported" % method)
        if method == "GET":
            rec = STORE.get(ns, name)
            if rec is None:
                return self.not_found(name)
            with STORE.lock:
                obj = copy.deepcopy(rec.obj)
            if "as=Table" in (self.headers.get("Accept") or ""):
                return self.send_json(200, pod_table([obj], obj["metadata"]["resourceVersion"]))
            return self.send_json(200, obj)
        if method == "DELETE":
            return self.delete(ns, name, q)
        if method == "PATCH":
            return self.patch(ns, name)
        return self.send_status(405, "MethodNotAllowed", "method %s not supported by kubefake" % method)

    def patch(self, ns, name):
        """JSON merge patch (RFC 7386; `kubectl label`/`annotate` send it) or a strategic merge
        patch, which for the maps a pod lets change is the same. As on a real API server, only
        labels and annotations of a pod may change here; anything else is 422 Invalid."""
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if ctype not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            return self.send_status(415, "UnsupportedMediaType",
                                    "the body of the request was in an unknown format - accepted media types "
                                    "include: application/merge-patch+json, application/strategic-merge-patch+json")
        patch = self.body()
        if not isinstance(patch, dict):
            return self.send_status(400, "BadRequest", "the body of the request was in an unknown format")
        rec = STORE.get(ns, name)
        if rec is None:
            return self.not_found(name)
        with STORE.lock:
            patched = merge_patch(copy.deepcopy(rec.obj), patch)
            before = copy.deepcopy(rec.obj)
        for obj in (before, patched):
            for k in ("labels", "annotations", "resourceVersion"):
                obj.get("metadata", {}).pop(k, None)
        if patched != before:
            why = ("Forbidden: pod updates may not change fields other than metadata labels and "
                   "annotations (kubefake)")
            return self.send_status(422, "Invalid", 'Pod "%s" is invalid: spec: %s' % (name, why),
                                    {"name": name, "kind": "Pod", "causes": [
                                        {"reason": "FieldValueForbidden", "message": why, "field": "spec"}]})
        rv = patch.get("metadata", {}).get("resourceVersion") if isinstance(patch.get("metadata"), dict) else None
        if rv is not None and rv != rec.obj["metadata"]["resourceVersion"]:
            return self.send_status(409, "Conflict", 'Operation cannot be fulfilled on pods "%s": the object has '
                                    "been modified; please apply your changes to the latest version and try "
                                    "again" % name, {"name": name, "kind": "pods"})
        causes = validate_pod(merge_patch(copy.deepcopy(rec.obj), patch))
        if causes:
            return self.send_status(
                422, "Invalid", 'Pod "%s" is invalid: %s' % (name, "; ".join("%s: %s" % c for c in causes)),
                {"name": name, "kind": "Pod",
                 "causes": [{"reason": "FieldValueInvalid", "message": m, "field": f} for f, m in causes]})

        def apply(o):
            md = merge_patch(o, patch)["metadata"]
            o["metadata"]["labels"] = md.get("labels") or {}
            o["metadata"]["annotations"] = md.get("annotations") or {}
            for k in ("labels", "annotations"):
                if not o["metadata"][k]:
                    del o["metadata"][k]
        obj = STORE.update(rec, apply)
        if obj is None:
            return self.not_found(name)
        return self.send_json(200, obj)

    def not_found(self, name):
        return self.send_status(404, "NotFound", 'pods "%s" not found' % name, {"name": name, "kind": "pods"})

    def list(self, ns, q):
        lsel = parse_selector(q.get("labelSelector", [""])[0])
        fsel = parse_selector(q.get("fieldSelector", [""])[0])
        with STORE.lock:
            items = [copy.deepcopy(r.obj) for r in STORE.pods.values() if pod_matches(r.obj, ns, lsel, fsel)]
            rv = str(STORE.rv)
        items.sort(key=lambda o: (o["metadata"]["namespace"], o["metadata"]["name"]))
        if "as=Table" in (self.headers.get("Accept") or ""):
            return self.send_json(200, pod_table(items, rv))
        return self.send_json(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": rv},
                                    "items": items})

    def create(self, ns, q):
        pod = self.body()
        if not isinstance(pod, dict):
            return self.send_status(400, "BadRequest", "the body of the request was in an unknown format")
        if pod.get("kind", "Pod") != "Pod":
            return self.send_status(400, "BadRequest", "kind must be Pod")
        md = pod.setdefault("metadata", {})
        if md.get("namespace") and md["namespace"] != ns:
            return self.send_status(400, "BadRequest", "the namespace of the provided object does not match "
                                    "the namespace sent on the request")
        causes = validate_pod(pod)
        if not md.get("name") and not md.get("generateName"):
            causes.append(("metadata.name", "Required value: name or generateName is required"))
        if causes:
            nm = md.get("name") or md.get("generateName") or ""
            return self.send_status(
                422, "Invalid", 'Pod "%s" is invalid: %s' % (nm, "; ".join("%s: %s" % c for c in causes)),
                {"name": nm, "kind": "Pod",
                 "causes": [{"reason": "FieldValueInvalid", "message": m, "field": f} for f, m in causes]})
        if q.get("dryRun"):
            default_pod(pod, ns)
            return self.send_json(201, pod)
        with STORE.lock:
            if not md.get("name"):
                while True:
                    cand = md["generateName"] + "".join(random.choice(NAME_CHARS) for _ in range(5))
                    if (ns, cand) not in STORE.pods:
                        break
                md["name"] = cand
                if len(cand) > 253 or not DNS_SUBDOMAIN.match(cand):
                    return self.send_status(422, "Invalid", 'Pod "%s" is invalid: metadata.generateName' % cand)
            if (ns, md["name"]) in STORE.pods:
                return self.send_status(409, "AlreadyExists", 'pods "%s" already exists' % md["name"],
                                        {"name": md["name"], "kind": "pods"})
            default_pod(pod, ns)
            rec = PodRec(pod)
            obj = STORE.add(rec)
        threading.Thread(target=kubelet, args=(rec,), daemon=True).start()
        return self.send_json(201, obj)

    def delete(self, ns, name, q):
        opts = self.body() or {}
        if isinstance(opts, Exception):
            opts = {}
        rec = STORE.get(ns, name)
        if rec is None:
            return self.not_found(name)
        pre = (opts.get("preconditions") or {}).get("uid")
        if pre and pre != rec.obj["metadata"]["uid"]:
            return self.send_status(409, "Conflict", "Precondition failed: UID in precondition: %s, UID in "
                                    "object meta: %s" % (pre, rec.obj["metadata"]["uid"]),
                                    {"name": name, "kind": "pods"})
        grace = opts.get("gracePeriodSeconds")
        if grace is None and q.get("gracePeriodSeconds"):
            grace = int(q["gracePeriodSeconds"][0])
        if grace is None:
            grace = rec.obj["spec"].get("terminationGracePeriodSeconds", 30)
        with STORE.lock:
            phase = rec.obj["status"].get("phase")
            already = rec.removing
            rec.removing = True
        if already:
            with STORE.lock:
                return self.send_json(200, copy.deepcopy(rec.obj))
        if grace <= 0 or phase != "Running":
            obj = STORE.remove(rec)
            threading.Thread(target=cleanup_pod, args=(rec,), daemon=True).start()
            return self.send_json(200, obj or rec.obj)

        def mark(o):
            o["metadata"]["deletionTimestamp"] = now_iso()
            o["metadata"]["deletionGracePeriodSeconds"] = grace
        obj = STORE.update(rec, mark)
        threading.Thread(target=graceful_delete, args=(rec, grace), daemon=True).start()
        return self.send_json(200, obj)

    def watch(self, ns, q):
        lsel = parse_selector(q.get("labelSelector", [""])[0])
        fsel = parse_selector(q.get("fieldSelector", [""])[0])
        rv = q.get("resourceVersion", [""])[0]
        bookmarks = q.get("allowWatchBookmarks", ["false"])[0] == "true"
        try:
            timeout = int(q.get("timeoutSeconds", ["1800"])[0])
        except ValueError:
            timeout = 1800
        deadline = time.monotonic() + min(max(timeout, 1), 3600)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()

        def emit(typ, obj):
            line = json.dumps({"type": typ, "object": obj}, separators=(",", ":")).encode() + b"\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()

        pending = []
        with STORE.lock:
            if rv in ("", "0"):
                for r in sorted(STORE.pods.values(), key=lambda r: int(r.obj["metadata"]["resourceVersion"])):
                    if pod_matches(r.obj, ns, lsel, fsel):
                        pending.append(("ADDED", copy.deepcopy(r.obj)))
                last = STORE.rv
            else:
                try:
                    last = int(rv)
                except ValueError:
                    last = -1
                oldest = STORE.history[0][0] if STORE.history else STORE.rv + 1
                if last < 0 or (last < oldest - 1 and last < STORE.rv):
                    pending.append(("ERROR", status_obj(410, "Expired", "too old resource version: %s (%d)"
                                                        % (rv, oldest - 1))))
                    last = None
        try:
            for typ, obj in pending:
                emit(typ, obj)
            last_sent = time.monotonic()
            while last is not None:
                with STORE.lock:
                    evs = [(t, o) for (r, t, o) in STORE.history if r > last and pod_matches(o, ns, lsel, fsel)]
                    if STORE.history and STORE.history[-1][0] > last:
                        newest = STORE.history[-1][0]
                    else:
                        newest = last
                    if not evs and newest == last:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        STORE.lock.wait(min(remaining, 1.0))
                        cur = STORE.rv
                    else:
                        cur = None
                    evs = [(t, copy.deepcopy(o)) for t, o in evs]
                if cur is None:
                    for t, o in evs:
                        emit(t, o)
                    last = newest
                    if evs:
                        last_sent = time.monotonic()
                elif bookmarks and time.monotonic() - last_sent > 10:
                    emit("BOOKMARK", {"kind": "Pod", "apiVersion": "v1",
                                      "metadata": {"resourceVersion": str(cur),
                                                   "annotations": {"k8s.io/initial-events-end": "true"}}})
                    last_sent = time.monotonic()
                if SHUTDOWN.is_set():
                    break
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            self.close_connection = True

    def logs(self, ns, name, q):
        rec = STORE.get(ns, name)
        if rec is None:
            return self.not_found(name)
        ctr = self.pick_container(rec, q, name)
        if ctr is None:
            return
        cid = rec.containers.get(ctr["name"])
        if cid is None:
            return self.send_status(400, "BadRequest", 'container "%s" in pod "%s" is waiting to start: '
                                    'ContainerCreating' % (ctr["name"], name))
        follow = q.get("follow", ["false"])[0] == "true"
        query = {"stdout": "1", "stderr": "1"}
        if q.get("tailLines"):
            query["tail"] = q["tailLines"][0]
        if q.get("timestamps", ["false"])[0] == "true":
            query["timestamps"] = "1"
        tty = bool(ctr.get("tty"))
        if not follow:
            st, raw = DOCKER.call("GET", "/containers/%s/logs" % cid, query=query)
            if isinstance(raw, (dict, list)):
                raw = json.dumps(raw).encode()
            raw = raw or b""
            data = raw if tty else b"".join(p for _, p in demux(raw)[0])
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        query["follow"] = "1"
        conn = UnixHTTPConnection(DOCKER.path, None)
        conn.request("GET", "/%s/containers/%s/logs?%s" % (DOCKER.version, cid, urllib.parse.urlencode(query)),
                     headers={"Host": "docker"})
        resp = conn.getresponse()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        buf = b""
        try:
            while True:
                chunk = resp.read1(65536)
                if not chunk:
                    break
                if tty:
                    out = chunk
                else:
                    frames, buf = demux(buf + chunk)
                    out = b"".join(p for _, p in frames)
                if out:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(out), out))
                    self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True
        finally:
            conn.close()

    def pick_container(self, rec, q, name):
        ctrs = rec.obj["spec"]["containers"]
        want = q.get("container", [""])[0]
        if not want:
            if len(ctrs) > 1:
                self.send_status(400, "BadRequest", "a container name must be specified for pod %s, choose one "
                                 "of: [%s]" % (name, " ".join(c["name"] for c in ctrs)))
                return None
            return ctrs[0]
        for c in ctrs + (rec.obj["spec"].get("initContainers") or []):
            if c["name"] == want:
                return c
        self.send_status(400, "BadRequest", "container %s is not valid for pod %s" % (want, name))
        return None

    # -- exec / attach ---------------------------------------------------------
    def stream(self, method, ns, name, sub, q):
        rec = STORE.get(ns, name)
        if rec is None:
            return self.not_found(name)
        ctr = self.pick_container(rec, q, name)
        if ctr is None:
            return
        flag = lambda k: q.get(k, ["false"])[0] in ("true", "1")  # noqa: E731
        stdin, stdout, stderr, tty = flag("stdin"), flag("stdout"), flag("stderr"), flag("tty")
        if tty:
            stderr = False
        if not (stdin or stdout or stderr):
            return self.send_status(400, "BadRequest", "you must specify at least 1 of stdin, stdout, stderr")
        command = q.get("command", [])
        if sub == "exec" and not command:
            return self.send_status(400, "BadRequest", "you must specify at least one command for the container")
        with STORE.lock:
            phase = rec.obj["status"].get("phase")
            cs = [s for s in rec.obj["status"].get("containerStatuses") or [] if s["name"] == ctr["name"]]
            running = bool(cs and "running" in cs[0]["state"])
        if phase in ("Succeeded", "Failed"):
            return self.send_status(400, "BadRequest", "cannot %s into a container in a completed pod; current "
                                    "phase is %s" % (sub, phase))
        cid = rec.containers.get(ctr["name"])
        if not running or cid is None:
            return self.send_status(400, "BadRequest", 'pod %s does not have a host assigned' % name
                                    if phase == "Pending" else 'container not found ("%s")' % ctr["name"])
        upgrade = (self.headers.get("Upgrade") or "").lower()
        if upgrade != "websocket" or method != "GET":
            return self.send_status(400, "BadRequest", "kubefake supports only WebSocket (GET with Upgrade: "
                                    "websocket) for %s, not %s" % (sub, upgrade or "plain HTTP"))
        offered = []
        for h in self.headers.get_all("Sec-WebSocket-Protocol") or []:
            offered += [p.strip() for p in h.split(",") if p.strip()]
        if not offered:
            proto = "channel.k8s.io" if "channel.k8s.io" in allowed_protocols() else None
        else:
            proto = next((p for p in allowed_protocols() if p in offered), None)
        if proto is None:
            return self.send_status(400, "BadRequest", "unable to upgrade connection: requested protocol(s) "
                                    "%s are not supported (allowed: %s)" % (offered, allowed_protocols()))
        key = self.headers.get("Sec-WebSocket-Key")
        if not key:
            return self.send_status(400, "BadRequest", "missing Sec-WebSocket-Key")
        # Start the Docker side before answering 101.
        try:
            if sub == "exec":
                st, ex = DOCKER.call("POST", "/containers/%s/exec" % cid,
                                     {"AttachStdin": stdin, "AttachStdout": stdout, "AttachStderr": stderr,
                                      "Tty": tty, "Cmd": command})
                if st != 201:
                    return self.send_status(500, "InternalError", "Internal error occurred: docker exec create: "
                                            "%s" % (ex,))
                exec_id = ex["Id"]
                dsock, rest = DOCKER.hijack("/exec/%s/start" % exec_id, {"Detach": False, "Tty": tty})
                resize_path = "/exec/%s/resize" % exec_id
            else:
                exec_id = None
                qs = urllib.parse.urlencode({"stream": "1", "stdin": int(stdin), "stdout": int(stdout),
                                             "stderr": int(stderr)})
                dsock, rest = DOCKER.hijack("/containers/%s/attach?%s" % (cid, qs))
                resize_path = "/containers/%s/resize" % cid
        except Exception as e:  # noqa: BLE001
            return self.send_status(500, "InternalError", "Internal error occurred: %s" % e)
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        resp = ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Accept: %s\r\n" % accept)
        if offered:
            resp += "Sec-WebSocket-Protocol: %s\r\n" % proto
        resp += "\r\n"
        self.wfile.flush()
        sock = self.connection
        sock.settimeout(60)
        sock.sendall(resp.encode())
        self.close_connection = True
        log("%s %s/%s container=%s proto=%s stdin=%s stdout=%s stderr=%s tty=%s cmd=%s"
            % (sub, ns, name, ctr["name"], proto, stdin, stdout, stderr, tty, command))
        ws = WS(sock, proto)
        try:
            self.pump(ws, dsock, rest, sub, exec_id, resize_path, tty, stdout, stderr, command)
        except (OSError, WSClosed) as e:
            log("stream %s/%s ended: %r" % (ns, name, e))
        finally:
            try:
                dsock.close()
            except OSError:
                pass

    def pump(self, ws, dsock, rest, sub, exec_id, resize_path, tty, want_out, want_err, command):
        ws.send_channel(1 if want_out else 2 if want_err else 1, b"")
        v5 = ws.proto.startswith("v5")
        dbuf = b""
        oci_hold = None  # output held back when it looks like an OCI "exec failed" message
        first_out = True

        def out(stream, data):
            nonlocal oci_hold, first_out
            if not data:
                return
            if sub == "exec" and first_out and data.startswith(b"OCI runtime exec failed"):
                oci_hold = (oci_hold or b"") + data
                return
            first_out = False
            if oci_hold is not None:
                ws.send_channel(1, oci_hold)
                oci_hold = None
            if stream == 2 and want_err:
                ws.send_channel(2, data)
            elif stream != 2 and want_out:
                ws.send_channel(1, data)

        def docker_data(data):
            nonlocal dbuf
            if tty:
                out(1, data)
            else:
                frames, dbuf = demux(dbuf + data)
                for s, p in frames:
                    out(s, p)

        if rest:
            docker_data(rest)
        docker_open = True

        def container_gone():
            # Docker's attach to a stopped container waits for it to start again: never end
            # an attach that way. Checked right after the hijack and on every idle second.
            if sub != "attach":
                return False
            info = inspect_state(resize_path.split("/")[2])
            return info is None or not info["State"].get("Running")
        if container_gone():
            docker_open = False
        client_open = True
        stdin_open = True
        # Stdin for Docker is buffered and written when the socket is writable: a blocking
        # write while the program is blocked on its own output (which only this loop reads)
        # would deadlock. Reading from the client pauses while STDIN_BUFFER bytes wait.
        pending = bytearray()
        eof_after_pending = False
        dsock.setblocking(False)
        while docker_open:
            r = [dsock]
            take_client = client_open and len(pending) < STDIN_BUFFER
            if take_client:
                r.append(ws.sock)
            w = [dsock] if pending else []
            ready, writable = [], []
            if take_client and isinstance(ws.sock, ssl.SSLSocket) and ws.sock.pending():
                ready = [ws.sock]
            else:
                ready, writable, _ = select.select(r, w, [], 1.0)
            if SHUTDOWN.is_set():
                break
            if dsock in writable:
                try:
                    n = dsock.send(pending)
                    del pending[:n]
                except BlockingIOError:
                    pass
                except OSError:
                    pending.clear()
                    stdin_open = False
                if not pending and eof_after_pending:
                    eof_after_pending = False
                    try:
                        dsock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
            if not ready and not writable and container_gone():
                # Drain what Docker still has, then end.
                dsock.settimeout(0.5)
                try:
                    while True:
                        data = dsock.recv(65536)
                        if not data:
                            break
                        docker_data(data)
                except OSError:
                    pass
                break
            if dsock in ready:
                try:
                    data = dsock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    docker_open = False
                else:
                    docker_data(data)
            if take_client and ws.sock in ready:
                try:
                    data = ws.sock.recv(65536)
                except ssl.SSLWantReadError:
                    continue
                except (OSError, ssl.SSLError):
                    data = b""
                if not data:
                    client_open = False
                    break
                for ev in ws.feed(data):
                    if ev[0] == "close":
                        ws.send_close(1000)
                        client_open = False
                        break
                    _, ch, payload = ev
                    if ch == 0 and stdin_open:
                        if payload:
                            pending += payload
                    elif ch == 4:
                        self.resize(resize_path, payload)
                    elif ch == 255 and v5 and len(payload) == 1:
                        if payload[0] == 0 and stdin_open:
                            stdin_open = False
                            if pending:
                                eof_after_pending = True
                            else:
                                try:
                                    dsock.shutdown(socket.SHUT_WR)
                                except OSError:
                                    pass
                if not client_open:
                    break
        if not client_open:
            log("client closed the stream first")
            return
        # Output is complete: report the status on channel 3.
        status = {"metadata": {}, "status": "Success"}
        code = 0
        if sub == "exec":
            deadline = time.monotonic() + 10
            info = None
            while time.monotonic() < deadline:
                st, info = DOCKER.call("GET", "/exec/%s/json" % exec_id)
                if st != 200 or not info.get("Running"):
                    break
                time.sleep(0.05)
            code = (info or {}).get("ExitCode") or 0
            if oci_hold is not None and code in (126, 127):
                status = {"metadata": {}, "status": "Failure",
                          "message": "Internal error occurred: error executing command in container: %s"
                          % oci_hold.decode(errors="replace").strip(),
                          "reason": "InternalError",
                          "details": {"causes": [{"message": oci_hold.decode(errors="replace").strip()}]},
                          "code": 500}
                code = -1
            elif oci_hold is not None:
                ws.send_channel(1, oci_hold)
            if code > 0:
                status = {"metadata": {}, "status": "Failure",
                          "message": "command terminated with non-zero exit code: error executing command %s, "
                          "exit code %d" % (json.dumps(command), code),
                          "reason": "NonZeroExitCode",
                          "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}
        if ws.proto in ("channel.k8s.io", "base64.channel.k8s.io"):
            if status["status"] != "Success":
                ws.send_channel(3, status["message"].encode())
        else:
            ws.send_channel(3, json.dumps(status, separators=(",", ":")).encode())
        ws.send_close(1000)
        # Wait (bounded) for the client's Close.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if isinstance(ws.sock, ssl.SSLSocket) and ws.sock.pending():
                rd = [ws.sock]
            else:
                rd, _, _ = select.select([ws.sock], [], [], max(0.0, deadline - time.monotonic()))
            if not rd:
                break
            try:
                data = ws.sock.recv(65536)
            except ssl.SSLWantReadError:
                continue
            except OSError:
                break
            if not data or any(ev[0] == "close" for ev in ws.feed(data)):
                break

    def resize(self, path, payload):
        for line in payload.split(b"\n"):
            line = line.strip()
            if not line:
                continue
            try:
                obj = {k.lower(): v for k, v in json.loads(line).items()}
                w, h = int(obj.get("width", 0)), int(obj.get("height", 0))
            except (ValueError, AttributeError):
                continue
            if w > 0 and h > 0:
                DOCKER.call("POST", path, query={"h": str(h), "w": str(w)}, timeout=10)


def api_resources():
    res = [("pods", "pod", "Pod", ["create", "delete", "deletecollection", "get", "list", "patch", "update",
                                   "watch"], ["po"]),
           ("pods/exec", "", "PodExecOptions", ["create", "get"], None),
           ("pods/attach", "", "PodAttachOptions", ["create", "get"], None),
           ("pods/log", "", "Pod", ["get"], None),
           ("pods/status", "", "Pod", ["get", "patch", "update"], None)]
    out = []
    for name, singular, kind, verbs, short in res:
        r = {"name": name, "singularName": singular, "namespaced": True, "kind": kind, "verbs": verbs}
        if short:
            r["shortNames"] = short
            r["categories"] = ["all"]
        out.append(r)
    out.append({"name": "namespaces", "singularName": "namespace", "namespaced": False, "kind": "Namespace",
                "verbs": ["get", "list"], "shortNames": ["ns"]})
    return {"kind": "APIResourceList", "groupVersion": "v1", "resources": out}


def namespace_obj(name):
    return {"kind": "Namespace", "apiVersion": "v1",
            "metadata": {"name": name, "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, name)), "resourceVersion": "1",
                         "creationTimestamp": "2025-01-01T00:00:00Z"},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}


# ---------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------

SHUTDOWN = threading.Event()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, addr, ctx):
        self.ctx = ctx
        super().__init__(addr, Handler)

    def get_request(self):
        sock, addr = self.socket.accept()
        if self.ctx is not None:
            sock = self.ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request, client_address):
        log("connection error from %s: %r" % (client_address, sys.exc_info()[1]))


def main():
    global ARGS, DOCKER
    p = argparse.ArgumentParser(description="Fake Kubernetes API server backed by Docker")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 = pick a free one)")
    p.add_argument("--tls-cert", help="server certificate (PEM); without it the fake serves plain http")
    p.add_argument("--tls-key", help="server key (PEM)")
    p.add_argument("--client-ca", help="CA (PEM) whose client certificates are accepted")
    p.add_argument("--token", help="accepted bearer token")
    p.add_argument("--token-file", help="file holding an accepted bearer token, re-read on every request")
    p.add_argument("--prefix", default="kubefake-%s" % uuid.uuid4().hex[:8],
                   help="Docker name/label prefix (containers are labelled kubefake=PREFIX)")
    p.add_argument("--max-subprotocol", choices=["v5", "v4", "v1"], default="v5",
                   help="highest streaming subprotocol accepted (v4: refuse v5.channel.k8s.io)")
    p.add_argument("--docker-socket", default="/var/run/docker.sock")
    p.add_argument("--network", default="none", help="Docker NetworkMode of a pod's first container")
    ARGS = p.parse_args()
    DOCKER = Docker(ARGS.docker_socket)
    st, ver = DOCKER.call("GET", "/version", timeout=10)
    if st != 200:
        log("docker not reachable: %s %s" % (st, ver))
        sys.exit(2)
    DOCKER.remove_prefix(ARGS.prefix)  # leftovers of a crashed run with the same prefix
    host, _, port = ARGS.listen.rpartition(":")
    ctx = None
    if ARGS.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(ARGS.tls_cert, ARGS.tls_key)
        if ARGS.client_ca:
            ctx.load_verify_locations(ARGS.client_ca)
            ctx.verify_mode = ssl.CERT_OPTIONAL
    srv = Server((host.strip("[]") or "127.0.0.1", int(port)), ctx)

    def on_signal(signum, frame):
        if not SHUTDOWN.is_set():
            SHUTDOWN.set()
            threading.Thread(target=srv.shutdown, daemon=True).start()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    addr = srv.server_address
    log("prefix=%s docker=%s api=%s" % (ARGS.prefix, ver.get("Version"), ver.get("ApiVersion")))
    sys.stdout.write("listening on %s://%s:%d\n" % ("https" if ctx else "http", addr[0], addr[1]))
    sys.stdout.flush()
    try:
        srv.serve_forever(poll_interval=0.2)
    finally:
        log("shutting down: removing containers and volumes labelled kubefake=%s" % ARGS.prefix)
        try:
            DOCKER.remove_prefix(ARGS.prefix)
        except Exception as e:  # noqa: BLE001
            log("cleanup error: %r" % e)
        srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
