"""The default local sandbox contains a tool call: real bubblewrap namespaces, probes run as the
agent would run them (shell commands through the same tools the agent loop uses)."""

from __future__ import annotations

import errno
import os
import platform
import socket
import subprocess
import sys
import time

import pytest

from klong.cli import main
from producers import sandbox_local
from producers.agent import AgentConfig
from producers.agent_tools import execute
from producers.sandbox import SandboxLimits, make_sandbox
from producers.sandbox_k8s import render_manifests
from schemas.errors import ConfigError, ValidationError

SECRET = "s3cret-sandbox-probe-7f1c"
# On a machine that cannot create the namespaces the sandbox refuses to start (tested below); the
# containment probes then have nothing to probe.
isolated = pytest.mark.skipif(sandbox_local.isolation_problem() is not None,
                              reason=f"no isolation here: {sandbox_local.isolation_problem()}")


@pytest.fixture
def sandboxes(tmp_path):
    """Opens rollouts' sandboxes the way the agent runner does (the default kind) and closes them."""
    opened = []

    def make(rollout_id: str = "r-1", **limits):
        sb = make_sandbox(AgentConfig().sandbox, tmp_path / "home" / "rollouts", SandboxLimits(**limits),
                          rollout_id=rollout_id)
        sb.setup({"paper.md": "line 1\nline 2\n"})
        opened.append(sb)
        return sb

    yield make
    for sb in opened:
        sb.close()


def bash(sb, cmd: str, timeout_s: float = 60) -> str:
    return execute(sb, "bash", __import__("json").dumps({"cmd": cmd}), timeout_s=timeout_s).text


def test_default_kind_is_the_isolated_sandbox():
    assert AgentConfig().sandbox == "local"


@isolated
def test_sees_only_its_own_processes_and_cannot_signal_the_runner(sandboxes):
    sb = sandboxes()
    pids = [p for p in bash(sb, "ls /proc").split() if p.isdigit()]
    assert len(pids) <= 4, pids  # bash, ls (and nsenter's helpers): nothing of the host
    runner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        out = bash(sb, f"kill -9 {runner.pid} {os.getpid()}; echo kill-rc=$?; pkill -9 -f python; pkill -9 -f pytest; "
                       "echo done")
        assert "kill-rc=1" in out and "done" in out
        assert runner.poll() is None  # the paper's `pkill -f python` (Listing 2) reaches nothing outside
    finally:
        runner.kill()
        runner.wait()


@isolated
def test_cannot_read_runner_env_data_home_other_rollouts_or_shadow(sandboxes, tmp_path, monkeypatch):
    monkeypatch.setenv("KLONG_KAFKA_SASL_PASSWORD", SECRET)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    archive = tmp_path / "home" / "archive"
    archive.mkdir(parents=True)
    (archive / "judge.parquet").write_text(SECRET)
    a, b = sandboxes("r-a"), sandboxes("r-b")
    bash(a, f"echo {SECRET} > answer.txt")
    probes = (f"env; cat /proc/[0-9]*/environ | tr '\\0' '\\n'; cat /proc/{os.getppid()}/environ; "
              f"cat /proc/{os.getpid()}/environ; cat {archive}/judge.parquet; ls {tmp_path}; "
              f"cat {tmp_path}/home/rollouts/r-a/submission/answer.txt; ls /home; cat /home/*/answer.txt; "
              "grep -rs s3cret /home /tmp /root /work /etc; cat /etc/shadow; echo probes-ran")
    out = bash(b, probes)
    assert "probes-ran" in out and SECRET not in out
    assert "Permission denied" in bash(b, "cat /etc/shadow")
    assert "paper" in bash(b, "ls /home") and "Read-only file system" in bash(b, "touch /home/paper/x /usr/x")
    assert SECRET in bash(a, "cat answer.txt")  # its own submission works


@isolated
def test_no_network_to_host_ports(sandboxes):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        out = bash(sandboxes(), f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 5); "
                                "print('CONNECTED')\" 2>&1; echo x > /dev/tcp/127.0.0.1/" + str(port) + " && echo TCP-OK")
        assert "CONNECTED" not in out and "TCP-OK" not in out and "refused" in out.lower()
    finally:
        server.close()


def _host_processes(marker: str) -> list[int]:
    found = []
    for p in os.listdir("/proc"):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(p))
        except (OSError, ValueError):
            pass
    return found


@isolated
def test_leaves_no_process_behind(sandboxes):
    sb = sandboxes()
    out = bash(sb, "setsid sleep 987651 > /dev/null 2>&1 < /dev/null & disown; (nohup sleep 987651 &) ; echo bg")
    assert "bg" in out
    assert _host_processes("987651") == []  # gone when the call ended
    res = sb.run("setsid sleep 987652 & sleep 987652", timeout_s=1)
    assert res.timed_out and _host_processes("987652") == []  # and when it was killed at its timeout


@isolated
def test_close_kills_the_whole_sandbox(sandboxes):
    sb = sandboxes()
    holder = sb._holder.pid
    sb.close()
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{holder}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{holder}")


@isolated
def test_disk_quota_counts_every_file_and_processes_are_limited(sandboxes):
    sb = sandboxes(disk_mb=8, file_size_mb=6, max_procs=40)
    res = sb.run("for i in 1 2 3 4; do head -c 5000000 /dev/zero > f$i; done; echo; du -sb . | cut -f1", timeout_s=60)
    assert "No space left on device" in res.output and int(res.output.split()[-1]) <= 8 << 20
    spawn = ("import subprocess\nps = []\ntry:\n    for _ in range(100):\n        ps.append(subprocess.Popen(['sleep', '30']))\n"
             "except OSError as e:\n    print('LIMIT', len(ps), e)\nelse:\n    print('NO LIMIT', len(ps))")
    out = sb.run("python3 -", timeout_s=60, stdin=spawn).output
    assert "LIMIT" in out and "NO LIMIT" not in out and int(out.split()[1]) < 40  # root inside is not exempt


@isolated
def test_submission_is_kept_and_escaping_links_dropped(sandboxes, tmp_path):
    sb = sandboxes()
    bash(sb, "mkdir -p src && echo 'print(1)' > src/main.py && ln -s /etc/shadow leak && ln -s src/main.py ok")
    sb.close()
    sub = tmp_path / "home" / "rollouts" / "r-1" / "submission"
    assert (sub / "src" / "main.py").read_text() == "print(1)\n"
    assert not (sub / "leak").exists() and not (sub / "leak").is_symlink()
    # a new sandbox over the same rollout (a resumed run) starts from the kept submission
    sb2 = sandboxes()
    assert "print(1)" in bash(sb2, "cat src/main.py")


@isolated
def test_read_tools_read_inside_the_sandbox(sandboxes, tmp_path):
    sb = sandboxes()
    (tmp_path / "host-secret.txt").write_text(SECRET)
    bash(sb, f"ln -s {tmp_path}/host-secret.txt link.txt")
    out = execute(sb, "read_file_chunk", '{"file": "link.txt"}', timeout_s=30).text
    assert SECRET not in out and "not found" in out
    assert "line 2" in execute(sb, "read_file_chunk", '{"file": "/home/paper/paper.md"}', timeout_s=30).text


@isolated
def test_run_in_sandbox_over_a_directory(tmp_path):
    d = tmp_path / "submission"
    d.mkdir()
    (d / "answer.txt").write_text("42\n")
    res = sandbox_local.run_in_sandbox(d, "cat answer.txt && echo changed > answer.txt && ls /proc | wc -l",
                                       timeout_s=60)
    assert res.exit_code == 0 and res.output.startswith("42")
    assert (d / "answer.txt").read_text() == "42\n"  # the grader's command changed a copy


def test_refuses_without_isolation_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap to be found
    sandbox_local.isolation_problem.cache_clear()
    try:
        with pytest.raises(ConfigError, match="cannot isolate.*bwrap.*unsafe-local"):
            make_sandbox("local", tmp_path, rollout_id="r-1")
    finally:
        sandbox_local.isolation_problem.cache_clear()


@pytest.mark.parametrize("bad", ["../../x", "a/b", "..", "", "x" * 300])
def test_rollout_ids_that_would_escape_are_refused(tmp_path, bad, capsys):
    with pytest.raises(ValidationError, match="cannot name a directory"):
        make_sandbox("unsafe-local", tmp_path, rollout_id=bad)
    rc = main(["rollout", "run", "--home", str(tmp_path), "--task", "t", "--rollout-id", bad, "--timeout", "5",
               "--base-url", "http://127.0.0.1:9/v1", "--model", "m"])
    assert rc == 2 and "cannot name a directory" in capsys.readouterr().err
    assert not (tmp_path.parent / "x").exists()


def test_k8s_manifests_carry_the_same_rules():
    config_map, policy, pod = render_manifests("r-1", SandboxLimits(disk_mb=100), paper_files={"paper.md": "p"})
    spec, sc = pod["spec"], pod["spec"]["containers"][0]["securityContext"]
    assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
    assert sc["readOnlyRootFilesystem"] and sc["runAsNonRoot"] and sc["capabilities"] == {"drop": ["ALL"]}
    assert not sc["allowPrivilegeEscalation"]
    mounts = {m["mountPath"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["/home/paper"]["readOnly"] is True
    assert {"name": "submission", "emptyDir": {"sizeLimit": "100Mi"}} in spec["volumes"]
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"] and policy["spec"]["egress"] == []
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert config_map["data"] == {"paper.md": "p"}


@isolated
def test_network_allowlist_reaches_only_allowed_hosts(tmp_path):
    import http.server
    import threading

    from producers.sandbox_local import NamespaceSandbox
    from producers.sandbox_net import allowed_hosts

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"hello-through-the-proxy")

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    fetch = "python3 -c \"import urllib.request as u; print(u.urlopen('{}', timeout=20).read().decode())\" 2>&1"
    try:
        with pytest.raises(ConfigError, match="blacklisted"):
            allowed_hosts(["github.com"], blacklist=["https://github.com/org/official-code"])
        sb = NamespaceSandbox(tmp_path / "r", allow_hosts=allowed_hosts(["localhost"], blacklist=["https://github.com/x"]))
        sb.setup({})
        try:
            assert "hello-through-the-proxy" in sb.run(fetch.format(f"http://localhost:{port}/"), timeout_s=60).output
            out = sb.run(fetch.format("http://example.com/"), timeout_s=60).output
            assert "403" in out and "hello" not in out
            assert "refused" in sb.run(f"echo x > /dev/tcp/127.0.0.1/{port} 2>&1 || echo refused", timeout_s=30).output
        finally:
            sb.close()
    finally:
        srv.shutdown()
    with pytest.raises(ConfigError, match="needs --sandbox local"):
        make_sandbox("unsafe-local", tmp_path, rollout_id="r-2", allow_hosts=("localhost",))


# ---- nothing to escape with: capabilities, seccomp, read-only system, copy-out --------------------------


@isolated
def test_a_call_has_no_capabilities_and_a_seccomp_filter(sandboxes):
    status = dict(line.split(":\t", 1) for line in bash(sandboxes(), "cat /proc/self/status").splitlines()
                  if ":\t" in line)
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0 and int(status["CapAmb"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"  # 2: a filter


@isolated
def test_a_call_cannot_change_mounts_or_enter_namespaces(sandboxes):
    sb = sandboxes()
    probes = {"umount /proc": "umount", "nsenter -t 1 -m true": "nsenter", "mount -t tmpfs none /tmp": "mount",
              "unshare -U -r true": "unshare", "unshare -m true": "unshare-m",
              "python3 -c 'import os; os.unshare(os.CLONE_NEWUSER)'": "py-unshare"}
    out = bash(sb, "; ".join(f"{cmd} 2>/dev/null; echo {tag}=$?" for cmd, tag in probes.items()))
    for tag in probes.values():
        assert f"{tag}=0" not in out, out
    # the attack of the report: a private /proc taken off, the holder's mount namespace entered, tar replaced
    out = bash(sb, "umount /proc; nsenter -t 2 -m -- mount --bind /tmp/x /usr/bin/tar; "
                   "nsenter -t 1 -m -- mount --bind /tmp/x /usr/bin/tar; echo attempted")
    assert "attempted" in out
    assert bash(sb, "head -c 4 /usr/bin/tar | od -c | head -1").split()[2:5] == ["E", "L", "F"]
    if platform.machine() == "x86_64":  # clone(CLONE_NEWUSER | SIGCHLD) straight to the kernel: refused
        out = bash(sb, "python3 -c 'import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); "
                       "r = libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0); print(\"clone\", r, ctypes.get_errno())'")
        assert out.strip() == f"clone -1 {errno.EPERM}", out
    # ordinary work still runs: threads, processes, a pool of workers (clone3 falls back to clone)
    out = bash(sb, "python3 -c 'import multiprocessing as m, threading; t = threading.Thread(target=print, "
                   "args=(\"thread\",)); t.start(); t.join(); print(m.Pool(2).map(abs, [-1, -2]))'")
    assert "thread" in out and "[1, 2]" in out, out


@isolated
def test_a_replaced_tar_is_never_run_by_the_runner(sandboxes, tmp_path):
    """The runner's copy-out runs no program of the sandbox: an agent's `tar`, put wherever it can put
    one (on PATH in the submission, over /usr/bin/tar by the reported mount trick), is never run."""
    sb = sandboxes()
    fake = ("#!/bin/sh\necho ran > /home/submission/FAKE_TAR_RAN\n"
            "exec python3 -c \"import io,sys,tarfile; t=tarfile.open(fileobj=sys.stdout.buffer, mode='w|'); "
            "d=b'pwned'; i=tarfile.TarInfo('pwned.txt'); i.size=len(d); t.addfile(i, io.BytesIO(d)); t.close()\"\n")
    bash(sb, f"mkdir -p bin && cat > bin/tar <<'EOF'\n{fake}EOF\nchmod +x bin/tar && cp bin/tar /tmp/tar; "
             "umount /proc; nsenter -t 2 -m -- mount --bind /tmp/tar /usr/bin/tar; "
             "mount --bind /tmp/tar /usr/bin/tar; echo planted")
    snap = sb.local_submission(tmp_path / "snap")
    sb.close()
    for d in (snap, tmp_path / "home" / "rollouts" / "r-1" / "submission"):
        assert not (d / "pwned.txt").exists() and not (d / "FAKE_TAR_RAN").exists()
        assert (d / "bin" / "tar").is_file()  # copied as data


@isolated
def test_root_dev_and_tmp_are_read_only_or_quotad(sandboxes):
    sb = sandboxes(disk_mb=8, tmp_mb=8, file_size_mb=64)
    out = bash(sb, "for f in /big /dev/big /home/big /usr/big; do head -c 20000000 /dev/zero > $f; echo \"$f rc=$?\"; done; "
                   "for f in /tmp/big /dev/shm/big big; do head -c 20000000 /dev/zero > $f; echo \"$f rc=$?\"; "
                   "du -sk $f | cut -f1; rm -f $f; done")
    for f in ("/big", "/dev/big", "/home/big", "/usr/big", "/tmp/big", "/dev/shm/big", "big"):
        assert f"{f} rc=1" in out, out
    assert out.count("Read-only file system") >= 4 and out.count("No space left on device") == 3
    assert all(int(x) <= 8 * 1024 for x in out.split() if x.isdigit())
    assert bash(sb, "echo ok > /dev/null && head -c 3 /dev/zero | wc -c") == "3"  # devices still work


@isolated
def test_call_output_is_capped_in_memory_not_spooled_on_the_host(sandboxes, tmp_path):
    import resource

    sb = sandboxes(file_size_mb=1, max_output_bytes=2048)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = sb.run("head -c 50000000 /dev/zero | tr '\\0' x; echo; echo the-end", timeout_s=120)
    # the whole 50 MB passed (no file-size limit on a pipe), the runner kept head and tail only
    assert res.exit_code == 0 and res.n_bytes == 50_000_000 + len("\nthe-end\n"), res
    assert len(res.output) < 4 * 2048 + 100 and res.output.rstrip().endswith("the-end")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 40 * 1024  # KiB: far below 50 MB
    scratch = tmp_path / "home" / "rollouts" / "r-1" / ".sandbox"
    assert not [p for p in scratch.rglob("*") if p.is_file()] if scratch.exists() else True


def _tree(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), root) for d, ds, fs in os.walk(root) for n in ds + fs}


@isolated
def test_hostile_links_and_long_paths_in_submission_leave_nothing_outside(sandboxes, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    sb = sandboxes()
    long = "d" * 200
    bash(sb, f"""
        ln -s {outside} esc; ln -s {outside}/planted.txt esc_file; ln -s / root; ln -s ../../../.. up
        ln -s . a; ln -s a/a/a/a/a/a/../../../../../../.. climb
        p=.; for i in $(seq 1 40); do mkdir -p $p/{long} 2>/dev/null || break; p=$p/{long}; done
        echo deep > $p/deep.txt 2>/dev/null
        (cd {long} && ln -s ../../../../../../../../../../../.. far)
        mkfifo pipe; mknod dev c 1 3 2>/dev/null; echo safe > safe.txt; ln -s safe.txt ok; echo built
    """)
    host_before = _tree(tmp_path) - {p for p in _tree(tmp_path) if p.startswith("home")}
    sb.close()
    dest = tmp_path / "home" / "rollouts" / "r-1" / "submission"
    assert (dest / "safe.txt").read_text() == "safe\n" and os.readlink(dest / "ok") == "safe.txt"
    assert list(outside.iterdir()) == []  # nothing written through a link
    host_after = _tree(tmp_path) - {p for p in _tree(tmp_path) if p.startswith("home")}
    assert host_after == host_before
    for d, ds, fs in os.walk(dest):
        for n in ds + fs:
            p = os.path.join(d, n)
            assert len(os.path.relpath(p, dest).encode()) <= 2048
            if os.path.islink(p):  # every kept link stays inside the copy
                assert (os.path.realpath(p) + os.sep).startswith(str(dest.resolve()) + os.sep), (p, os.readlink(p))
            else:
                assert os.path.isdir(p) or os.path.isfile(p)  # no FIFO, no device
    for name in ("esc", "esc_file", "root", "up", "climb", "pipe", "dev"):
        assert not os.path.lexists(dest / name)


def test_copy_tree_nofollow_bounds_and_links(tmp_path):
    """The copy-out on a host-made tree (no sandbox needed): links out, special files and what passes the
    bounds are left behind with a reason; nothing is written outside the destination."""
    from producers.sandbox_copy import CopyBounds, copy_tree_nofollow

    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "sub" / "deeper").mkdir(parents=True)
    outside.mkdir()
    (src / "a.txt").write_text("a")
    (src / "big.bin").write_bytes(b"x" * 5000)
    (src / "sub" / "deeper" / "c.txt").write_text("c")
    os.symlink(str(outside), src / "abs")
    os.symlink("../../outside", src / "sub" / "rel_out")
    os.symlink("deeper/c.txt", src / "sub" / "rel_in")
    os.mkfifo(src / "fifo")
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        rep = copy_tree_nofollow(fd, tmp_path / "dest", CopyBounds(max_depth=1, max_bytes=4096))
    finally:
        os.close(fd)
    dest = tmp_path / "dest"
    assert (dest / "a.txt").read_text() == "a" and os.readlink(dest / "sub" / "rel_in") == "deeper/c.txt"
    reasons = dict(rep.skipped)
    assert "4096-byte" in reasons["big.bin"] and "special file" in reasons["fifo"]
    assert "leave" in reasons["abs"] and "leave" in reasons["sub/rel_out"] and "deeper than 1" in reasons["sub/deeper"]
    assert list(outside.iterdir()) == [] and rep.n_skipped == 5
    with pytest.raises(FileExistsError):  # only into a directory it creates
        copy_tree_nofollow(os.open(src, os.O_RDONLY | os.O_DIRECTORY), dest)


def test_seccomp_table_matches_the_kernel_headers():
    from producers.sandbox_seccomp import DENIED, seccomp_program, syscall_numbers

    headers = {"x86_64": "/usr/include/x86_64-linux-gnu/asm/unistd_64.h", "aarch64": "/usr/include/asm-generic/unistd.h"}
    checked = 0
    for machine, header in headers.items():
        if not os.path.exists(header):
            continue
        text = open(header).read()
        for name, nr in syscall_numbers(machine).items():
            import re

            m = re.search(rf"#define __NR(?:3264)?_{name}\s+(\d+)", text)
            if m:
                assert int(m[1]) == nr, (machine, name)
                checked += 1
        assert len(seccomp_program(machine)) % 8 == 0
    assert set(DENIED) <= set(syscall_numbers("x86_64"))
    if checked == 0:
        pytest.skip("no kernel headers here to compare with")


def test_pod_tar_stream_is_extracted_without_links_or_escapes(tmp_path):
    """The k8s sandbox's copy-out: a tar stream the Pod shapes (CVE-2025-4517's kind: links, then files
    written through them; `..` and absolute names; long paths) writes only inside the destination."""
    import io
    import tarfile

    from producers.sandbox_copy import CopyBounds, extract_tar_nofollow

    outside = tmp_path / "outside"
    outside.mkdir()
    buf = io.BytesIO()

    def add(name, data=b"x", kind=tarfile.REGTYPE, link=""):
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, link
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add("./ok/file.txt", b"kept")
        add("link", kind=tarfile.SYMTYPE, link=str(outside))
        add("link/pwned.txt", b"pwned")
        add("../up.txt", b"pwned")
        add(str(outside / "abs.txt"), b"pwned")
        add("hard", kind=tarfile.LNKTYPE, link="/etc/passwd")
        add("dev", kind=tarfile.CHRTYPE)
        chain = "/".join(["d" * 250] * 20)  # ~5 kB: past PATH_MAX
        add(chain + "/deep.txt", b"deep")
        add("a", kind=tarfile.SYMTYPE, link="a/../..")
        add("ok/file.txt", b"second copy")
    buf.seek(0)
    dest = tmp_path / "dest"
    report = extract_tar_nofollow(buf, dest, CopyBounds())
    assert (dest / "ok" / "file.txt").read_bytes() == b"kept"
    assert list(outside.iterdir()) == [] and not (tmp_path / "up.txt").exists()
    for d, ds, fs in os.walk(dest):
        for n in ds + fs:
            p = os.path.join(d, n)
            assert not os.path.islink(p) and (os.path.isdir(p) or os.path.isfile(p))
    assert (dest / "link" / "pwned.txt").is_file()  # a plain directory of the copy, not the link
    reasons = " ".join(why for _, why in report.skipped)
    assert "leaving the destination" in reasons and "link or special file" in reasons and "too long" in reasons
