"""RL orchestration: a progressive-RL plan run end to end (`klong rl run PLAN`).

It drives rollouts (producers), waits for the judge and the archive (consumers, store), builds each
iteration's dataset and trains on it (trainer), so it sits above all of them.

    plan.py        the plan YAML: stages, tasks, dataset config, serve/train sections
    scheduler.py   the run: stages -> iterations -> groups of rollouts, stop/resume, events
    start.py       where a run starts: remaining schedule, base iteration, task lists
    iteration.py   one iteration's bookkeeping: waiting for the archive, rollout results
    evals.py       held-out evaluation rollouts per iteration
    loop.py        the managed policy server and training step of each iteration
    services.py    the in-process sink and judge a run starts when none are running
    train_hook.py  a plan's own training command instead of `klong train`
"""
