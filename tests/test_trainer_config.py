"""Run configs: every shipped YAML loads; bad or contradictory configs fail before training, naming the keys;
the Kubernetes Job is valid for the client's API models; views exist on an empty archive."""

from __future__ import annotations

import pytest
import yaml
from kubernetes import client

from klong.cli import main
from core.settings import Settings, Topics
from schemas.errors import ConfigError
from store.catalog import Catalog
from tests.test_trainer_data import train_home  # noqa: F401  (session fixture)
from tests.test_trainer_run import klong
from trainer.config import from_dict, load_config, shipped_configs
from trainer.launch import k8s_manifest, k8s_name, to_dicts, to_yaml


def test_every_shipped_yaml_loads():
    names = {p.name for p in shipped_configs()}
    assert {"sft_tiny.yaml", "rl_tiny.yaml", "sft_smollm2.yaml", "rl_smollm2.yaml"} <= names
    for path in shipped_configs():
        cfg = load_config(path)
        assert cfg.mode in ("sft", "rl") and cfg.model.name in ("tiny", "smollm2")
        assert cfg.model.fold_token_ids == (cfg.model.name == "tiny")  # real token ids are never folded
        assert load_config(path, ["optim.lr=0.5", "engine.zero_stage=2"]).optim.lr == 0.5


def test_bad_config_names_every_key_at_fault():
    with pytest.raises(ConfigError) as e:
        load_config(shipped_configs()[0], ["optim.lrr=1", "engine.zero_stage=7", "loss.reduction=mean",
                                           "train.max_steps=ten", "model.layers=0"])
    msg = str(e.value)
    for key in ("optim.lrr", "did you mean optim.lr", "engine.zero_stage", "loss.reduction", "train.max_steps",
                "model.layers"):
        assert key in msg
    with pytest.raises(ConfigError, match="engine.zero_stage=3 with loss.beta"):
        load_config(None, ["mode=rl", "engine.zero_stage=3", "loss.beta=0.1"])
    with pytest.raises(ConfigError, match="loss.beta.*mode is sft"):
        load_config(None, ["mode=sft", "loss.beta=0.1"])
    with pytest.raises(ConfigError, match="--mode rl conflicts with mode: sft"):
        load_config(None, ["mode=sft"], mode="rl")
    with pytest.raises(ConfigError, match="loss.tis_cap=2.0 .* loss.old_logprobs is behaviour"):
        load_config(None, ["mode=rl", "loss.old_logprobs=behaviour", "loss.tis_cap=2"])
    with pytest.raises(ConfigError, match=r"loss.dual_clip: must be > 1"):
        load_config(None, ["mode=rl", "loss.dual_clip=0.5"])


def test_cli_fails_before_training(train_home, capsys):
    s = train_home
    runs = s.home / "runs"
    before = set(runs.iterdir()) if runs.exists() else set()
    cases = [
        (["--dataset", "sft@1", "--mode", "sft", "--config", "sft_tiny", "optim.lrr=1"], "optim.lrr"),
        (["--dataset", "sft@1", "--mode", "rl", "--config", "rl_tiny"], "mode=rl needs an rl dataset"),
        (["--dataset", "sft@1", "--config", "sft_tiny", "data.micro_batch_tokens=64"], "data.micro_batch_tokens=64"),
        (["--dataset", "sft@9", "--config", "sft_tiny"], "no such version"),
        (["--config", "sft_tiny"], "dataset is required"),
        (["--dataset", "sft@1", "--config", "sft_tiny", "--launcher", "local", "--nproc", "2"], "--launcher deepspeed"),
        (["--dataset", "sft@1", "--config", "no_such.yaml"], "no_such.yaml"),
        (["--dataset", "sft@1", "--config", "sft_tiny", "model.name=no-such-model", "model.fold_token_ids=false"],
         "model.name: model 'no-such-model' is not a directory nor a model under"),
    ]
    for argv, expected in cases:
        assert main(klong(s, "train", *argv)) == 2, argv
        assert expected in capsys.readouterr().err, argv
    # --dry-run checks and prints what would run, and runs nothing
    assert main(klong(s, "train", "--dataset", "sft@1", "--config", "sft_tiny", "--launcher", "deepspeed",
                      "--nproc", "2", "--dry-run", "optim.lr=0.01")) == 0
    out = capsys.readouterr().out
    assert "deepspeed.launcher.runner --num_gpus 2" in out and "lr: 0.01" in out
    after = set(runs.iterdir()) if runs.exists() else set()
    assert after == before  # nothing started


def test_k8s_manifest_is_valid_for_the_api(train_home, capsys):
    s = train_home
    cfg = load_config(shipped_configs()[0], ["k8s.bootstrap_servers=kafka.klong.svc:9092", "k8s.gpus=8",
                                             "k8s.image=registry.example/klong:1.2", "k8s.kafka_secret=kafka-sasl"],
                      dataset="sft@1")
    cm, job = k8s_manifest(s, cfg, "sft-v1-sft-20260101-000000-abcd", resume=s.home / "runs" / "x" / "checkpoints")
    # a round trip through the client's models: every field a known one with the right type, required ones set
    api = client.ApiClient()
    docs = to_dicts([cm, job])
    back = api._ApiClient__deserialize(docs[1], "V1Job")
    assert back == job and api._ApiClient__deserialize(docs[0], "V1ConfigMap") == cm
    pod = back.spec.template.spec
    c = pod.containers[0]
    assert job.metadata.name == k8s_name("sft-v1-sft-20260101-000000-abcd") == cm.metadata.name
    assert len(job.metadata.name) <= 63 and job.metadata.name.replace("-", "").isalnum()
    assert c.image == "registry.example/klong:1.2" and c.resources.limits["nvidia.com/gpu"] == "8"
    assert c.command[:2] == ["klong", "train"] and c.command[c.command.index("--nproc") + 1] == "8"
    assert c.command[c.command.index("--launcher") + 1] == "deepspeed"
    assert c.command[c.command.index("--resume") + 1] == "/data/klong/runs/x/checkpoints"
    env = {e.name: e.value for e in c.env}
    assert env["KLONG_HOME"] == "/data/klong" and env["KLONG_BOOTSTRAP_SERVERS"] == "kafka.klong.svc:9092"
    assert env["KLONG_TOPIC_PREFIX"] == s.topics.prefix and c.env_from[0].secret_ref.name == "kafka-sasl"
    vols = {v.name: v for v in pod.volumes}
    assert vols["home"].persistent_volume_claim.claim_name == "klong-data" and vols["shm"].empty_dir.medium == "Memory"
    assert {m.mount_path for m in c.volume_mounts} == {"/data/klong", "/etc/klong", "/dev/shm"}
    assert pod.restart_policy == "Never" and back.spec.backoff_limit == 0
    run_cfg = yaml.safe_load(cm.data["config.yaml"])
    assert from_dict(run_cfg) == cfg  # the pod reads back exactly this run's config
    with pytest.raises(ValueError):  # the client refuses a container without its required name
        client.V1Container(name=None, image="x")

    # through the CLI: --dry-run prints both objects as YAML
    assert main(klong(s, "train", "--dataset", "sft@1", "--config", "sft_tiny", "--launcher", "k8s", "--dry-run",
                      "--nproc", "2", "k8s.bootstrap_servers=kafka:9092")) == 0
    objs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [o["kind"] for o in objs] == ["ConfigMap", "Job"]
    assert objs[1]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    # the pod cannot reach this machine's embedded broker: named, before anything is built
    assert main(klong(s, "train", "--dataset", "sft@1", "--config", "sft_tiny", "--launcher", "k8s", "--dry-run")) == 2
    assert "k8s.bootstrap_servers" in capsys.readouterr().err
    assert "kind: Job" in to_yaml([cm, job])


def test_training_views_exist_on_an_empty_archive(tmp_path):
    cat = Catalog(Settings(home=tmp_path, topics=Topics("none")))
    for view in ("training_runs", "training_metrics", "training_checkpoints"):
        assert cat.scalar(f"SELECT count(*) FROM {view}") == 0
    cols = cat.sql("SELECT * FROM training_runs LIMIT 0").columns
    assert {"run_id", "status", "mode", "dataset", "dataset_hash", "policy_version_in", "policy_version_out",
            "steps", "final_loss", "last_checkpoint"} <= set(cols)


def test_exponent_without_a_dot_is_a_number():
    # YAML 1.1 reads `2e-5` as a string; `optim.lr=2e-5` is what a user types
    assert load_config(None, ["optim.lr=2e-5", "loss.clip_eps=1E-1"]).optim.lr == 2e-5
    with pytest.raises(ConfigError, match="optim.lr: must be a number"):
        load_config(None, ["optim.lr=fast"])
