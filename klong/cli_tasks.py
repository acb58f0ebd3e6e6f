"""`klong tasks ...`: the task registry: import, generate, list, show, and draft a rubric with a model.

    klong tasks import papers/fre papers/bam --split train      # validate every rubric, then register
    klong tasks list [--split eval] | show fre [--depth 2] [--json]
    klong tasks generate --seed 0 --n 50 --eval-fraction 0.4 -o tasks/family [--import]   # a task family
    klong tasks draft-rubric papers/new --base-url URL --model NAME   # writes rubric.json only if valid

`draft-rubric` takes the judge's flags (klong.cli_judge): its URL and model fall back to
`KLONG_JUDGE_BASE_URL` / `KLONG_JUDGE_MODEL`; its API key is read from `OPENAI_API_KEY` (none needed for
vLLM) and never printed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from klong.cli_judge import _grader, _model_flags, _table
from schemas.errors import ConfigError, KlongError


def _settings(args):
    from core.settings import Settings

    return Settings.load(args.home, args.bootstrap_servers, args.topic_prefix)


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


# ---- tasks ---------------------------------------------------------------------------------------------


SHIPPED = Path(__file__).resolve().parents[1]  # the shipped tasks/ live beside the installed package


def task_dirs(given: list[str]) -> list[str]:
    """The folders as given; one that is not there and names the shipped `tasks/...` (a glob too, which no
    shell expanded outside the repository) is read from the shipped copy, so the README works from anywhere."""
    out = []
    for d in given:
        p = Path(d)
        if p.exists() or p.is_absolute() or not p.parts or p.parts[0] != "tasks":
            out.append(d)
        elif any(c in d for c in "*?["):
            out.extend(sorted(str(x) for x in SHIPPED.glob(d) if x.is_dir()) or [d])
        else:
            out.append(str(SHIPPED / p) if (SHIPPED / p).is_dir() else d)
    return out


def cmd_import(args) -> int:
    from producers.tasks import import_tasks

    plan = import_tasks(_settings(args), task_dirs(args.dirs), args.split, strict_ids=args.strict_ids,
                        require_paper=args.require_paper, dry_run=args.dry_run)
    verb = "would register" if args.dry_run else "registered"
    for kind, sources in (("new", plan.new), ("changed", plan.changed), ("unchanged", plan.unchanged)):
        for src in sources:
            what = {"new": verb, "changed": f"{verb} a new version of", "unchanged": "unchanged, skipped"}[kind]
            print(f"{what} {src.task_id} ({src.split}): {src.report.n_leaves} leaves, depth {src.report.depth}, "
                  f"{src.content_hash[:19]}")
    if not args.quiet:
        for w in plan.warnings:
            _err(f"warning: {w}")
        sources = plan.new + plan.changed + plan.unchanged
        for src in sources:
            for v in src.report.warnings:
                _err(f"warning: {src.path / 'rubric.json'} {v}")
        missing: dict[str, int] = {}
        for src in sources:
            for name in src.missing:
                missing[name] = missing.get(name, 0) + 1
        for name, n in sorted(missing.items()):
            hint = " (the judge grades without the paper; --require-paper refuses such folders)" if name == "paper.md" else ""
            _err(f"note: {name} missing in {n} of {len(sources)} folder(s){hint}")
    return 0


def cmd_generate(args) -> int:
    from producers.task_family import KINDS, generate_family, write_family

    kinds = tuple(k.strip() for k in args.kinds.split(",")) if args.kinds else KINDS
    tasks = generate_family(args.seed, args.n, args.eval_fraction, kinds, args.prefix)
    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ConfigError(f"{out} is not empty: give another -o DIR, or --force to write into it")
    dirs = write_family(tasks, out)
    print(f"wrote {len(tasks)} tasks (seed {args.seed}): {len(dirs['train'])} train in {out / 'train'}, "
          f"{len(dirs['eval'])} held out (eval) in {out / 'eval'}; index {out / 'family.json'}")
    if args.do_import:
        from producers.tasks import import_tasks

        s = _settings(args)
        for split in ("train", "eval"):
            if dirs[split]:
                plan = import_tasks(s, dirs[split], split)
                print(f"registered {len(plan.to_emit)} {split} tasks ({len(plan.unchanged)} unchanged)")
    else:
        print(f"register them: klong tasks import {out}/train/* --split train && "
              f"klong tasks import {out}/eval/* --split eval")
    return 0


def cmd_list(args) -> int:
    from producers.tasks import read_registry
    from store.catalog import Catalog

    s = _settings(args)
    where = f"WHERE t.split = '{args.split}'" if args.split else ""
    rows = Catalog(s).arrow(f"""
        SELECT t.task_id, t.split, t.title, t.n_versions AS versions,
               count(r.node_id) FILTER (WHERE r.is_leaf) AS leaves, max(r.depth) AS depth,
               strftime(t.registered_at, '%Y-%m-%d %H:%M:%S') AS registered_at, true AS archived
        FROM tasks t LEFT JOIN rubric_nodes r USING (task_id) {where}
        GROUP BY ALL ORDER BY t.task_id""").to_pylist()
    archived = {r["task_id"] for r in rows}
    for e in read_registry(s):  # registered from this home, not archived yet (`klong sink run` archives them)
        if e["task_id"] not in archived and (not args.split or e["split"] == args.split):
            archived.add(e["task_id"])
            rows.append({"task_id": e["task_id"], "split": e["split"], "title": e["title"], "versions": None,
                         "leaves": None, "depth": None, "registered_at": None, "archived": False})
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    _table(rows, ["task_id", "split", "title", "versions", "leaves", "depth", "registered_at", "archived"])
    return 0


def _latest_payload(s, task_id: str):
    """(latest TaskPayload, number of versions, archived?): from the archive, else from the tasks topic."""
    from producers.tasks import latest_task
    from schemas.errors import BrokerError

    try:
        found = latest_task(s, task_id)
    except BrokerError:
        found = None
    if found is None:
        raise KlongError(f"task {task_id!r} is not registered (or not archived yet and Kafka is unreachable)")
    return found


def cmd_show(args) -> int:
    from producers.tasks import resolve_task
    from schemas.claimcheck import BlobStore
    from schemas.rubric import validate_rubric, walk

    s = _settings(args)
    p, versions, archived = _latest_payload(s, args.task_id)
    task = resolve_task(p, BlobStore(s.blob_dir))
    report = validate_rubric(task.rubric)
    cats: dict[str, int] = {}
    for n in walk(task.rubric):
        if n.is_leaf:
            cats[n.node["task_category"]] = cats.get(n.node["task_category"], 0) + 1
    info = {"task_id": task.task_id, "title": task.title, "split": task.split, "content_hash": task.content_hash,
            "versions": versions, "archived": archived,
            "paper": "inline" if p.paper_md is not None else p.paper_ref or "absent",
            "paper_chars": len(task.paper_md), "addendum_chars": len(task.addendum),
            "judge_addendum_chars": len(task.judge_addendum), "blacklist": list(p.blacklist),
            "rubric": {"nodes": report.n_nodes, "leaves": report.n_leaves, "depth": report.depth,
                       "by_category": cats, "by_reference": isinstance(p.rubric, str)}}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{task.task_id}  ({task.split})  {task.title}")
    print(f"content hash {task.content_hash}, {versions} version(s)" + ("" if archived else "  [in Kafka, not archived yet]"))
    print(f"paper: {info['paper']} ({info['paper_chars']} chars), addendum {info['addendum_chars']} chars, "
          f"judge addendum {info['judge_addendum_chars']} chars")
    print(f"blacklist: {', '.join(info['blacklist']) or '(none)'}")
    print(f"rubric: {report.n_nodes} nodes, {report.n_leaves} leaves, depth {report.depth}; "
          + ", ".join(f"{k} {v}" for k, v in sorted(cats.items())))
    for n in walk(task.rubric):
        if n.depth <= args.depth:
            kind = n.node.get("task_category") or f"{len(n.node['sub_tasks'])} sub-tasks"
            text = n.node["requirements"].replace("\n", " ")
            print(f"{'  ' * n.depth}- [{n.id}] w={n.node['weight']} ({kind}) {text[:100]}")
    return 0


def cmd_draft(args) -> int:
    import yaml

    from consumers.grading import ChatClient, draft_rubric
    from schemas.rubric import validate_rubric

    d = Path(args.dir)
    paper = d / "paper.md"
    if not paper.is_file():
        raise ConfigError(f"{paper} not found: drafting a rubric needs the paper's markdown")
    out = Path(args.output) if args.output else d / "rubric.json"
    if out.exists() and not args.force:
        raise ConfigError(f"{out} exists; pass --force to replace it or --output to write elsewhere")
    cfg = yaml.safe_load((d / "config.yaml").read_text()) if (d / "config.yaml").is_file() else {}
    title = (cfg or {}).get("title") or d.name
    addendum = (d / "addendum.md").read_text() if (d / "addendum.md").is_file() else ""
    client = ChatClient(_grader(args))
    try:
        tree, raw = draft_rubric(client, title, paper.read_text(), addendum)
    finally:
        client.close()
    if tree is None:
        _err(f"the model's reply holds no JSON object; nothing written. Reply began: {raw[:300]!r}")
        return 2
    report = validate_rubric(tree)
    if report.errors:
        _err(f"the drafted rubric breaks {len(report.errors)} rule(s); nothing written:")
        for v in report.errors[:50]:
            _err(f"  {v}")
        return 2
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(tree, indent=4, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}: {report.n_nodes} nodes, {report.n_leaves} leaves, depth {report.depth}")
    return 0


# ---- parser --------------------------------------------------------------------------------------------


def register(sub, common) -> None:
    t = sub.add_parser("tasks", parents=[common], help="task registry: import PaperBench task folders, list, show")
    tsub = t.add_subparsers(dest="action", required=True, metavar="ACTION")
    im = tsub.add_parser("import", parents=[common], help="validate and register task folders")
    im.add_argument("dirs", nargs="+", metavar="DIR", help="PaperBench task folders (config.yaml, rubric.json, ...)")
    im.add_argument("--split", choices=["train", "eval"], required=True,
                    help="train tasks feed datasets; eval tasks never enter one (their judge requests go first)")
    im.add_argument("--strict-ids", action="store_true", help="refuse repeated rubric ids even with identical content")
    im.add_argument("--require-paper", action="store_true", help="refuse folders without paper.md")
    im.add_argument("--dry-run", action="store_true", help="validate and plan, emit nothing")
    im.set_defaults(func=cmd_import)
    ge = tsub.add_parser("generate", parents=[common], help="write a task family from a seed, split train / held out",
                         description="Writes N small agent tasks (write a word, compute and write, fix a one-line "
                         "bug, edit a file, write lines), each graded by rubric check commands with partial credit, "
                         "into OUT/train/<id> and OUT/eval/<id> (held out). The same seed gives the same tasks.")
    ge.add_argument("--seed", type=int, default=0, help="the family's seed (default 0)")
    ge.add_argument("--n", type=int, default=50, help="number of tasks (default 50)")
    ge.add_argument("--eval-fraction", type=float, default=0.4,
                    help="share of each kind held out as eval tasks (default 0.4)")
    ge.add_argument("--kinds", help="comma-separated subset of write-word,compute,fix-bug,edit-file,write-lines")
    ge.add_argument("--prefix", default="fam", help="task id prefix (default fam)")
    ge.add_argument("--output", "-o", required=True, help="directory to write the task folders into")
    ge.add_argument("--force", action="store_true", help="write into a non-empty directory")
    ge.add_argument("--import", dest="do_import", action="store_true",
                    help="also register them in this home (train and eval splits)")
    ge.set_defaults(func=cmd_generate)
    ls = tsub.add_parser("list", parents=[common], help="registered tasks")
    ls.add_argument("--split", choices=["train", "eval"], help="only tasks of this split")
    ls.add_argument("--json", action="store_true", help="one JSON object per task")
    ls.set_defaults(func=cmd_list)
    sh = tsub.add_parser("show", parents=[common], help="one task: metadata and its rubric tree")
    sh.add_argument("task_id", help="the task id (`klong tasks list`)")
    sh.add_argument("--depth", type=int, default=1, help="print the rubric tree to this depth (default 1)")
    sh.add_argument("--json", action="store_true", help="the task's latest registration as JSON")
    sh.set_defaults(func=cmd_show)
    dr = tsub.add_parser("draft-rubric", parents=[common], help="ask a model for a rubric.json; written only if valid")
    dr.add_argument("dir", metavar="DIR", help="task folder with paper.md (and config.yaml, addendum.md)")
    dr.add_argument("--output", "-o", help="where to write (default DIR/rubric.json)")
    dr.add_argument("--force", action="store_true", help="replace an existing rubric.json")
    _model_flags(dr)
    dr.set_defaults(func=cmd_draft)
