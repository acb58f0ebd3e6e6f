"""The rollout fleet on Kubernetes: a Deployment of `klong rollout worker` pods.

    klong rollout deployment --image registry/klong:1.0 --replicas 16 > workers.yaml   # then kubectl apply
    >>> worker_deployment(image="registry/klong:1.0", replicas=16, bootstrap_servers="kafka:9092")

Every pod is one worker of the consumer group; scale with `kubectl scale deployment klong-rollout-worker`.
A pod that dies (node lost, OOM) is like a worker killed with kill -9: its requests go to the other pods,
which resume its rollouts from the log. A rolling update sends SIGTERM: the worker hands its running
rollouts over and exits within `terminationGracePeriodSeconds`. The pods share the data home through a
ReadWriteMany PersistentVolumeClaim (blobs, archive, the rollouts' submission directories) and reach Kafka
at `bootstrap_servers`; Kafka security settings come from the Secret `klong-kafka` (optional), the policy's
API key from the Secret `klong-policy` (optional). Each rollout's sandbox is the kind the plan's agent
config names: `unsafe-local` runs tool calls as subprocesses inside the worker pod (its limits bound them),
`local` needs bubblewrap and user namespaces in the pod, `k8s` makes a sandbox Pod per rollout
(producers.sandbox_k8s; the workers then need a service account allowed to, which this manifest does not
mount). Validated offline against the Kubernetes OpenAPI schema (kubernetes-validate), never applied here:
no cluster is reachable from this machine.
"""

from __future__ import annotations

NAME = "klong-rollout-worker"


def worker_deployment(*, image: str, replicas: int = 4, namespace: str = "default", max_rollouts: int = 64,
                      data_claim: str = "klong-data", bootstrap_servers: str = "kafka:9092",
                      topic_prefix: str = "klong", cpu: str = "4", memory: str = "16Gi",
                      grace_s: int = 120) -> dict:
    """The Deployment manifest (a dict; yaml.safe_dump it)."""
    if replicas < 0:
        raise ValueError(f"replicas must be >= 0, got {replicas}")
    if max_rollouts < 1:
        raise ValueError(f"max_rollouts must be >= 1, got {max_rollouts}")
    labels = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/part-of": "klong"}
    env = [{"name": "KLONG_HOME", "value": "/data"},
           {"name": "KLONG_BOOTSTRAP_SERVERS", "value": bootstrap_servers},
           {"name": "KLONG_TOPIC_PREFIX", "value": topic_prefix},
           {"name": "KLONG_WORKER_MAX_ROLLOUTS", "value": str(max_rollouts)}]
    container = {
        "name": "worker", "image": image,
        "command": ["klong", "rollout", "worker"],
        "env": env,
        "envFrom": [{"secretRef": {"name": "klong-kafka", "optional": True}},
                    {"secretRef": {"name": "klong-policy", "optional": True}}],
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}},
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                            "runAsNonRoot": True, "runAsUser": 1000},
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": NAME, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/name": NAME}},
            # one pod at a time: each hand-over is a group rebalance
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": grace_s,
                    "automountServiceAccountToken": False,
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}, "fsGroup": 1000},
                    "containers": [container],
                    "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": data_claim}}],
                },
            },
        },
    }
