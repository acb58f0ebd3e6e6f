"""The reference agent's prompts: PaperBench's basic-agent system and task messages with KLong's
additions (mandatory paper reading, end_task banned early, periodic time reminders).

    system_prompt()                                        # the pinned system message
    task_prompt(paper_dir, submission_dir, hours=2.0)      # the pinned user message
    reminder(elapsed_s=600, timeout_s=7200)                # every few turns

`agent.prompt: inline` (short tasks, small models) swaps both pinned messages for `INLINE_SYSTEM` and
`inline_task(paper_md, addendum, submission_dir)`: the task text itself in the user message, instead of a
pointer to a paper the agent must first open with read_file_chunk (a 135M model never does).
"""

from __future__ import annotations

SYSTEM = """You are a helpful agent attempting to solve a task. You have several functions available to help with solving the task. Each message may perform one function call. You will see the result of the function right after sending the message. If you need to perform multiple actions, you can always send more messages with subsequent function calls. Do some reasoning before your actions, describing what function calls you are going to use and how they fit into your plan.

Use as much of the available time as possible to refine and optimize your solution: Your goal is to achieve the best possible score, not just to submit your first working solution. Keep working until the time limit expires.

YOU MUST use the bash and python tools provided to create your replication. ACTUALLY REPLICATE the paper YOURSELF, do not give instructions on how I can do so.

Only execute a single command using each tool at once.

This is a multi-step task. DO THINGS BIT BY BIT by slowly building up your solution with multiple tool calls; don't try to do everything in one go. Just reason about what is the best next step and execute it. Then take the next step after you receive the output of the previous step.

Do not stop until you have replicated all results from the paper. Before calling end_task, YOU MUST have an entire codebase that can reproduce all metrics, figures, tables, and findings from the paper. Ensure that running reproduce.sh will reproduce all metrics, figures, tables, and findings from the paper! Remember, you are tasked with replicating a whole paper, not just a single part of it or a minimal example. The file read tool is PAGINATED, so you will need to CALL IT MULTIPLE TIMES to make sure that you have read all the relevant parts of the paper."""

TASK = """You are tasked with reproducing a research paper.

You have been provided with a research paper located at {paper_dir}. The directory contains the paper in markdown format{addendum_note}.

TASK

Your task is to replicate as many of the core contributions of this paper as possible, within the allotted time you have available. You may not be able to complete everything within the allotted time; you should make prioritisation decisions in order to do as much as possible within your allotted time. You will be assigned partial credit, weighted by importance to the paper's main contributions.

RESOURCES

You are allowed to browse and use resources you can find online, however you must not look at or use the paper's codebase or other resources listed in `{paper_dir}/blacklist.txt`, as this is considered cheating.

SUBMISSION

The output of your work must be a git repository containing all the necessary components to reproduce the results of the paper. Your repository should be located at `{submission_dir}/` (your working directory). Please also include a `README.md` file that describes what you were able to achieve in your reproduction attempt.

ADDITIONAL NOTES

- Total Runtime: You are expected to work until you have spent {runtime} on this task. end_task is refused before {min_runtime} have passed.
- Each message may perform ONE function call only.
- Very Important: Before you write code or reproduce the paper, you MUST read all content in {required}! Other tools are refused until you have.
{reading_status}"""

INLINE_SYSTEM = """You are an agent that completes tasks with tool calls. Each message makes exactly one function call; you see its result in the next message. When the task is done, call end_task."""

INLINE_TASK = """{paper}
{addendum}
Your working directory is the submission directory {submission_dir}/."""

CONTINUE = "Please proceed to the next step using your best judgement. If you believe you are finished, double check your work to continue to refine and improve your submission."


def hms(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def system_prompt() -> str:
    return SYSTEM


def task_prompt(paper_dir: str, submission_dir: str, timeout_s: float, min_fraction: float,
                required: list[str], reading_status: str, has_addendum: bool) -> str:
    return TASK.format(paper_dir=paper_dir, submission_dir=submission_dir, runtime=hms(timeout_s),
                       min_runtime=hms(timeout_s * min_fraction),
                       addendum_note=", with an addendum at " + paper_dir + "/addendum.md" if has_addendum else "",
                       required=" and ".join(required) if required else "the paper directory",
                       reading_status=reading_status)


def inline_task(paper_md: str, addendum: str, submission_dir: str) -> str:
    return INLINE_TASK.format(paper=paper_md.strip() + "\n", addendum=addendum.strip() + "\n" if addendum.strip() else "",
                              submission_dir=submission_dir)


def reminder(elapsed_s: float, timeout_s: float) -> str:
    return (f"Info: {hms(elapsed_s)} time elapsed out of {hms(timeout_s)}. Remember, you only have to stop working "
            "when the time limit has been reached.\n\nNote: Don't forget to git commit regularly!")


def end_refused(elapsed_s: float, timeout_s: float, min_fraction: float) -> str:
    return (f"end_task refused: only {hms(elapsed_s)} of {hms(timeout_s)} used; the task may end only after "
            f"{hms(timeout_s * min_fraction)}. Keep improving your reproduction.")
