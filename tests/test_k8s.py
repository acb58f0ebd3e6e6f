"""The Kubernetes objects the project ships are ones a real API server would accept: each is checked with
`kubernetes-validate --strict` against the OpenAPI schema of a current Kubernetes release (offline; no API
server can run here), plus the DNS-1123 rules the schema does not carry. Covered: the sandbox's ConfigMap,
NetworkPolicy and Pod (`producers.sandbox_k8s`) and the training ConfigMap and Job (`trainer.launch`)."""

from __future__ import annotations

import copy
import re

import pytest

kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the `test` extra)")

from core.settings import Settings  # noqa: E402
from producers.sandbox import SandboxLimits  # noqa: E402
from producers.sandbox_k8s import render_manifests, render_network_policy, render_pod_manifest  # noqa: E402
from trainer.config import load_config, shipped_configs  # noqa: E402
from trainer.launch import k8s_manifest, to_dicts  # noqa: E402

VERSION = kv.latest_version()  # the newest Kubernetes release whose schema the package ships
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def validate(obj: dict) -> None:
    """Raises kubernetes_validate.ValidationError for a field the schema does not know (strict) or a wrong type."""
    kv.validate(obj, VERSION, strict=True)
    name = obj["metadata"]["name"]
    assert len(name) <= 63 and DNS_LABEL.fullmatch(name), name
    for value in obj["metadata"].get("labels", {}).values():
        assert len(value) <= 63 and LABEL_VALUE.fullmatch(value), value


@pytest.mark.parametrize("rollout_id", ["r-1", "0192f0c1-7b2a-7c3d-9e4f-0123456789ab", "A_b", "x" * 200, "a.b:c+d@E"])
def test_sandbox_objects_pass_the_strict_schema(rollout_id):
    for obj in render_manifests(rollout_id, SandboxLimits(disk_mb=100), paper_files={"paper.md": "p"}):
        validate(obj)


def test_network_policy_selects_exactly_its_pod():
    """The label is the whole rollout id's slug: the old `name[15:]` of a 14-character prefix dropped its
    first character, so `r-1` and `x-1` were both labelled `-1`."""
    labels = set()
    for rid in ("r-1", "x-1", "A.b", "a-b", "a:b"):
        pod, policy = render_pod_manifest(rid, SandboxLimits()), render_network_policy(rid)
        label = pod["metadata"]["labels"]["klong/rollout-id"]
        assert policy["spec"]["podSelector"]["matchLabels"] == {"klong/rollout-id": label}
        assert pod["metadata"]["name"] == "klong-sandbox-" + label
        labels.add(label)
    assert render_pod_manifest("r-1", SandboxLimits())["metadata"]["labels"]["klong/rollout-id"].startswith("r-1-")
    assert len(labels) == 5  # ids that read alike get different labels (and pods)


def test_the_validator_refuses_what_a_server_would():
    """The check can fail: a misspelt field, a wrong type and a bad label are each refused."""
    pod = render_pod_manifest("r-1", SandboxLimits())
    typo = copy.deepcopy(pod)
    typo["spec"]["containers"][0]["securityContxt"] = typo["spec"]["containers"][0].pop("securityContext")
    wrong = copy.deepcopy(pod)
    wrong["spec"]["activeDeadlineSeconds"] = "a day"
    for bad in (typo, wrong):
        with pytest.raises(kv.ValidationError):
            validate(bad)
    label = copy.deepcopy(pod)
    label["metadata"]["labels"]["klong/rollout-id"] = "-r-1"
    with pytest.raises(AssertionError):
        validate(label)


def test_training_job_passes_the_strict_schema(tmp_path):
    settings = Settings(home=tmp_path)
    cfg = load_config(shipped_configs()[0], ["k8s.bootstrap_servers=kafka.klong.svc:9092", "k8s.gpus=8",
                                             "k8s.image=registry.example/klong:1.2", "k8s.kafka_secret=kafka-sasl"],
                      dataset="sft@1")
    for run_id in ("sft-v1-sft-20260101-000000-abcd", "R" * 100):
        config_map, job = to_dicts(k8s_manifest(settings, cfg, run_id, resume=tmp_path / "runs" / "x"))
        assert (config_map["kind"], job["kind"]) == ("ConfigMap", "Job")
        validate(config_map)
        validate(job)
        validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", **job["spec"]["template"]["metadata"]},
                  "spec": job["spec"]["template"]["spec"]})
