"""The paper's plots from SQL: PNG figures of a run (`klong report`, and the plots page of `klong ui`).

    klong report [--plan NAME] [-o DIR]
    >>> series("stages", Catalog(settings), plan="two-stage")   # the numbers a figure plots, as columns
    >>> write_report(Catalog(settings), "report/", plan="two-stage")  # -> [Path("report/stages.png"), ...]

Figures (each one SQL query over the catalog's views, then matplotlib; every number plotted is in the
columns `series` returns):
- `stages` (KLong Fig. 6, 9): per stage and iteration, mean assistant turns, running hours and judge score
  of the rollouts that ended in it (`rollouts.last_iteration`: a carried-over rollout counts where it ended).
- `rl_curves` (Fig. 7): per iteration, mean score, mean assistant turns, and the policy's entropy estimated
  from the behaviour logprobs (mean -log p of the sampled action tokens; `step_tokens`; the NaN of ids the
  chat template put in an assistant step are not sampled and left out), beside the
  trainer's `entropy` metric of runs trained on that iteration's dataset when there is one.
- `training` (Fig. 8): training loss per step of every run, and a panel per further metric the runs
  recorded among TRAIN_METRICS (metrics are read by name; absent ones are skipped).
- `evals`: per policy version, the training reward beside the held-out evaluation under it (mean score with
  a 95 % interval, solve rate), from `rl_iterations` and `rl_evals` (a plan's `eval:`).
- `windows`: window length (tokens, prefix included) per window and K (windows) per rollout, over the
  latest version of each dataset (with a plan: its iterations' versions).
With `plan`, only that progressive-RL plan's rollouts, datasets and training runs count.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Optional

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit
from matplotlib.figure import Figure  # noqa: E402  (after choosing the backend)

from schemas.errors import ConfigError  # noqa: E402
from store.catalog import Catalog, sql_str  # noqa: E402

TRAIN_METRICS = ("entropy", "kl", "clip_frac", "ratio", "mismatch")  # drawn when present (prefix match)


def _scope(plan: Optional[str]) -> str:
    """Rollouts a figure counts: ended ones, of the plan's runs when one is given."""
    cond = f" AND rollout_id IN (SELECT rollout_id FROM rl_rollouts WHERE plan = {sql_str(plan)})" if plan else ""
    return f"SELECT * FROM rollouts WHERE status <> 'running'{cond}"


def _datasets(plan: Optional[str]) -> str:
    """dataset@version refs a figure counts: the plan's iterations', else the latest version of each dataset."""
    if plan:
        return f"SELECT dataset AS ref FROM rl_iterations WHERE plan = {sql_str(plan)} AND dataset IS NOT NULL"
    return "SELECT dataset || '@' || max(version) AS ref FROM datasets GROUP BY dataset"


def _columns(cat: Catalog, query: str) -> dict[str, list]:
    return cat.arrow(query).to_pydict()


def stages_series(cat: Catalog, plan: Optional[str]) -> dict[str, list]:
    return _columns(cat, f"""
        SELECT stage, last_iteration AS iteration, count(*) AS rollouts, avg(n_turns) AS turns,
               avg(elapsed_s) / 3600 AS hours, avg(final_score) AS score
        FROM ({_scope(plan)}) GROUP BY ALL ORDER BY stage, iteration""")


def rl_series(cat: Catalog, plan: Optional[str]) -> dict[str, list]:
    plan_cond = f"AND i.plan = {sql_str(plan)}" if plan else ""
    return _columns(cat, f"""
        WITH r AS ({_scope(plan)}),
        per AS (SELECT last_iteration AS iteration, avg(final_score) AS score, avg(n_turns) AS turns
                FROM r GROUP BY ALL),
        lp AS (SELECT r.last_iteration AS iteration, -sum(list_sum(t.lp)) / sum(len(t.lp)) AS entropy
               FROM (SELECT rollout_id, list_filter(logprobs, lambda x: NOT isnan(x)) AS lp FROM step_tokens
                     WHERE role = 'assistant') t JOIN r USING (rollout_id)
               WHERE len(t.lp) > 0 GROUP BY ALL),  -- a mean over sampled tokens (NaN: template ids), no unnest
        tr AS (SELECT i.iteration, avg(m.value) AS train_entropy
               FROM training_metrics m JOIN training_runs t USING (run_id) JOIN rl_iterations i ON i.dataset = t.dataset
               WHERE m.metric = 'entropy' {plan_cond} GROUP BY ALL)
        SELECT iteration, score, turns, entropy, train_entropy
        FROM per LEFT JOIN lp USING (iteration) LEFT JOIN tr USING (iteration) ORDER BY iteration""")


def training_series(cat: Catalog, plan: Optional[str]) -> dict[str, list]:
    names = " OR ".join(f"metric LIKE '{m}%'" for m in TRAIN_METRICS)
    runs = f"AND run_id IN (SELECT run_id FROM training_runs WHERE dataset IN ({_datasets(plan)}))" if plan else ""
    return _columns(cat, f"""
        SELECT run_id, metric, step, value FROM training_metrics
        WHERE (metric = 'loss' OR {names}) AND value IS NOT NULL AND isfinite(value) {runs}
        ORDER BY run_id, metric, step""")


def windows_series(cat: Catalog, plan: Optional[str]) -> dict[str, list]:
    return _columns(cat, f"""
        SELECT dataset || '@' || version AS ref, rollout_id, count(*) AS k, list(n_tokens ORDER BY window_idx) AS lengths
        FROM samples WHERE dataset || '@' || version IN ({_datasets(plan)}) GROUP BY ALL ORDER BY ref, rollout_id""")


def _no_data(fig: Figure, title: str) -> None:
    ax = fig.add_subplot(1, 1, 1)
    ax.text(0.5, 0.5, "no data for this figure yet", ha="center", va="center")
    ax.set_axis_off()
    fig.suptitle(title)


def _draw_stages(fig: Figure, s: dict) -> None:
    title = "Per stage and iteration (KLong Fig. 6, 9)"
    if not s["stage"]:
        return _no_data(fig, title)
    labels = [f"s{a}·i{b}" for a, b in zip(s["stage"], s["iteration"])]
    for k, (key, name) in enumerate((("turns", "assistant turns"), ("hours", "running hours"), ("score", "score"))):
        ax = fig.add_subplot(1, 3, k + 1)
        ax.bar(labels, [v if v is not None else 0 for v in s[key]], color=f"C{k}")
        ax.set_title(name)
        ax.set_xlabel("stage · iteration")
    fig.suptitle(title)


def _draw_rl(fig: Figure, s: dict) -> None:
    title = "RL curves per iteration (KLong Fig. 7)"
    if not s["iteration"]:
        return _no_data(fig, title)
    x = s["iteration"]
    for k, (key, name) in enumerate((("score", "score"), ("turns", "assistant turns"),
                                     ("entropy", "entropy (-mean log p, behaviour)"))):
        ax = fig.add_subplot(1, 3, k + 1)
        ax.plot(x, s[key], marker="o", color=f"C{k}", label=name)
        if key == "entropy" and any(v is not None for v in s["train_entropy"]):
            ax.plot(x, s["train_entropy"], marker="s", color="C3", label="trainer entropy")
            ax.legend()
        ax.set_title(name)
        ax.set_xlabel("iteration")
    fig.suptitle(title)


def _draw_training(fig: Figure, s: dict) -> None:
    title = "Training (KLong Fig. 8)"
    metrics = sorted(set(s["metric"]), key=lambda m: (m != "loss", m))
    if not metrics:
        return _no_data(fig, title)
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), k + 1)
        for run in sorted(set(s["run_id"])):
            pts = [(st, v) for r, m, st, v in zip(s["run_id"], s["metric"], s["step"], s["value"]) if r == run and m == metric]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=run[-24:])
        ax.set_title(metric)
        ax.set_xlabel("step")
    fig.axes[0].legend(fontsize="x-small")
    fig.suptitle(title)


def _draw_windows(fig: Figure, s: dict) -> None:
    title = "Sub-trajectories: window length and K per rollout"
    if not s["k"]:
        return _no_data(fig, title)
    ax = fig.add_subplot(1, 2, 1)
    ax.hist([n for lengths in s["lengths"] for n in lengths], bins=30, color="C0")
    ax.set_title("window length (tokens, prefix included)")
    ax = fig.add_subplot(1, 2, 2)
    ks = s["k"]
    ax.hist(ks, bins=range(1, max(ks) + 2), color="C1", align="left")
    ax.set_title("K (windows per rollout)")
    fig.suptitle(f"{title} ({', '.join(sorted(set(s['ref'])))})")


# ---- held-out evaluation beside the training reward (a plan's `eval:`; store.rl's rl_evals) --------------


def evals_series(cat: Catalog, plan: Optional[str]) -> dict[str, list]:
    """Per policy version: the training reward (mean score of the rollouts it acted in the plan's iterations) and
    the held-out evaluation under it (mean score with a 95 % normal interval half-width, solve rate)."""
    cond = f"WHERE plan = {sql_str(plan)}" if plan else ""
    return _columns(cat, f"""
        WITH tr AS (SELECT policy_version, avg(mean_score) AS train_score FROM rl_iterations {cond} GROUP BY ALL),
             ev AS (SELECT policy_version, sum(mean_score * judged) / nullif(sum(judged), 0) AS eval_score,
                           sum(solved) / nullif(sum(judged), 0) AS eval_solve_rate, sum(judged) AS eval_n,
                           max(score_std) AS eval_std
                    FROM rl_evals {cond} GROUP BY ALL)
        SELECT policy_version, train_score, eval_score, eval_solve_rate, eval_n,
               1.96 * eval_std / sqrt(nullif(eval_n, 0)) AS eval_ci
        FROM tr FULL JOIN ev USING (policy_version) ORDER BY policy_version""")


def _draw_evals(fig: Figure, s: dict) -> None:
    title = "Training reward and held-out evaluation per policy version"
    if not any(v is not None for v in s["eval_score"]):
        return _no_data(fig, title)
    ax = fig.add_subplot(1, 1, 1)
    x = s["policy_version"]
    ax.plot(x, s["train_score"], marker="o", color="C0", label="training reward (mean score)")
    ax.errorbar(x, s["eval_score"], yerr=[v or 0 for v in s["eval_ci"]], marker="s", color="C1", capsize=4,
                label="held-out mean score (95 % interval)")
    ax.plot(x, s["eval_solve_rate"], marker="^", linestyle="--", color="C2", label="held-out solve rate")
    ax.set_xlabel("policy version")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    fig.suptitle(title)


FIGURES: dict[str, tuple[Callable[[Catalog, Optional[str]], dict], Callable[[Figure, dict], None]]] = {
    "stages": (stages_series, _draw_stages),
    "rl_curves": (rl_series, _draw_rl),
    "training": (training_series, _draw_training),
    "windows": (windows_series, _draw_windows),
    "evals": (evals_series, _draw_evals),
}


def check_plan(cat: Catalog, plan: Optional[str]) -> None:
    """Raises ConfigError naming the known plans when `plan` is not in the archive."""
    if plan is None:
        return
    plans = [r["plan"] for r in cat.arrow("SELECT DISTINCT plan FROM rl_iterations ORDER BY 1").to_pylist()]
    if plan not in plans:
        raise ConfigError(f"no plan {plan!r} in the archive (plans: {', '.join(plans) or 'none'})")


def series(name: str, cat: Catalog, plan: Optional[str] = None) -> dict[str, list]:
    """The columns figure `name` plots (see the module docstring)."""
    if name not in FIGURES:
        raise ConfigError(f"unknown figure {name!r}: choose one of {', '.join(FIGURES)}")
    return FIGURES[name][0](cat, plan)


def render(name: str, cat: Catalog, plan: Optional[str] = None) -> bytes:
    """Figure `name` as PNG bytes."""
    data = series(name, cat, plan)
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    FIGURES[name][1](fig, data)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def write_report(cat: Catalog, out_dir: Path | str, plan: Optional[str] = None) -> list[Path]:
    """Every figure as `OUT_DIR/<name>.png`; returns the paths."""
    check_plan(cat, plan)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in FIGURES:
        path = out / f"{name}.png"
        tmp = path.with_suffix(".png.tmp")
        tmp.write_bytes(render(name, cat, plan))
        tmp.replace(path)
        paths.append(path)
    return paths
