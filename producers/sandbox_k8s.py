"""`--sandbox k8s`: one Pod per rollout, tool calls through the Kubernetes exec API.

    print(yaml.safe_dump_all(render_manifests("r-1", SandboxLimits(), image="python:3.11")))   # --dry-run
    sb = K8sSandbox("r-1", SandboxLimits()); sb.setup({"paper.md": paper}); sb.run("ls", timeout_s=30)

The same rules as the local sandbox, as Pod settings: no service account token, no service links,
a read-only root filesystem, a non-root uid with every capability dropped and no privilege
escalation, the RuntimeDefault seccomp profile, the paper from a ConfigMap mounted read-only,
`submission/` and `/tmp` as size-limited emptyDirs (the disk quota), memory limits, and a
NetworkPolicy that denies all ingress and egress of the sandbox Pod (enforced where the cluster's
network plugin enforces NetworkPolicy). It is NOT exercised against a cluster here (none is
reachable in this environment); only the manifests are tested. Papers over ~1 MiB do not fit a ConfigMap.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Optional

from producers.sandbox import ExecResult, SandboxLimits
from schemas.errors import ConfigError, TransientError
from schemas.events import path_safe_id


PREFIX = "klong-sandbox-"


def _label(rollout_id: str) -> str:
    """The rollout's label value (a DNS-1123 label, <= 63 chars): the id made lowercase alphanumerics and
    '-', cut to 40, plus 8 hex digits of its hash, so ids that read alike ('A_b', 'a-b') stay apart."""
    import hashlib

    slug = "".join(c if c.isascii() and c.isalnum() else "-" for c in rollout_id.lower())[:40].strip("-")
    digest = hashlib.sha256(rollout_id.encode()).hexdigest()[:8]
    return f"{slug}-{digest}" if slug else digest


def _name(rollout_id: str) -> str:
    """Pod, ConfigMap and NetworkPolicy name: PREFIX + the label (<= 63 chars)."""
    return PREFIX + _label(rollout_id)


def render_pod_manifest(rollout_id: str, limits: SandboxLimits, *, image: str = "python:3.11-slim",
                        namespace: str = "default", service_account: Optional[str] = None) -> dict:
    """The Pod that holds one rollout's sandbox: idle (`sleep infinity`), commands arrive by exec.
    CPU time and process limits have no pod-level equivalent; memory and ephemeral storage do."""
    path_safe_id(rollout_id, "rollout id")
    name = _name(rollout_id)
    container = {
        "name": "sandbox", "image": image, "command": ["sleep", "infinity"], "workingDir": "/home/submission",
        "env": [{"name": "PAPER_DIR", "value": "/home/paper"}, {"name": "SUBMISSION_DIR", "value": "/home/submission"},
                {"name": "HOME", "value": "/tmp"}, {"name": "TMPDIR", "value": "/tmp"}],
        "resources": {"limits": {"memory": f"{limits.memory_mb}Mi",
                                 "ephemeral-storage": f"{limits.disk_mb + limits.tmp_mb}Mi"},
                      "requests": {"memory": f"{min(limits.memory_mb, 1024)}Mi", "cpu": "1"}},
        "volumeMounts": [{"name": "paper", "mountPath": "/home/paper", "readOnly": True},
                         {"name": "submission", "mountPath": "/home/submission"},
                         {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "runAsUser": 1000,
                            "runAsGroup": 1000, "readOnlyRootFilesystem": True, "privileged": False,
                            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
    }
    spec = {"restartPolicy": "Never", "automountServiceAccountToken": False, "enableServiceLinks": False,
            "hostNetwork": False, "hostPID": False, "hostIPC": False, "containers": [container],
            "securityContext": {"fsGroup": 1000},
            "volumes": [{"name": "paper", "configMap": {"name": name, "defaultMode": 0o444}},
                        {"name": "submission", "emptyDir": {"sizeLimit": f"{limits.disk_mb}Mi"}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": f"{limits.tmp_mb}Mi"}}],
            "activeDeadlineSeconds": 86400}
    if service_account:
        spec["serviceAccountName"] = service_account
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"app.kubernetes.io/name": "klong-sandbox", "klong/rollout-id": _label(rollout_id)}},
            "spec": spec}


def render_network_policy(rollout_id: str, *, namespace: str = "default") -> dict:
    """Denies every ingress and egress of the rollout's sandbox Pod (no network, as locally)."""
    name = _name(rollout_id)
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"podSelector": {"matchLabels": {"klong/rollout-id": _label(rollout_id)}},
                     "policyTypes": ["Ingress", "Egress"], "ingress": [], "egress": []}}


def render_paper_config_map(rollout_id: str, paper_files: dict[str, str], *, namespace: str = "default") -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": _name(rollout_id), "namespace": namespace},
            "data": dict(paper_files)}


def render_manifests(rollout_id: str, limits: SandboxLimits, *, image: str = "python:3.11-slim",
                     namespace: str = "default", paper_files: Optional[dict[str, str]] = None) -> list[dict]:
    """Everything `--sandbox k8s` creates for a rollout: paper ConfigMap, NetworkPolicy, Pod."""
    return [render_paper_config_map(rollout_id, paper_files or {}, namespace=namespace),
            render_network_policy(rollout_id, namespace=namespace),
            render_pod_manifest(rollout_id, limits, image=image, namespace=namespace)]


class K8sSandbox:
    """One pod per rollout; tool commands by the exec API (untested here: no cluster is reachable)."""

    def __init__(self, rollout_id: str, limits: SandboxLimits = SandboxLimits(), *, image: str = "python:3.11-slim",
                 namespace: str = "default"):
        self.limits, self.namespace, self.rollout_id = limits, namespace, rollout_id
        self.manifest = render_pod_manifest(rollout_id, limits, image=image, namespace=namespace)
        self.name = self.manifest["metadata"]["name"]
        self.paper_dir, self.submission_dir = "/home/paper", "/home/submission"
        self._api = None

    def setup(self, paper_files: dict[str, str]) -> None:
        from kubernetes import client, config

        try:
            config.load_incluster_config() if os.environ.get("KUBERNETES_SERVICE_HOST") else config.load_kube_config()
        except Exception as e:  # the client raises ConfigException or plain IO errors
            raise ConfigError(f"--sandbox k8s: no usable Kubernetes configuration ({e})") from e
        self._api = client.CoreV1Api()
        self._api.create_namespaced_config_map(self.namespace, render_paper_config_map(
            self.rollout_id, paper_files, namespace=self.namespace))
        client.NetworkingV1Api().create_namespaced_network_policy(self.namespace, render_network_policy(
            self.rollout_id, namespace=self.namespace))
        self._api.create_namespaced_pod(self.namespace, self.manifest)
        deadline = time.monotonic() + 300
        while self._api.read_namespaced_pod(self.name, self.namespace).status.phase != "Running":
            if time.monotonic() > deadline:
                raise TransientError(f"pod {self.name} not running after 300 s")
            time.sleep(2)

    def run(self, command: str, *, timeout_s: float, stdin: Optional[str] = None) -> ExecResult:
        from kubernetes.stream import stream

        wrapped = f"timeout -s KILL {max(1, int(timeout_s))} bash -c {shlex.quote(command)}"
        ws = stream(self._api.connect_get_namespaced_pod_exec, self.name, self.namespace,
                    command=["bash", "-c", wrapped], stderr=True, stdin=stdin is not None, stdout=True, tty=False,
                    _preload_content=False)
        if stdin is not None:
            ws.write_stdin(stdin)
        ws.run_forever(timeout=timeout_s + 10)
        out = (ws.read_stdout() or "") + (ws.read_stderr() or "")
        code = ws.returncode
        ws.close()
        return ExecResult(out, None if code == 137 else code, code == 137, len(out.encode()))

    def read_text(self, path: str) -> str:
        res = self.run(f"cat {shlex.quote(path)}", timeout_s=60)
        if res.exit_code != 0:
            raise FileNotFoundError(path)
        return res.output

    def local_submission(self, scratch: Path) -> Path:
        """Copies /home/submission out of the pod (tar, base64 over the exec stream) into
        `scratch/submission`. The stream is the Pod's to shape, so it is never handed to tarfile's
        extraction: `extract_tar_nofollow` writes its files and directories only, by descriptor."""
        import base64
        import io

        from producers.sandbox_copy import CopyBounds, extract_tar_nofollow

        res = self.run(f"tar -C {self.submission_dir} -cf - . | base64 -w0", timeout_s=600)
        dest = Path(scratch) / "submission"
        dest.parent.mkdir(parents=True, exist_ok=True)
        extract_tar_nofollow(io.BytesIO(base64.b64decode(res.output)), dest, CopyBounds(max_bytes=self.limits.disk_mb << 20))
        return dest

    def close(self) -> None:
        if self._api is not None:
            from kubernetes import client

            self._api.delete_namespaced_pod(self.name, self.namespace)
            self._api.delete_namespaced_config_map(self.name, self.namespace)
            client.NetworkingV1Api().delete_namespaced_network_policy(self.name, self.namespace)
