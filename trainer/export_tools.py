"""The tool schemas a window's system message was rendered with, put back into its text for chat exports.

    >>> texts = system_with_tools(home, version_path, manifest)     # rollout_id -> system message text

The events record a system step's text and its token ids, not the tool schemas the chat template rendered
into those ids (`<tools>` block). A consumer that renders `messages` again (verl's MultiTurnSFTDataset, TRL)
would then give other ids than the model saw. So, for each rollout of a dataset version whose first step is
a system message: if its stored ids are what the template renders for that message with the reference
agent's tools (`producers.agent_tools.TOOLS`, the schemas klong's agent runs with), the export's system text
becomes what the template put between the system header and end-of-turn, tools block included; the
template then renders that text, without tools, to the very same ids (checked). Other rollouts keep their
text. The template is the model directory whose fingerprint the version's ids come from (the build's
`tokenizer`, or a model under HOME/models); none found: nothing changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pyarrow.parquet as pq

from store import datasets as ds

_MARK = "\x00klong-system\x00"


def _chat_for(home: Path, manifest: dict):
    """The ChatTokenizer whose fingerprint the version's token ids come from, or None."""
    from core.chat import ChatTokenizer
    from core.tokenize import is_model_dir

    want = (manifest.get("counts") or {}).get("token_ids_from") or manifest.get("tokenizer")
    if not want or not str(want).startswith("sha256:"):
        return None
    candidates = [Path(str(manifest.get("config", {}).get("tokenizer", "")))]
    models = Path(home) / "models"
    candidates += sorted(models.iterdir()) if models.is_dir() else []
    for path in candidates:
        if str(path) and is_model_dir(path):
            chat = ChatTokenizer(path)
            if chat.fingerprint == want:
                return chat
    return None


def _system_text(chat, content: str, tools: list) -> Optional[str]:
    """The text that renders, without tools, as `content` rendered with `tools` (None: the template does not
    put the system text verbatim between a fixed header and end)."""
    pre, found, post = chat.render([{"role": "system", "content": _MARK}]).partition(_MARK)
    full = chat.render([{"role": "system", "content": content}], tools)
    if not found or not full.startswith(pre) or not full.endswith(post) or len(full) < len(pre) + len(post):
        return None
    text = full[len(pre):len(full) - len(post)]
    return text if chat.render([{"role": "system", "content": text}]) == full else None


def system_with_tools(home: Path, version_path: Path, manifest: dict, contents: dict[str, str]) -> dict[str, str]:
    """rollout_id -> its system message text with the tools block, for rollouts (of `contents`: rollout_id ->
    the system step's text) whose stored system ids include the reference agent's tools."""
    chat = _chat_for(home, manifest)
    if chat is None or not contents:
        return {}
    from producers.agent_tools import TOOLS

    t = pq.read_table(version_path / ds.TOKENS, columns=["rollout_id", "step_offsets", "token_ids"])
    out: dict[str, str] = {}
    rendered: dict[str, list] = {}
    for rid, offsets, ids in zip(*(t.column(c).to_pylist() for c in t.column_names)):
        if rid not in contents or len(offsets) < 2:
            continue
        sys_ids = ids[offsets[0]:offsets[1]]
        content = contents[rid]
        if content not in rendered:
            rendered[content] = chat.apply([{"role": "system", "content": content}], TOOLS).tolist()
        if sys_ids == rendered[content]:
            text = _system_text(chat, content, TOOLS)
            if text is not None:
                out[rid] = text
    return out
