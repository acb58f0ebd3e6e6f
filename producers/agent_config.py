"""What configures and steers one agent rollout: `AgentConfig`, `RolloutControl` and the `AgentResult`.

    >>> control = RolloutControl(iteration=3, policy_version=3)
    >>> control.carry_over(4, 4, PolicyEndpoint(url, "klong@4"))   # taken by the loop at its next turn
    >>> control.stop()                                             # ends it 'aborted' at the next turn

`AgentConfig` is frozen and checked at construction (a bad value raises `ConfigError`). `RolloutControl`
is the thread-safe handle a scheduler shares with a running rollout: a pending carry-over (new iteration,
policy version and endpoint) is taken by the loop (`producers.agent_loop`) under a lock at a turn boundary.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Literal, Optional

from producers.agent_policy import PolicyEndpoint
from producers.sandbox import SANDBOX_KINDS, SandboxLimits
from schemas.errors import ConfigError


@dataclass(frozen=True)
class AgentConfig:
    min_time_fraction: float = 0.5  # end_task refused before this fraction of timeout_s
    reminder_every_turns: int = 5  # a time reminder every N turns after the reading (0: never)
    prune_ratio: float = 0.3  # share of the non-prefix context dropped on a context-length error
    mandatory_reading: bool = True  # paper.md (+ addendum.md) read in full before other tools
    sandbox: Literal["local", "unsafe-local", "k8s"] = "local"  # producers.sandbox: local = isolated namespaces
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    allow_hosts: tuple[str, ...] = ()  # local sandbox: HTTP(S) to these hosts only (never a blacklisted one)
    workdir: Optional[str] = None  # parent of the per-rollout sandbox dirs (default HOME/rollouts)
    python: str = "python3"  # interpreter of the python tool inside the sandbox
    k8s_image: str = "python:3.11-slim"
    k8s_namespace: str = "default"
    request_token_ids: bool = True  # ask for vLLM's token-id extras (off for plain OpenAI endpoints)
    # Sampling: temperature (recorded with every assistant step: the trainer takes log-probs at it); top_p 1.0 and
    # top_k -1 are off. RL refuses truncated sampling (check_rl): the trainer's ratio is of the full distribution.
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: Optional[int] = None  # per completion
    # token-in/token-out: the policy's context length (the server's max_model_len). The runner prunes before a call
    # whose prompt + max_tokens + closing ids would not fit, so every recorded context fits it (agent_context)
    context_limit: Optional[int] = None
    max_transient_errors: int = 3  # consecutive policy failures (after the client's retries) before 'error'
    snapshot_every_turns: int = 0  # extra snapshots during the rollout (0: only at the end)
    # The policy's model directory (tokenizer + chat template, `klong model import`): token-in/token-out through
    # /v1/completions (producers.agent_context). None: the chat API, observation steps text-only.
    model_dir: Optional[str] = None
    seed: Optional[int] = None  # sampling seed sent with every policy call (reproducible tests)
    max_turns: Optional[int] = None  # end the rollout after this many policy turns (status timeout: truncated)
    # token-in/token-out: every reply is one well-formed tool call (vLLM structured outputs with
    # agent_policy.tool_call_regex): a small model that seldom calls tools then acts every turn
    tool_call_grammar: bool = False
    # paperbench: PaperBench's system and task messages, the paper read through tools (real papers);
    # inline: a short system message and the task text itself in the user message (short tasks, small models;
    # the paper is then read by construction: no mandatory_reading rule)
    prompt: Literal["paperbench", "inline"] = "paperbench"

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_time_fraction <= 1.0:
            raise ConfigError(f"min_time_fraction must be in [0, 1], got {self.min_time_fraction}")
        if not 0.0 < self.prune_ratio < 1.0:
            raise ConfigError(f"prune_ratio must be in (0, 1), got {self.prune_ratio}")
        if self.prompt not in ("paperbench", "inline"):
            raise ConfigError(f"prompt must be paperbench or inline, got {self.prompt!r}")
        if self.sandbox not in SANDBOX_KINDS:
            raise ConfigError(f"sandbox must be one of {', '.join(SANDBOX_KINDS)}, got {self.sandbox!r}")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) or self.temperature < 0:
            raise ConfigError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (1: off), got {self.top_p!r}")
        cl = self.context_limit
        if cl is not None and (not isinstance(cl, int) or isinstance(cl, bool) or cl < 2):
            raise ConfigError(f"context_limit must be an integer >= 2 (the server's max_model_len) or null, got {cl!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise ConfigError(f"top_k must be an integer >= 1, or -1 (off), got {self.top_k!r}")

    def check_rl(self) -> "AgentConfig":
        """Refuses sampling an RL trainer cannot reproduce (a ConfigError naming the key); returns self.
        The trainer computes log-probs of the whole temperature-scaled distribution, softmax(logits / T):
        that is the distribution sampled only with top_p and top_k off. Truncated sampling would make every
        ratio, KL and mismatch figure describe a distribution nothing was sampled from."""
        if self.top_p != 1.0:
            raise ConfigError(f"agent.top_p={self.top_p}: RL trains the log-probs of the distribution sampled, and "
                              "the trainer computes the whole one (logits / temperature); set agent.top_p: 1.0 (off)")
        if self.top_k not in (-1, 0):
            raise ConfigError(f"agent.top_k={self.top_k}: RL trains the log-probs of the distribution sampled, and "
                              "the trainer computes the whole one (logits / temperature); set agent.top_k: -1 (off)")
        return self


class RolloutControl:
    """Thread-safe handle shared between the scheduler and one running rollout (agent loop in a thread)."""

    def __init__(self, *, iteration: int = 0, policy_version: int = 0, stage: int = 1) -> None:
        self._lock = threading.Lock()
        self.iteration, self.policy_version, self.stage = iteration, policy_version, stage
        self._pending: Optional[tuple[int, int, Optional[PolicyEndpoint]]] = None
        self._served: Optional[threading.Event] = None  # see carry_over
        self._stop = threading.Event()
        self.rollout_id: Optional[str] = None  # set once the rollout has started
        self.done = threading.Event()  # set when run_agent returns

    def carry_over(self, iteration: int, policy_version: int, policy: Optional[PolicyEndpoint] = None,
                   served: Optional[threading.Event] = None) -> None:
        """The iteration closed while this rollout runs: before its next policy call the agent emits
        rollout_resumed(iteration, policy_version) and later steps carry the new policy_version
        (`policy`: a new endpoint to sample from, e.g. the new checkpoint's server). Not killed.
        `served`: set once the endpoint serves `policy_version` (the scheduler trains and reloads
        meanwhile); the next policy call waits for it, so every step carries the version that made it."""
        with self._lock:
            self._pending = (iteration, policy_version, policy)
            self._served = served

    def wait_served(self) -> None:
        """Blocks until the policy taken with the last carry-over is served (or the rollout is stopped)."""
        served = self._served
        while served is not None and not served.wait(0.5) and not self.stopped:
            pass

    def stop(self) -> None:
        """End the rollout at the next turn boundary with status 'aborted'."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _take(self) -> Optional[tuple[int, int, Optional[PolicyEndpoint]]]:
        with self._lock:
            pending, self._pending = self._pending, None
            if pending:
                self.iteration, self.policy_version = pending[0], pending[1]
            return pending


@dataclass(frozen=True)
class AgentResult:
    rollout_id: str
    status: str  # finished | timeout | error | aborted
    n_steps: int
    elapsed_s: float
    snapshot_ref: Optional[str]
    judge_request_id: Optional[str]
    error: Optional[str] = None
    n_turns: int = 0
    n_prunes: int = 0
