"""The reference agent runner: a scripted policy server drives the real loop, tools run in the real
subprocess sandbox, events go through the real broker and sink, and SQL reads the archive."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import tarfile
import threading
import time

import pytest

from consumers.sink import Sink
from klong.cli import main
from producers.agent import AgentConfig, PolicyEndpoint, RolloutControl, run_agent
from producers.agent_policy import prune
from producers.agent_tools import ReadingTracker, execute, truncate_output
from producers.outbox import Outbox
from producers.sandbox import SandboxLimits, SubprocessSandbox, render_pod_manifest
from producers.tasks import import_tasks
from schemas.claimcheck import BlobStore
from schemas.errors import ConfigError, TerminalError
from store.catalog import Catalog
from tests.policy_stub import PolicyStub
from tests.test_tasks import klong, make_task

PAPER = "\n".join(f"Paper line {i}: the method trains a tiny model." for i in range(1, 71))  # 70 lines: 2 chunks
ADDENDUM = "Addendum: use CPU only.\nThe blacklisted repo must not be used.\n"
BLACKLIST = "https://github.com/example/official-code\n"


def bash(cmd: str, **kw) -> dict:
    return {"tool": "bash", "args": {"cmd": cmd}, **kw}


def end(**kw) -> dict:
    return {"tool": "end_task", "args": {"end_message": "done"}, **kw}


@pytest.fixture
def task_home(settings, tmp_path):
    import_tasks(settings, [make_task(tmp_path / "tasks", "tiny-paper", paper=PAPER, blacklist=BLACKLIST,
                                      addendum_md=ADDENDUM)], "train")
    return settings


def steps_of(settings, rollout_id: str) -> list[dict]:
    return Catalog(settings).arrow(f"SELECT * FROM steps WHERE rollout_id = '{rollout_id}' ORDER BY step_idx").to_pylist()


def tar_files(settings, ref: str) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(BlobStore(settings.blob_dir).get(ref))) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


# ---- sandbox and tools (no broker) -----------------------------------------------------------------


def test_sandbox_runs_commands_for_real_with_limits(tmp_path, monkeypatch):
    monkeypatch.setenv("KLONG_SECRET_TEST", "x")
    sb = SubprocessSandbox(tmp_path / "sb", SandboxLimits(file_size_mb=1, memory_mb=400, max_output_bytes=2048))
    sb.setup({"paper.md": "hello\n"})
    res = sb.run("echo made > out.txt && cat $PAPER_DIR/paper.md && pwd && env | grep -c KLONG_ || true", timeout_s=10)
    assert res.exit_code == 0 and "hello" in res.output and sb.submission_dir in res.output
    assert res.output.strip().endswith("0")  # no KLONG_* variable leaks into the sandbox
    assert (tmp_path / "sb" / "submission" / "out.txt").read_text() == "made\n"
    # file-size limit: writing 2 MB with a 1 MB RLIMIT_FSIZE fails
    res = sb.run("head -c 2000000 /dev/zero > big.bin; echo rc=$?", timeout_s=10)
    assert "rc=153" in res.output or "File size limit" in res.output
    assert (tmp_path / "sb" / "submission" / "big.bin").stat().st_size <= 1 << 20
    # memory limit: 800 MB in a 400 MB address space
    res = sb.run("python3 -c 'x = bytearray(800 * 2**20)'", timeout_s=20)
    assert res.exit_code != 0 and "MemoryError" in res.output
    # CPU time: a busy loop is killed by SIGXCPU after cpu_s of CPU, before the wall-time limit. 1 CPU-s takes
    # ~1 s quiet but ~10 s at load 20 on 2 cores: the wall limit is 120 s, so only a missing CPU limit fires it
    res = SubprocessSandbox(tmp_path / "sb", SandboxLimits(cpu_s=1)).run("python3 -c 'while True: pass'", timeout_s=120)
    assert res.exit_code in (-24, -9, 128 + 24, 128 + 9) and not res.timed_out
    # wall time: the whole process group dies, including a background child; the bound (1 s limit, ~1.2 s quiet,
    # a loaded machine's start-up margin) is far below the 317 s the sleep would take
    t0 = time.monotonic()
    res = sb.run("(sleep 317.7; echo late > late.txt) & sleep 317.7", timeout_s=1)
    assert res.timed_out and res.exit_code is None and time.monotonic() - t0 < 60
    assert sb.run("pgrep -f 'sleep 317[.]7' || echo none", timeout_s=60).output.strip() == "none"
    assert not (tmp_path / "sb" / "submission" / "late.txt").exists()
    # output comes back through a pipe, not a file: the file-size limit does not cut it, and nothing is
    # spooled on the host
    flood = sb.run("seq 1 300000", timeout_s=60)
    assert flood.exit_code == 0 and flood.n_bytes > 1 << 20 and flood.output.rstrip().endswith("300000")
    assert not [p for p in (tmp_path / "sb" / ".sandbox").rglob("*") if p.is_file()]
    # a huge output costs no memory: head and tail come back, with the full size
    res = SubprocessSandbox(tmp_path / "sb2", SandboxLimits(max_output_bytes=2048)).run("seq 1 300000", timeout_s=10) \
        if (tmp_path / "sb2" / "submission").mkdir(parents=True) is None else None
    assert res.n_bytes > 1_000_000 and res.output.startswith("1\n2\n") and res.output.rstrip().endswith("300000")
    assert len(res.output) < 4 * 2048 + 200


def test_timeout_message_names_the_limit_that_fired(tmp_path):
    """The model is told the limit that killed its call: the tool timeout (6 s) when the rollout had more
    time left (115 s), the rollout's time when that was the shorter."""
    sb = SubprocessSandbox(tmp_path / "sb", SandboxLimits(tool_timeout_s=1))
    sb.setup({})
    out = execute(sb, "bash", json.dumps({"cmd": "sleep 60"}), timeout_s=115)
    assert out.timed_out and "killed at the tool timeout of 1 s" in out.text and "115" not in out.text
    sb = SubprocessSandbox(tmp_path / "sb", SandboxLimits(tool_timeout_s=600))
    out = execute(sb, "bash", json.dumps({"cmd": "sleep 60"}), timeout_s=1)
    assert out.timed_out and "after 1 s, when the rollout's time ran out (the tool timeout is 600 s)" in out.text


def test_tools_follow_paperbench_formats(tmp_path):
    sb = SubprocessSandbox(tmp_path / "sb", SandboxLimits(max_output_bytes=1000))
    sb.setup({"paper.md": PAPER})
    paper = sb.paper_dir + "/paper.md"
    out = execute(sb, "read_file_chunk", json.dumps({"file": paper, "start_line": 51}), timeout_s=5)
    assert out.text.startswith("File has 70 total lines. Showing lines 51 to 70.\n\n51: Paper line 51")
    assert out.chunk == (paper, 51, 70)
    assert "beyond the total number of lines (70)" in execute(
        sb, "read_file_chunk", json.dumps({"file": paper, "start_line": 71}), timeout_s=5).text
    assert "max_lines cannot exceed 50" in execute(
        sb, "read_file_chunk", json.dumps({"file": paper, "max_lines": 51}), timeout_s=5).text
    assert "File 'nope.md' not found" in execute(sb, "read_file_chunk", '{"file": "nope.md"}', timeout_s=5).text
    s = execute(sb, "search_file", json.dumps({"file": paper, "query": "LINE 6", "max_matches": 3, "page": 2}),
                timeout_s=5).text
    assert s.startswith("Found 11 matches for 'line 6' in") and "Showing matches 4-6 (Page 2 of 4)" in s
    assert "[Match 4 of 11]" in s and ">>> 62: Paper line 62" in s and "    61: Paper line 61" in s
    assert execute(sb, "bash", "{not json", timeout_s=5).error
    assert "unknown tool 'browse'" in execute(sb, "browse", "{}", timeout_s=5).text
    py = execute(sb, "python", json.dumps({"code": "print(6 * 7)"}), timeout_s=10)
    assert py.text == "42"
    long = execute(sb, "bash", json.dumps({"cmd": "seq 1 5000"}), timeout_s=10).text
    assert long.startswith("The output of your call to bash was too long to be displayed.")
    assert "<START_TOOL_OUTPUT>\n1\n2\n" in long and long.endswith("5000\n<END_TOOL_OUTPUT>")
    assert truncate_output("bash", "short", 10) == "short"
    t = ReadingTracker({paper: 70})
    t.record((paper, 1, 50), str)
    assert not t.done and "Next: read_file_chunk(file='" + paper + "', start_line=51" in t.status()
    t.record((paper, 51, 70), str)
    assert t.done and "complete" in t.status()


def test_prune_keeps_the_prefix_and_tool_pairs():
    prefix = [{"role": "system", "content": "s"}, {"role": "user", "content": "task"},
              {"role": "assistant", "content": "read"}, {"role": "tool", "content": "paper"}]
    rest = []
    for i in range(10):
        rest += [{"role": "assistant", "content": f"a{i}"}, {"role": "tool", "content": f"o{i}"}]
    out = prune(prefix + rest, n_prefix=4)
    assert out[:4] == prefix and out[4]["role"] == "assistant" and out[-1] == rest[-1]
    assert len(out) < len(prefix + rest)
    assert prune(prefix, n_prefix=4) is None
    assert prune(prefix + rest[:1], n_prefix=4) == prefix  # last resort: only the prefix


def test_k8s_pod_manifest_renders_a_valid_pod(settings, capsys):
    from kubernetes.client import ApiClient, V1Pod

    m = render_pod_manifest("0192-ABC_def", SandboxLimits(memory_mb=2048), image="img:1", namespace="rl")
    pod = ApiClient()._ApiClient__deserialize(m, V1Pod)  # the client's own model: field names and types check
    c = pod.spec.containers[0]
    assert pod.metadata.name.startswith("klong-sandbox-0192-abc-def-") and pod.metadata.namespace == "rl"
    assert c.image == "img:1" and c.command == ["sleep", "infinity"] and c.resources.limits["memory"] == "2048Mi"
    assert {v.mount_path for v in c.volume_mounts} == {"/home/paper", "/home/submission", "/tmp"}
    assert pod.spec.restart_policy == "Never" and pod.spec.automount_service_account_token is False
    assert main(klong(settings, "rollout", "run", "--task", "x", "--sandbox", "k8s", "--dry-run",
                      "--rollout-id", "r-1", "--memory-mb", "1024")) == 0
    import yaml

    printed = list(yaml.safe_load_all(capsys.readouterr().out))[-1]  # ConfigMap, NetworkPolicy, Pod
    assert printed["kind"] == "Pod" and printed["spec"]["containers"][0]["resources"]["limits"]["memory"] == "1024Mi"


# ---- the loop through the broker -------------------------------------------------------------------


def test_full_rollout_recorded_through_broker_and_sink(task_home):
    s = task_home
    script = [
        bash("ls"),  # refused: the paper is not read yet
        {"read_paper": True},
        bash("mkdir -p src && echo 'print(1)' > src/train.py && echo 'python src/train.py' > reproduce.sh"),
        end(),  # premature: refused, the rollout goes on
        bash("seq 1 20000"),  # long output: truncated
        bash("curl -sS -m 2 https://github.com/example/official-code || echo blocked"),  # blacklisted: just recorded
        {"text": "Let me think about the next step."},  # no tool call: the continue nudge
        {"tool": "python", "args": {"code": "open('result.txt', 'w').write('acc=0.9')"}},
        # answered once the minimum time (10% of 200 s) is past, counted from the rollout's first call, so
        # the last end_task is accepted; the first one comes ~1 s in on a quiet machine, ~5 s at load 20
        {"tool": "search_file", "args": {"file": "../paper/paper.md", "query": "line 7"},
         "until": lambda: time.time() - stub.requests[0].t > 20.5},
        end(),
    ]
    cfg = AgentConfig(min_time_fraction=0.1, reminder_every_turns=3, snapshot_every_turns=5,
                      limits=SandboxLimits(max_output_bytes=2048))
    with PolicyStub(script) as stub, Outbox(s) as outbox:
        res = run_agent(outbox, s, "tiny-paper", PolicyEndpoint(stub.url, "stub-policy"), timeout_s=200,
                        group_id="g-1", config=cfg)
    assert res.status == "finished" and res.snapshot_ref and res.judge_request_id, res
    Sink(s).run(until_idle=True)
    cat = Catalog(s)
    steps = steps_of(s, res.rollout_id)
    assert [r["step_idx"] for r in steps] == list(range(res.n_steps))
    # pinned prefix: system, task, the refused bash, 2 paper chunks + 1 addendum chunk, each call and output
    n_pinned = sum(r["pinned"] for r in steps)
    assert all(r["pinned"] for r in steps[:n_pinned]) and not any(r["pinned"] for r in steps[n_pinned:])
    assert [r["role"] for r in steps[:2]] == ["system", "user"] and n_pinned == 2 + 2 * 4
    assert "bash refused" in steps[3]["content"] and "Mandatory paper reading" in steps[3]["content"]
    assert "Paper reading complete" in steps[n_pinned - 1]["content"]
    tool_out = [r["content"] for r in steps if r["role"] == "tool"]
    assert any(t.startswith("end_task refused: only") for t in tool_out)
    assert any(t.startswith("The output of your call to bash was too long") and len(t) < 2300 for t in tool_out)
    assert any("blocked" in t or "curl" in t or "resolve" in t for t in tool_out)
    assert tool_out[-1].startswith("end_task accepted")
    users = [r["content"] for r in steps if r["role"] == "user"]
    assert any(u.startswith("Please proceed to the next step") for u in users)
    assert any(u.startswith("Info: 0:0") and "time elapsed out of 0:03:20" in u for u in users)
    assert any(r["tool_name"] == "bash" and "official-code" in r["tool_arguments"] for r in steps)
    # token ids and logprobs on every assistant step, from the vLLM-style response
    tok = cat.arrow(f"SELECT role, token_ids, logprobs FROM step_tokens WHERE rollout_id = '{res.rollout_id}'").to_pylist()
    assistant = [t for t in tok if t["role"] == "assistant"]
    assert len(assistant) == sum(r["role"] == "assistant" for r in steps)
    assert all(t["token_ids"] and len(t["token_ids"]) == len(t["logprobs"]) for t in assistant)
    roll = cat.arrow(f"SELECT * FROM rollouts WHERE rollout_id = '{res.rollout_id}'").to_pylist()[0]
    assert roll["status"] == "finished" and roll["n_steps"] == res.n_steps and roll["task_id"] == "tiny-paper"
    snap = cat.arrow(f"SELECT * FROM snapshots WHERE rollout_id = '{res.rollout_id}' ORDER BY step_idx").to_pylist()
    assert len(snap) == 1 + res.n_turns // 5 and snap[-1]["ref"] == res.snapshot_ref  # every 5 turns + the end
    assert snap[-1]["step_idx"] == res.n_steps - 1 and snap[-1]["n_files"] == 3
    files = tar_files(s, res.snapshot_ref)
    assert files["result.txt"] == b"acc=0.9" and files["src/train.py"] == b"print(1)\n" and "reproduce.sh" in files
    jr = cat.arrow(f"SELECT * FROM judge_requests WHERE rollout_id = '{res.rollout_id}'").to_pylist()
    assert len(jr) == 1 and jr[0]["priority"] == "train" and jr[0]["snapshot_ref"] == res.snapshot_ref
    # what the policy saw: the tools, logprobs asked for, the paper in the sandbox, blacklist listed there
    first = stub.for_rollout(res.rollout_id)[0].body
    assert {t["function"]["name"] for t in first["tools"]} == {"bash", "python", "read_file_chunk", "search_file",
                                                               "end_task"}
    assert first["logprobs"] is True and first["return_token_ids"] is True


def test_inline_prompt_puts_the_task_text_in_the_user_message(task_home):
    """agent.prompt: inline: a short system message, paper.md and addendum.md in the pinned user message,
    the task done from the first turn (no reading rule); PaperBench's pointer to the paper is not sent."""
    s = task_home
    cfg = AgentConfig(prompt="inline", min_time_fraction=0.0)  # mandatory_reading (default) has nothing to do
    with PolicyStub([bash("echo hello > hello.txt"), end()]) as stub, Outbox(s) as outbox:
        res = run_agent(outbox, s, "tiny-paper", PolicyEndpoint(stub.url, "stub-policy"), timeout_s=30,
                        group_id="g-1", config=cfg, judge=False)
    assert res.status == "finished", res
    Sink(s).run(until_idle=True)
    steps = steps_of(s, res.rollout_id)
    assert steps[0]["content"].startswith("You are an agent that completes tasks with tool calls.")
    task = steps[1]["content"]
    assert task.startswith(PAPER.strip()) and ADDENDUM.strip() in task and "working directory" in task
    assert "reproducing a research paper" not in task and steps[0]["pinned"] and steps[1]["pinned"]
    assert [r["tool_name"] for r in steps if r["role"] == "assistant"] == ["bash", "end_task"]
    with pytest.raises(ConfigError, match="prompt must be paperbench or inline"):
        AgentConfig(prompt="short")


def test_timeout_truncates_and_context_errors_prune(task_home):
    s = task_home
    slow = [{"read_paper": True}, bash("echo start > s.txt"), bash("sleep 60")]
    chatty = [{"read_paper": True}] + [bash(f"seq 1 3000 # {i}") for i in range(6)] + [end()]
    stuck = [{"read_paper": True}, {"text": "thinking for a long time", "delay": 60}]
    cfg = AgentConfig(min_time_fraction=0.0, reminder_every_turns=0, limits=SandboxLimits(max_output_bytes=4000))
    # the prefix is ~9 kB of text; every seq output adds ~4 kB: the 3rd one overflows 18 kB
    with PolicyStub({"slow": slow, "chatty": chatty, "stuck": stuck}, max_context_chars=18_000) as stub, Outbox(s) as outbox:
        # 15 s: the rollouts reach their sleep / slow answer in ~0.5 s on a quiet machine, ~3 s at load 20
        r1 = run_agent(outbox, s, "tiny-paper", PolicyEndpoint(stub.url, "p"), timeout_s=15, group_id="g",
                       rollout_id="slow", config=cfg)
        r2 = run_agent(outbox, s, "tiny-paper", PolicyEndpoint(stub.url, "p"), timeout_s=120, group_id="g",
                       rollout_id="chatty", config=cfg)
        r3 = run_agent(outbox, s, "tiny-paper", PolicyEndpoint(stub.url, "p"), timeout_s=15, group_id="g",
                       rollout_id="stuck", config=cfg)  # the policy itself answers too late
    # bounds far below what ignoring the timeout would take (the 60 s sleep, the 60 s policy delay), with
    # 30 s for the kill and the snapshot (~0.5 s quiet) on a loaded 2-core machine
    assert r1.status == "timeout" and r1.snapshot_ref and 15 <= r1.elapsed_s < 45
    assert r2.status == "finished" and r2.n_prunes >= 1, r2
    assert r3.status == "timeout" and 15 <= r3.elapsed_s < 45 and len(stub.for_rollout("stuck")) == 4
    reqs = stub.for_rollout("chatty")
    failed = [i for i, r in enumerate(reqs) if r.status == 400]
    assert failed and reqs[failed[0] + 1].status == 200
    before, after = reqs[failed[0]].messages, reqs[failed[0] + 1].messages
    n_prefix = 2 + 2 * 3  # system, task, 3 reading calls with their outputs
    assert after[:n_prefix] == before[:n_prefix] and len(after) < len(before)
    assert after[n_prefix]["role"] in ("assistant", "user")
    Sink(s).run(until_idle=True)
    cat = Catalog(s)
    rows = {r["rollout_id"]: r for r in cat.arrow("SELECT * FROM rollouts").to_pylist()}
    assert rows["slow"]["status"] == "timeout" and rows["slow"]["n_steps"] == r1.n_steps
    slow_steps = steps_of(s, "slow")
    assert slow_steps[-1]["role"] == "tool" and "Timeout: the bash call was killed" in slow_steps[-1]["content"]
    assert "s.txt" in tar_files(s, r1.snapshot_ref)
    chatty_steps = steps_of(s, "chatty")  # the record keeps every step; only the model's context was pruned
    assert [r["step_idx"] for r in chatty_steps] == list(range(r2.n_steps))
    assert sum(r["role"] == "tool" and "seq 1 3000" not in r["content"] and "too long" in r["content"]
               for r in chatty_steps) == 6


def test_carry_over_and_stop_from_a_scheduler_thread(task_home):
    s = task_home
    work = [{"read_paper": True}] + [bash(f"echo {i} >> log.txt", delay=0.15) for i in range(40)]
    cfg = AgentConfig(min_time_fraction=0.0, reminder_every_turns=0)
    controls = {"carried": RolloutControl(iteration=0, policy_version=3), "stopped": RolloutControl()}
    results: dict = {}
    with PolicyStub(work) as stub, Outbox(s) as outbox:  # one outbox shared by both rollout threads
        def go(rid, pv):
            # 120 s: both are stopped long before; a loaded machine must not time them out first
            results[rid] = run_agent(outbox, s, "tiny-paper", PolicyEndpoint(stub.url, "p"), timeout_s=120,
                                     group_id="g", rollout_id=rid, policy_version=pv, control=controls[rid],
                                     config=cfg, judge=False)

        threads = [threading.Thread(target=go, args=(rid, pv)) for rid, pv in (("carried", 3), ("stopped", 0))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 90
        while len(stub.for_rollout("carried")) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        controls["carried"].carry_over(1, 4)
        n_before = len(stub.for_rollout("carried"))
        while len(stub.for_rollout("carried")) < n_before + 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        controls["carried"].stop()
        controls["stopped"].stop()
        for t in threads:
            t.join(60)
    assert results["carried"].status == "aborted" and results["stopped"].status == "aborted"
    assert results["stopped"].snapshot_ref is None and results["stopped"].judge_request_id is None
    assert controls["carried"].done.is_set() and controls["carried"].rollout_id == "carried"
    Sink(s).run(until_idle=True)
    cat = Catalog(s)
    resumes = cat.arrow("SELECT * FROM rollout_resumes WHERE rollout_id = 'carried'").to_pylist()
    assert len(resumes) == 1 and resumes[0]["iteration"] == 1 and resumes[0]["policy_version"] == 4
    steps = steps_of(s, "carried")
    assert [r["step_idx"] for r in steps] == list(range(len(steps)))
    versions = [r["policy_version"] for r in steps]
    k = versions.index(4)
    assert set(versions[:k]) == {3} and set(versions[k:]) == {4} and resumes[0]["next_step_idx"] == k
    rows = {r["rollout_id"]: r for r in cat.arrow("SELECT * FROM rollouts").to_pylist()}
    assert rows["carried"]["status"] == rows["stopped"]["status"] == "aborted"
    assert (rows["carried"]["iteration"], rows["carried"]["last_iteration"], rows["carried"]["n_resumes"],
            rows["carried"]["last_policy_version"]) == (0, 1, 1, 4)


def test_carry_over_taken_by_a_rollout_that_ends_inside_a_tool_call(task_home):
    """Carried over during its last (hanging) tool call, the rollout times out without another policy call:
    it still ends in the new iteration, so the scheduler counts it there and no dataset misses it."""
    s = task_home
    script = [{"read_paper": True}, bash("sleep 60")]
    control = RolloutControl(iteration=2, policy_version=5)
    cfg = AgentConfig(min_time_fraction=0.0, reminder_every_turns=0)
    with PolicyStub(script) as stub, Outbox(s) as outbox:
        t = threading.Thread(target=lambda: run_agent(outbox, s, "tiny-paper", PolicyEndpoint(stub.url, "p"),
                                                      timeout_s=20, group_id="g", rollout_id="late", iteration=2,
                                                      policy_version=5, control=control, judge=False, config=cfg))
        t.start()
        # the sleep is handed out ~0.5 s in on a quiet machine, ~4 s at load 20; the rollout has 20 s
        deadline = time.monotonic() + 20
        while stub.cursor.get("late", 0) < len(script) and time.monotonic() < deadline:  # the sleep was handed out
            time.sleep(0.05)
        n_calls = len(stub.for_rollout("late"))
        control.carry_over(3, 6)  # the sleep is running: the loop makes no further policy call
        t.join(60)
    assert len(stub.for_rollout("late")) == n_calls
    Sink(s).run(until_idle=True)
    row = Catalog(s).arrow("SELECT * FROM rollouts WHERE rollout_id = 'late'").to_pylist()[0]
    assert (row["status"], row["iteration"], row["last_iteration"], row["n_resumes"]) == ("timeout", 2, 3, 1)


def test_unknown_task_is_refused_before_anything_is_recorded(settings):
    with Outbox(settings) as outbox, pytest.raises(TerminalError, match="task 'nope' is not registered"):
        run_agent(outbox, settings, "nope", PolicyEndpoint("http://127.0.0.1:9/v1", "m"), timeout_s=5, group_id="g")
    assert not (settings.home / "rollouts").exists()


def test_cli_rollout_run_end_to_end(settings, tmp_path, capsys, monkeypatch):
    for var in ("KLONG_POLICY_BASE_URL", "KLONG_POLICY_MODEL", "KLONG_ROLLOUT_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    assert main(klong(settings, "rollout", "run", "--task", "t", "--model", "m", "--timeout", "5")) == 2
    assert "--base-url and --model are required" in capsys.readouterr().err
    assert main(klong(settings, "rollout", "run", "--task", "t", "--base-url", "http://x/v1", "--model", "m")) == 2
    assert "--timeout must be a positive number" in capsys.readouterr().err
    assert main(klong(settings, "rollout", "run", "--task", "t", "--timeout", "5", "--min-time-fraction", "2")) == 2
    assert "min_time_fraction must be in [0, 1]" in capsys.readouterr().err
    task_dir = make_task(tmp_path / "tasks", "cli-paper", paper=PAPER[:500], blacklist=BLACKLIST)
    assert main(klong(settings, "tasks", "import", str(task_dir), "--split", "eval")) == 0
    script = [{"read_paper": True}, bash("echo '# reproduction' > README.md"), end()]
    with PolicyStub(script, token_ids=False) as stub:
        cmd = [sys.executable, "-m", "klong.cli", *klong(settings, "rollout", "run", "--task", "cli-paper",
                                                         "--base-url", stub.url, "--model", "stub", "--timeout", "120",
                                                         "--min-time-fraction", "0", "--no-token-ids")]
        # generous: a CLI start on a loaded 2-core machine takes seconds; the rollout itself ~1 s
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        bad = subprocess.run(cmd[:cmd.index("cli-paper")] + ["missing"] + cmd[cmd.index("cli-paper") + 1:],
                             capture_output=True, text=True, timeout=300)
    # SIGTERM (or Ctrl-C) ends the rollout 'aborted' at the next turn boundary, recorded
    busy = {"cli-stop": [{"read_paper": True}] + [bash("echo x", delay=0.1)] * 300}
    with PolicyStub(busy) as stub2:
        cmd2 = [sys.executable, "-m", "klong.cli", *klong(settings, "rollout", "run", "--task", "cli-paper",
                                                          "--rollout-id", "cli-stop", "--base-url", stub2.url,
                                                          "--model", "stub", "--timeout", "600", "-q")]
        proc = subprocess.Popen(cmd2, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while len(stub2.for_rollout("cli-stop")) < 5 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "cli-stop: aborted," in out, err
    assert p.returncode == 0, p.stderr
    assert ": finished," in p.stdout and "judge request" in p.stdout and "turn 1" in p.stderr
    assert bad.returncode == 2 and "task 'missing' is not registered" in bad.stderr
    assert "return_token_ids" not in stub.requests[0].body  # --no-token-ids: a plain OpenAI request
    assert main(klong(settings, "sink", "run", "--until-idle", "-q")) == 0
    cat = Catalog(settings)
    assert cat.scalar("SELECT count(*) FROM judge_requests WHERE priority = 'eval'") == 1  # eval task: eval queue
    assert cat.scalar("SELECT count(*) FROM step_tokens WHERE token_ids IS NOT NULL AND rollout_id <> 'cli-stop'") == 0
    assert cat.scalar("SELECT status FROM rollouts WHERE rollout_id = 'cli-stop'") == "aborted"
    assert cat.scalar("SELECT status FROM rollouts WHERE rollout_id <> 'cli-stop'") == "finished"
    capsys.readouterr()
    assert main(klong(settings, "sql", "SELECT status, n_steps, n_turns FROM rollouts WHERE rollout_id <> 'cli-stop'",
                      "--format", "csv")) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("finished,")
