"""`klong dataset build|list|show|diff` and `klong replay`: versioned datasets.

    klong dataset build web-rl --kind rl [--config rl.yaml] [--stage 2] [--iteration 5] [max_tokens=32768 ...]
    klong dataset list
    klong dataset show web-rl@3 [--json]
    klong dataset diff web-rl@2 web-rl@3
    klong replay web-rl@3 [--from-kafka]

`build` prints `NAME@N` on stdout (what a script captures) and a summary on stderr. Config: the YAML
file first, then `key=value` overrides (values read as YAML: 4096 is an int, true a bool, [1,2] a list),
then `--stage` / `--iteration`. `--config` also takes a shipped example by name (`sft`, or
`examples/sft.yaml` from any directory). Keys: max_tokens, overlap_turns, loss_on_overlap, prefix_loss,
windows (fit|context), reward_mode, std_normalize, drop_constant_groups, max_staleness, tokenizer, stage, iteration,
tasks, statuses
(README "Versioned datasets"). On a terminal, build and replay show progress bars (-q: none); Ctrl-C
leaves nothing half-built.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from klong.cli import IntermixedParser
from core.settings import read_yaml
from schemas.errors import ConfigError


def _settings(args):
    from core.settings import Settings

    return Settings.load(args.home, args.bootstrap_servers, args.topic_prefix)


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def parse_config(path: str | None, overrides: list[str], kind: str | None, stage=None, iteration=None) -> tuple[str, dict]:
    """(kind, config mapping) from a YAML file, key=value overrides and flags."""
    import yaml

    cfg: dict = read_yaml(path) if path else {}
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"{item!r}: overrides are key=value (e.g. max_tokens=32768)")
        try:
            cfg[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"{item!r}: value is not valid YAML: {e}") from e
    explicit = {o.partition("=")[0].strip() for o in overrides}
    for key, flag in (("stage", stage), ("iteration", iteration)):
        if flag is not None:
            if key in explicit and cfg[key] != flag:
                raise ConfigError(f"--{key} {flag} conflicts with {key}={cfg[key]}")
            cfg[key] = flag
    file_kind = cfg.pop("kind", None)
    if kind and file_kind and kind != file_kind:
        raise ConfigError(f"--kind {kind} conflicts with kind: {file_kind} in {path}")
    kind = kind or file_kind
    if not kind:
        raise ConfigError("--kind sft|rl is required (or kind: in the --config file)")
    return kind, cfg


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"  # the example configs beside the installed package


def config_file(value: str | None) -> str | None:
    """`--config` as given, else the shipped example of that name or path: `examples/sft.yaml` and `sft` both
    find EXAMPLES/sft.yaml from any directory."""
    if value is None or Path(value).exists():
        return value
    parts = Path(value).parts
    if len(parts) == 2 and parts[0] == "examples":
        parts = parts[1:]
    if len(parts) != 1:  # another path: reported as missing by read_yaml
        return value
    name = parts[0]
    shipped = EXAMPLES / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    return str(shipped) if shipped.is_file() else value  # a missing file is reported by read_yaml


def _check_archived(settings, wait_s) -> None:
    """A build reads the archive only: say so when Kafka holds events it has not archived yet, or wait
    for the sink (--wait-archived)."""
    from schemas.errors import BrokerError, ConfigError
    from store.status import unarchived_events, wait_archived

    try:
        if wait_s is not None:
            wait_archived(settings, wait_s)
            return
        left = unarchived_events(settings)
    except (BrokerError, ConfigError) as e:
        if wait_s is not None:
            raise
        _err(f"warning: could not ask Kafka for events not archived yet ({e}); building from the archive as it is")
        return
    if left:
        _err(f"warning: Kafka holds {left} events the archive does not have yet; they are not in this version "
             "(run `klong sink run --until-idle` first, or build with --wait-archived)")


def cmd_build(args) -> int:
    from consumers.materialize import build_version

    from klong.cli_output import _progress
    from store.datasets import report_progress

    kind, cfg = parse_config(config_file(args.config), args.overrides, args.kind, args.stage, args.iteration)
    _check_archived(_settings(args), args.wait_archived)
    bar = _progress(f"building {args.name}", unit=" rollouts", quiet=args.quiet)
    try:
        with report_progress(lambda rollouts, tokens: (bar.set_postfix_str(f"{tokens:,} tokens", refresh=False),
                                                       bar.update(rollouts - bar.n))):
            s = _settings(args)
            outcome = build_version(s.home, args.name, kind, cfg, archive=s.archive)
    except KeyboardInterrupt:
        bar.close()
        _err(f"klong dataset build: interrupted; no version of {args.name} was published (a build is all or nothing)")
        return 130
    bar.close()
    m = outcome.manifest
    if outcome.existing:
        _err(f"no new input and the same config: {outcome.ref} is up to date ({m['content_hash'][:19]}...)")
    elif not args.quiet:
        c = m["counts"]
        _err(f"built {outcome.ref} ({m['kind']}): {c['samples']} samples from {c['rollouts']} rollouts, "
             f"{c['tokens']} tokens stored, {len(m['pending'])} pending, in {m['build_seconds']}s")
        if m["drops"]:
            _err("left out: " + ", ".join(f"{k} {v['count']} {v['unit']}" for k, v in m["drops"].items()))
    if m["kind"] == "rl":
        from consumers.advantages import single_rollout_warning

        warning = single_rollout_warning(m["counts"])
        if warning:
            _err(warning)
    print(outcome.ref)
    return 0


def cmd_list(args) -> int:
    import pyarrow as pa

    from klong.cli_output import _print_table
    from store.datasets import all_manifests
    from store.datasets_s3 import listing
    from core.objstore import is_s3

    s = _settings(args)
    ms = listing(s.home, s.archive) if is_s3(s.archive) else all_manifests(s.home)  # with the bucket's versions
    if args.json:
        for m in ms:
            print(json.dumps({k: m[k] for k in ("ref", "kind", "counts", "content_hash", "created_at")}))
        return 0
    rows = [{"dataset": m["ref"], "kind": m["kind"], "samples": m["counts"]["samples"],
             "rollouts": m["counts"]["rollouts"], "tokens": m["counts"]["tokens"], "pending": len(m["pending"]),
             "dropped": sum(d["count"] for d in m["drops"].values()), "created_at": m["created_at"][:19],
             "content_hash": m["content_hash"][:19]} for m in ms]
    names = ["dataset", "kind", "samples", "rollouts", "tokens", "pending", "dropped", "created_at", "content_hash"]
    _print_table(pa.Table.from_pylist(rows) if rows else pa.table({n: [] for n in names}), "table", None)
    return 0


def cmd_show(args) -> int:
    from store.datasets import load_manifest

    s = _settings(args)
    m = load_manifest(s.home, args.ref, archive=s.archive)  # a version only in the archive's bucket: fetched
    if args.json:
        print(json.dumps(m, indent=2, sort_keys=True))
        return 0
    c = m["counts"]
    print(f"{m['ref']}  kind {m['kind']}  created {m['created_at']}")
    print(f"content hash: {m['content_hash']}")
    print(f"samples {c['samples']}, rollouts {c['rollouts']}, tokens stored {c['tokens']}, loss tokens {c['loss_tokens']}")
    print("config: " + " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(m["config"].items())))
    print(f"tokenizer: {m['tokenizer']}")
    print("left out: " + (", ".join(f"{k} {v['count']} {v['unit']}" for k, v in m["drops"].items()) or "nothing"))
    pend = m["pending"]
    print(f"pending rollouts: {len(pend)}" + (f" ({', '.join(pend[:5])}{', ...' if len(pend) > 5 else ''})" if pend else ""))
    water = m["input"]["watermark"]
    print(f"input: {len(m['input']['flushes'])} archive flush directories; watermark " +
          ", ".join(f"{k} {'+'.join(f'{a}..{b}' for a, b in v)}" for k, v in sorted(water.items())))
    return 0


def cmd_diff(args) -> int:
    import pyarrow.parquet as pq

    from store import datasets as ds

    s = _settings(args)
    home = s.home
    a, b = ds.load_manifest(home, args.a, archive=s.archive), ds.load_manifest(home, args.b, archive=s.archive)
    print(f"{a['ref']} -> {b['ref']}")
    if a["content_hash"] == b["content_hash"]:
        print("same content hash: the datasets are identical")
    lines = []
    for key in ("kind", "tokenizer"):
        if a[key] != b[key]:
            lines.append(f"{key}: {a[key]} -> {b[key]}")
    for k in sorted(set(a["config"]) | set(b["config"])):
        if a["config"].get(k) != b["config"].get(k):
            lines.append(f"config {k}: {json.dumps(a['config'].get(k))} -> {json.dumps(b['config'].get(k))}")
    for k in ("samples", "rollouts", "tokens", "loss_tokens"):
        if a["counts"][k] != b["counts"][k]:
            lines.append(f"{k}: {a['counts'][k]} -> {b['counts'][k]} ({b['counts'][k] - a['counts'][k]:+d})")
    for k in sorted(set(a["drops"]) | set(b["drops"])):
        x, y = a["drops"].get(k, {}).get("count", 0), b["drops"].get(k, {}).get("count", 0)
        if x != y:
            lines.append(f"left out {k}: {x} -> {y} ({y - x:+d})")
    if len(a["pending"]) != len(b["pending"]):
        lines.append(f"pending rollouts: {len(a['pending'])} -> {len(b['pending'])}")
    fa, fb = set(a["input"]["flushes"]), set(b["input"]["flushes"])
    if fa != fb:
        lines.append(f"input: {len(fb - fa)} flush directories added, {len(fa - fb)} removed")
    ra, rb = (set(pq.read_table(ds.version_dir(home, m["name"], m["version"]) / ds.TOKENS,
                                columns=["rollout_id"]).column(0).to_pylist()) for m in (a, b))
    for what, s in (("added", rb - ra), ("removed", ra - rb)):
        if s:
            lines.append(f"rollouts {what}: {len(s)} ({', '.join(sorted(s)[:5])}{', ...' if len(s) > 5 else ''})")
    print("\n".join(lines) if lines else "no differences in config, counts or rollouts")
    return 0


def cmd_export(args) -> int:
    from klong.cli_output import _progress
    from trainer.export import export_dataset

    bar = _progress("exporting", unit="samples", quiet=args.quiet)
    try:
        s = _settings(args)
        chat = args.messages or args.format == "verl"  # verl's own dataset classes read the chat columns
        r = export_dataset(s.home, args.ref, args.format, args.output, settings=s if chat else None, archive=s.archive,
                           progress=lambda n: bar.update(n - bar.n))
    finally:
        bar.close()
    print(f"exported {r.ref} ({r.content_hash[:19]}...) as {r.format}: {r.samples} samples, {r.tokens} tokens "
          f"({r.loss_tokens} loss tokens), {len(r.files)} file(s), {r.bytes / 1e6:.1f} MB in {r.directory}")
    print(f"load it: datasets.load_dataset(\"parquet\", data_files=\"{r.directory}/data/*.parquet\", split=\"train\")")
    if r.format == "verl":
        print(f"verl: data.train_files={r.directory}/data/<file>.parquet reads `messages` (MultiTurnSFTDataset) or "
              f"`prompt` (RLHFDataset); klong's exact ids and loss mask: data.custom_cls.path="
              f"{r.directory}/klong_verl_dataset.py data.custom_cls.name=KlongTokenDataset")
    return 0


def cmd_replay(args) -> int:
    from consumers.replay import replay

    from klong.cli_output import StageBars

    bars = StageBars({"re-archiving from Kafka": " events", "rebuilding": " rollouts"}, args.quiet)
    try:
        report = replay(_settings(args), args.ref, from_kafka=args.from_kafka, keep=args.keep,
                        progress=lambda stage, n: bars(stage, n))
    except KeyboardInterrupt:
        bars.close()
        _err("klong replay: interrupted; nothing was changed (the scratch rebuild is removed)")
        return 130
    bars.close()
    source = "Kafka" if report.source == "kafka" else "the archive"
    if report.identical:
        print(f"identical: {report.ref} rebuilt from {source} has content hash {report.rebuilt_hash}")
    else:
        print(f"DIFFERENT: {report.ref} rebuilt from {source}")
        print(f"  manifest: {report.recorded_hash}\n  stored:   {report.stored_hash}\n  rebuilt:  {report.rebuilt_hash}")
        for line in report.differences:
            print(f"  {line}")
    if report.scratch:
        print(f"rebuild kept in {report.scratch}")
    return 0 if report.identical else 1


def register(sub, common) -> None:
    """Adds the dataset and replay commands to the `klong` parser."""
    d = sub.add_parser("dataset", help="versioned datasets: build, list, show, diff, export")
    dsub = d.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=IntermixedParser)

    b = dsub.add_parser("build", parents=[common], help="materialize a dataset version from the archive; prints NAME@N "
                        "(with an s3:// archive, also published to its bucket)")
    b.add_argument("name", help="dataset name (letters, digits, . _ -)")
    b.add_argument("--kind", choices=["sft", "rl"], help="sft: loss masks; rl: Q, advantages, behaviour logprobs")
    b.add_argument("--config", help="YAML file of config keys (max_tokens, overlap_turns, reward_mode, ...), or a "
                   "shipped example by name (sft: examples/sft.yaml, found from any directory)")
    b.add_argument("--stage", type=int, help="only rollouts of this stage")
    b.add_argument("--iteration", type=int, help="only rollouts of this iteration")
    b.add_argument("--wait-archived", type=float, nargs="?", const=600.0, metavar="SECONDS",
                   help="first wait (default up to 600 s) until a running sink has archived every event Kafka holds; "
                        "without it, a build warns when Kafka holds events the archive does not")
    b.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, values parsed as YAML")
    b.set_defaults(func=cmd_build)

    ls = dsub.add_parser("list", parents=[common], help="every dataset version (with an s3:// archive: the bucket's too)")
    ls.add_argument("--json", action="store_true", help="one JSON object per version (ref, kind, counts, hash, created_at)")
    ls.set_defaults(func=cmd_list)

    sh = dsub.add_parser("show", parents=[common], help="one version: config, counts, drops, pending, input "
                         "(one only in an s3:// archive's bucket is fetched)")
    sh.add_argument("ref", help="NAME@N (NAME alone: the latest)")
    sh.add_argument("--json", action="store_true", help="the whole manifest")
    sh.set_defaults(func=cmd_show)

    df = dsub.add_parser("diff", parents=[common], help="what changed between two versions")
    df.add_argument("a", help="NAME@A")
    df.add_argument("b", help="NAME@B")
    df.set_defaults(func=cmd_diff)

    ex = dsub.add_parser("export", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
                         help="write a version as pre-tokenized Parquet for TRL, Hugging Face or verl",
                         description="Writes every sample of a dataset version (tokens and the exact loss mask "
                         "`klong train` uses;\nrl: behaviour logprobs and advantages) as Parquet that "
                         "datasets.load_dataset(\"parquet\", ...) loads.\nColumns per format: README "
                         "\"Exporting a dataset version\" and trainer/export.py.")
    ex.add_argument("ref", help="NAME@N (NAME alone: the latest)")
    ex.add_argument("--format", required=True, choices=["hf", "trl", "verl"],
                    help="trl: input_ids + assistant_masks/completion_mask; hf: input_ids, attention_mask, labels "
                         "(-100 off the loss); verl: messages (verl's MultiTurnSFTDataset), prompt, data_source, "
                         "reward_model, extra_info (RLHFDataset), and input_ids, response_mask, ... for the "
                         "KlongTokenDataset class written beside the data (data.custom_cls)")
    ex.add_argument("-o", "--output", required=True, metavar="DIR", help="new (or empty) output directory")
    ex.add_argument("--messages", action="store_true",
                    help="also a `messages` column (hf, trl; verl always has it): each window as chat messages read "
                         "from the archive, its pinned prefix first, tool calls structured")
    ex.set_defaults(func=cmd_export)

    r = sub.add_parser("replay", parents=[common], help="rebuild a dataset version and compare content hashes")
    r.add_argument("ref", help="NAME@N")
    r.add_argument("--from-kafka", action="store_true",
                   help="first re-archive the topics from their earliest offsets into a scratch home")
    r.add_argument("--keep", action="store_true", help="keep the rebuild (and scratch archive) for inspection")
    r.set_defaults(func=cmd_replay)
