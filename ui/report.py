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
  latest version of each dataset (with a plan: its iterations' versions), one histogram series per dataset.
Each figure is a list of panels (`panels`, `figure_data`): matplotlib draws them here, `klong ui`'s /plots
draws the same panels in the browser. Every axis is labelled; a curve with one point says "one iteration so
far" with its value instead of a lone dot.
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


# ---- figures as panels: one description drawn by matplotlib (PNG) and by the viewer's script (SVG) ----------
# A figure is a list of panels: {"title", "xlabel", "ylabel", "kind": "line" | "bar" | "hist", "series": [{"name",
# "x", "y"}]} ("hist": x = bin edges, y = counts per bin; one series per dataset). Every panel says what its axes
# are; a line panel whose series have one point says "one iteration so far" instead of drawing a dot.


def _panel(title: str, xlabel: str, ylabel: str, kind: str, series: list[dict]) -> dict:
    return {"title": title, "xlabel": xlabel, "ylabel": ylabel, "kind": kind,
            "series": [x for x in series if any(v is not None for v in x["y"])]}


def _stages_panels(s: dict) -> list[dict]:
    labels = [f"s{a}·i{b}" for a, b in zip(s["stage"], s["iteration"])]
    return [_panel(name, "stage · iteration ended in", unit, "bar", [{"name": "rollouts", "x": labels, "y": s[key]}])
            for key, name, unit in (("turns", "assistant turns", "mean turns per rollout"),
                                    ("hours", "running hours", "mean hours per rollout"),
                                    ("score", "judge score", "mean score (0-1)"))] if labels else []


def _rl_panels(s: dict) -> list[dict]:
    if not s["iteration"]:
        return []
    x = s["iteration"]
    extra = [k for k in s if k not in ("iteration", "score", "turns", "entropy", "train_entropy")]
    return [_panel("score", "iteration", "mean judge score (0-1)", "line",
                   [{"name": "train rollouts", "x": x, "y": s["score"]}]
                   + [{"name": k, "x": x, "y": s[k]} for k in extra if "score" in k]),  # e.g. eval scores
            _panel("assistant turns", "iteration", "mean turns per rollout", "line",
                   [{"name": "train rollouts", "x": x, "y": s["turns"]}]),
            _panel("entropy", "iteration", "-mean log p (nats/token)", "line",
                   [{"name": "behaviour", "x": x, "y": s["entropy"]},
                    {"name": "trainer", "x": x, "y": s["train_entropy"]}])]


def _training_panels(s: dict) -> list[dict]:
    metrics = sorted(set(s["metric"]), key=lambda m: (m != "loss", m))
    panels = []
    for metric in metrics:
        series = []
        for run in sorted(set(s["run_id"])):
            pts = [(st, v) for r, m, st, v in zip(s["run_id"], s["metric"], s["step"], s["value"]) if r == run and m == metric]
            if pts:
                series.append({"name": run, "x": [p[0] for p in pts], "y": [p[1] for p in pts]})
        panels.append(_panel(metric, "training step", metric, "line", series))
    return panels


def _histogram(values: dict[str, list], bins: list) -> list[dict]:
    import numpy as np

    return [{"name": name, "x": [float(b) for b in bins], "y": np.histogram(v, bins=bins)[0].tolist()}
            for name, v in values.items()]


def _windows_panels(s: dict) -> list[dict]:
    import numpy as np

    if not s["k"]:
        return []
    refs = sorted(set(s["ref"]))
    lengths = {r: [n for ref, ls in zip(s["ref"], s["lengths"]) if ref == r for n in ls] for r in refs}
    ks = {r: [k for ref, k in zip(s["ref"], s["k"]) if ref == r] for r in refs}
    every = [n for v in lengths.values() for n in v]
    edges = np.histogram_bin_edges(every, bins=min(30, max(1, len(set(every))))).tolist()
    k_edges = [k - 0.5 for k in range(1, max(s["k"]) + 2)]
    return [_panel("window length", "tokens per window (prefix included)", "windows", "hist", _histogram(lengths, edges)),
            _panel("windows per rollout", "K (windows of one rollout)", "rollouts", "hist", _histogram(ks, k_edges))]


PANELS_PER_ROW = 4  # a figure with more panels (training's metrics) wraps into rows of this many


def _grid(n_panels: int) -> tuple[int, int]:
    """(rows, columns) of a figure with `n_panels` panels (at least one cell)."""
    cols = max(1, min(n_panels, PANELS_PER_ROW))
    return -(-max(1, n_panels) // cols), cols


def _draw(fig: Figure, title: str, panels: list[dict]) -> None:
    if not panels:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no data for this figure yet", ha="center", va="center")
        ax.set_axis_off()
        fig.suptitle(title)
        return
    rows, cols = _grid(len(panels))
    for k, p in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.set_title(p["title"])
        ax.set_xlabel(p["xlabel"])
        ax.set_ylabel(p["ylabel"])
        if p["kind"] == "line" and all(len(x["x"]) <= 1 for x in p["series"]):
            text = "; ".join(f"{x['name']}: {x['y'][0]:.4g}" for x in p["series"] if x["y"] and x["y"][0] is not None)
            ax.text(0.5, 0.5, f"one iteration so far\n{text}" if text else "no data yet", ha="center", va="center",
                    transform=ax.transAxes, wrap=True)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        for j, x in enumerate(p["series"]):
            if p["kind"] == "bar":
                ax.bar(x["x"], [v if v is not None else 0 for v in x["y"]], color=f"C{j}", label=x["name"])
            elif p["kind"] == "hist":
                ax.stairs(x["y"], x["x"], color=f"C{j}", label=x["name"])
            else:
                ax.plot(x["x"], [float("nan") if v is None else v for v in x["y"]], marker="o", color=f"C{j}",
                        label=x["name"])
        if len(p["series"]) > 1 or p["kind"] == "hist":  # a histogram names its dataset even alone
            ax.legend(fontsize="x-small")
    fig.suptitle(title)


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


def _evals_panels(s: dict) -> list[dict]:
    if not any(v is not None for v in s["eval_score"]):
        return []
    x = s["policy_version"]
    lo = [None if v is None else max(0.0, v - (c or 0)) for v, c in zip(s["eval_score"], s["eval_ci"])]
    hi = [None if v is None else min(1.0, v + (c or 0)) for v, c in zip(s["eval_score"], s["eval_ci"])]
    return [_panel("training reward and held-out evaluation", "policy version", "score (0-1)", "line",
                   [{"name": "training reward (mean score)", "x": x, "y": s["train_score"]},
                    {"name": "held-out mean score", "x": x, "y": s["eval_score"]},
                    {"name": "held-out 95 % interval, low", "x": x, "y": lo},
                    {"name": "held-out 95 % interval, high", "x": x, "y": hi},
                    {"name": "held-out solve rate", "x": x, "y": s["eval_solve_rate"]}])]


FIGURES: dict[str, tuple[str, Callable[[Catalog, Optional[str]], dict], Callable[[dict], list[dict]]]] = {
    "stages": ("Per stage and iteration (KLong Fig. 6, 9)", stages_series, _stages_panels),
    "rl_curves": ("RL curves per iteration (KLong Fig. 7)", rl_series, _rl_panels),
    "training": ("Training (KLong Fig. 8)", training_series, _training_panels),
    "windows": ("Sub-trajectories: window length and K per rollout, per dataset", windows_series, _windows_panels),
    "evals": ("Training reward and held-out evaluation per policy version", evals_series, _evals_panels),
}


def panels(name: str, cat: Catalog, plan: Optional[str] = None) -> dict:
    """Figure `name` as {"name", "title", "panels": [...]} (see above)."""
    title, _, to_panels = FIGURES[name]
    return {"name": name, "title": title, "panels": to_panels(series(name, cat, plan))}


def figure_data(cat: Catalog, plan: Optional[str] = None) -> dict:
    """Every figure's panels (what `klong ui`'s /plots draws in the browser)."""
    return {"plan": plan, "figures": [panels(name, cat, plan) for name in FIGURES]}


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
    return FIGURES[name][1](cat, plan)


def render(name: str, cat: Catalog, plan: Optional[str] = None) -> bytes:
    """Figure `name` as PNG bytes."""
    if name not in FIGURES:
        raise ConfigError(f"unknown figure {name!r}: choose one of {', '.join(FIGURES)}")
    spec = panels(name, cat, plan)
    fig = Figure(figsize=(12, 3.8 * _grid(len(spec["panels"]))[0]), layout="constrained")
    _draw(fig, spec["title"], spec["panels"])
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
